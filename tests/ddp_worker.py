"""One training process of tests/test_distributed.py, started by `accelerate launch`: trains with the
Trainer, then saves this process's trainable parameters (LoRA and log Z) for the test to compare."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import compose_cfg  # noqa: E402
from gf_odg.training.trainer import Trainer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    cfg = compose_cfg(sys.argv[2:])
    trainer = Trainer(cfg, out / "run")
    code = 1
    try:
        trainer.setup()
        trainer.train()
        params = {name: p.detach().cpu().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        params.update({f"log_z.{name}": p.detach().cpu().clone() for name, p in trainer.log_z.named_parameters()})
        torch.save({"params": params, "rank": trainer.dist.rank, "world_size": trainer.dist.world_size,
                    "prompts_seen": trainer.global_step}, out / f"rank{trainer.dist.rank}.pt")
        code = 0
    finally:
        trainer.close(code)


if __name__ == "__main__":
    main()
