"""One training process of tests/test_distributed.py, started by `accelerate launch`: trains with the
Trainer, then saves this process's trainable parameters (LoRA and log Z) for the test to compare.

It saves them three times: as built (before the first `Dist.broadcast_trainable`, wherever that runs),
at step 0 (after it), and after training. The worker calls `broadcast_trainable` itself after setup, so
that the step-0 check holds whether or not the trainer calls it too (a second call changes nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from conftest import compose_cfg  # tests/ is on the path: this script's own folder
from gf_odg.distributed import Dist
from gf_odg.training.trainer import Trainer


def trainable(trainer: Trainer) -> dict:
    """{name: tensor} of this process's LoRA and log Z parameters (under FSDP: its shards), copied."""
    params = {name: p.detach().cpu().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    if trainer.log_z is not None:
        params.update({f"log_z.{name}": p.detach().cpu().clone() for name, p in trainer.log_z.named_parameters()})
    return params


def main() -> None:
    out = Path(sys.argv[1])
    cfg = compose_cfg(sys.argv[2:])
    trainer = Trainer(cfg, out / "run")
    built: dict = {}
    broadcast = Dist.broadcast_trainable

    def snapshot_then_broadcast(dist, *modules):
        if not built:  # the first call: the parameters as each process built them
            built.update(trainable(trainer))
        broadcast(dist, *modules)

    Dist.broadcast_trainable = snapshot_then_broadcast
    code = 1
    try:
        trainer.setup()
        trainer.dist.broadcast_trainable(trainer.model, trainer.log_z)
        start = trainable(trainer)
        trainer.train()
        torch.save({"built": built, "start": start, "params": trainable(trainer), "rank": trainer.dist.rank,
                    "world_size": trainer.dist.world_size, "prompts_seen": trainer.global_step},
                   out / f"rank{trainer.dist.rank}.pt")
        code = 0
    finally:
        trainer.close(code)


if __name__ == "__main__":
    main()
