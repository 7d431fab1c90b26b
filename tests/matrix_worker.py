"""One process of the matrix's two-process cells (tests/test_matrix.py), started by `accelerate launch`:
trains each cell named on the command line ("objective:behaviour") in turn with the Trainer, each process
drawing one prompt a step (the global batch of the one-process cell), and saves this process's trained LoRA
and log Z per cell (rank<r>.pt); rank 0 also writes each cell's exact TV and log Z (cells.json)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ddp_worker import trainable  # tests/ is on the path: this script's own folder
from test_matrix import cell_cfg, measure, setup_cell


def main() -> None:
    out = Path(sys.argv[1])
    params, report, trainer = {}, {}, None
    try:
        for cell in sys.argv[2:]:
            objective, behaviour = cell.split(":")
            start = time.perf_counter()
            folder = out / cell.replace(":", "-")
            cfg, weights = cell_cfg(folder, objective, behaviour, ["trainer.prompts_per_step=1"])
            trainer = setup_cell(cfg, weights, folder / "run")  # the process group is set up once, then shared
            while trainer.global_step < cfg.trainer.max_steps:
                trainer.step()
            params[cell] = trainable(trainer)
            report[cell] = {**measure(trainer, weights), "steps": trainer.global_step,
                            "world_size": trainer.dist.world_size, "seconds": time.perf_counter() - start}
        torch.save(params, out / f"rank{trainer.dist.rank}.pt")
        if trainer.dist.is_main:
            (out / "cells.json").write_text(json.dumps(report))
    finally:
        if trainer is not None:
            trainer.close()  # (the last one: closing destroys the process group every trainer shares)


if __name__ == "__main__":
    main()
