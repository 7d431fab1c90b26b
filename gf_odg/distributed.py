"""Multi-process training under `accelerate launch` (or `torchrun`): data parallel over the LoRA and
log Z parameters.

Every process holds the whole (4-bit) model on its own device, samples its share of the step's
prompts, scores and backpropagates its own samples, and then the gradients of the trainable
parameters are averaged across processes by one all-reduce before the optimiser step: what DDP
does, done by hand because the sampler and scorer call the transformer body and the output
projection directly (a `DistributedDataParallel` wrapper only hooks the outer `forward`). The
parameters start equal (same seed) and stay equal (same averaged gradient, same optimiser).

One process (rank 0) logs to W&B and writes checkpoints, adapters and eval.json; the others
contribute their metrics, replay buffers and RNG states to it.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from typing import Any, Optional

import torch

_ENV_STAMP = "GF_ODG_LAUNCH_TIME"


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Dist:
    """This process's place among the training processes (a single process is world size 1)."""

    def __init__(self) -> None:
        self.world_size = world_size_from_env()
        self.rank = 0
        self.local_rank = 0
        self.device: Optional[torch.device] = None
        for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
            if os.environ.get(flag, "").lower() in ("1", "true"):
                from gf_odg.errors import ConfigError

                raise ConfigError(
                    f"accelerate launched this run with {name}; GF-ODG trains data parallel only (each process "
                    "holds the 4-bit model and the LoRA gradients are averaged). Launch with "
                    "--config_file accelerate/ddp.yaml.")
        if self.world_size > 1:
            from accelerate import PartialState

            # cpu=True on a machine without CUDA: gloo process group (tests, CPU clusters).
            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank = state.process_index
            self.local_rank = state.local_process_index
            self.world_size = state.num_processes
            self.device = torch.device(state.device.type) if state.device.type == "cpu" else state.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _group_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over processes (a missing gradient counts as 0)."""
        if not self.enabled or not params:
            return
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        device = flat.device
        flat = flat.to(self._group_device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = (flat / self.world_size).to(device)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype)
            offset += n

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._group_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t) / self.world_size

    def all_true(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._group_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(int(t))

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)

    def gather(self, obj: Any) -> list:
        """Every process's `obj`, in rank order (on every process)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def merge_metrics(per_rank: list[dict]) -> dict:
    """One metrics dict from every process's: the mean of each number (timings: the slowest process)."""
    if len(per_rank) == 1:
        return per_rank[0]
    merged: dict = {}
    for key in per_rank[0]:
        values = [m.get(key) for m in per_rank if isinstance(m.get(key), (int, float))]
        if not values:
            merged[key] = per_rank[0][key]
            continue
        if key.startswith("time/"):
            merged[key] = max(values)
            continue
        finite = [float(v) for v in values if math.isfinite(float(v))]
        merged[key] = sum(finite) / len(finite) if finite else float("nan")
    return merged


def launch_time() -> datetime:
    """The launch's timestamp, the same in every process: it names the shared Hydra run dir and run."""
    stamp = os.environ.get(_ENV_STAMP)
    return datetime.fromisoformat(stamp) if stamp else datetime.now()


def share_launch_time(dist: Dist) -> None:
    """Rank 0's clock for every process, before Hydra makes the run dir."""
    if dist.enabled and not os.environ.get(_ENV_STAMP):
        os.environ[_ENV_STAMP] = dist.broadcast(datetime.now().isoformat())
