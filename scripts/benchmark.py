"""Benchmarks against baselines measured in the same run: a shim over `python -m gf_odg.bench`
(gf_odg/bench/: one module per section). Every option: `uv run python scripts/benchmark.py --help`.

    uv run python scripts/benchmark.py --model tiny-random --quick        # = python -m gf_odg.bench ... --model tiny-random --quick
"""

import sys

from gf_odg.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
