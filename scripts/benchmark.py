"""Benchmarks against baselines measured in the same run: a shim over `python -m gf_odg.bench`
(gf_odg/bench/: one module per section). Every option: `uv run python scripts/benchmark.py --help`.

    uv run python scripts/benchmark.py --model tiny-random --quick
    uv run python scripts/benchmark.py --sections trl_step --ks 16,32
"""

import sys

from gf_odg.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
