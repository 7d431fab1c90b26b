"""Two processes of tests/test_distributed.py, started by `accelerate launch`: rank 0 waits at a collective (an
all-reduce, as every step makes) that rank 1 never reaches, and must stop with a one-line error once
GF_ODG_COLLECTIVE_TIMEOUT has passed."""

from __future__ import annotations

import sys
import time

from gf_odg.distributed import Dist, collective_timeout, collective_errors
from gf_odg.errors import GFODGError


def main() -> None:
    dist = Dist()
    if dist.rank == 0:
        try:
            with collective_errors():
                dist.all_true(True)
        except GFODGError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    else:
        time.sleep(3 * collective_timeout())  # out of step: never at the all-reduce


if __name__ == "__main__":
    main()
