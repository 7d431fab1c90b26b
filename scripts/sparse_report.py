"""How many distinct high-reward completions did a run find? A shim over
`python -m gf_odg.bench.sparse_report` (every option: --help).

    uv run python scripts/sparse_report.py outputs/sparse/<run> [<run> ...] [--threshold T] [--json out.json]
"""

import sys

from gf_odg.bench.sparse_report import main

if __name__ == "__main__":
    sys.exit(main())
