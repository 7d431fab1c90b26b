"""Multi-process training under `accelerate launch` (or `torchrun`): data parallel over the LoRA and
log Z parameters.

Every process holds the whole (4-bit) model on its own device, samples its share of the step's
prompts, scores and backpropagates its own samples, and then the gradients of the trainable
parameters are averaged across processes by one all-reduce before the optimiser step: what DDP
does, done by hand because the sampler and scorer call the transformer body and the output
projection directly (a `DistributedDataParallel` wrapper only hooks the outer `forward`). The
parameters start equal (rank 0's, sent to all by `broadcast_trainable`: equal seeds are not enough
when rank 0 alone has drawn from the RNG converting the base model) and stay equal (same averaged
gradient, same optimiser).

Under an FSDP launch (configs/accelerate/fsdp.yaml) the decoder layers are sharded instead, by torch's
FSDP2 `fully_shard` (`Dist.shard`): each process holds its shard of every layer's weights, FSDP
reduce-scatters the LoRA gradients, and generation runs in lockstep, since every forward call of a
sharded layer gathers its weights from all processes.

One process (rank 0) logs to W&B and writes checkpoints, adapters and eval.json; the others
contribute their metrics, replay buffers and RNG states (and, under FSDP, optimizer shards) to it.

Every collective waits at most GF_ODG_COLLECTIVE_TIMEOUT seconds (default 600) for the other
processes; past that, a process that fell out of step or died stops the run with a `DistributedError`
instead of a silent hang. It is an environment variable, not a config key, because the processes join
their group before Hydra composes the config. `Dist.barrier` is the exception: it is where the other
processes wait for rank 0 working alone (converting or downloading the base model, evaluating, writing
a checkpoint), which can take longer, so it waits up to a day, in a process group of its own.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Optional

import torch

from gf_odg.errors import ConfigError, DistributedError

_ENV_STAMP = "GF_ODG_LAUNCH_TIME"
TIMEOUT_ENV = "GF_ODG_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
BARRIER_TIMEOUT_S = 24 * 3600.0
_COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "gloo/transport")


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes")


def collective_timeout() -> float:
    """Seconds a collective waits for the other processes (GF_ODG_COLLECTIVE_TIMEOUT, default 600)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds (how long a process waits "
                          f"for the others at a collective); unset it for the default {DEFAULT_TIMEOUT_S:.0f}.")
    return seconds


@contextmanager
def collective_errors():
    """Turn a timed-out or broken collective into a `DistributedError` that says what happened and what to
    do; any other exception passes through unchanged."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as err:  # gloo reports a timeout as a plain RuntimeError, NCCL as a DistError
        if not (isinstance(err, dist.DistError) or any(mark in str(err) for mark in _COLLECTIVE_FAILURES)):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"a collective operation between the training processes failed ({first[:200]}): the processes fell "
            f"out of step (different numbers of collective calls) or one of them stopped or died. See the other "
            f"processes' logs (train_rank*.log in the run dir) for the first error; if a process is only slow, "
            f"raise {TIMEOUT_ENV} (now {collective_timeout():.0f} s).") from err


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
        self.fsdp = _env_flag("ACCELERATE_USE_FSDP")
        self.reshard_after_forward = _env_flag("FSDP_RESHARD_AFTER_FORWARD", True)
        self.mesh = None
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            raise ConfigError(
                "accelerate launched this run with DeepSpeed, which GF-ODG does not run: the sampler and scorer call "
                "the transformer body and output projection directly, outside a DeepSpeed engine. Launch with "
                "--config_file configs/accelerate/ddp.yaml (each process the whole 4-bit model) or configs/accelerate/fsdp.yaml "
                "(bf16/fp32 weights sharded across processes).")
        if self.fsdp:
            if os.environ.get("FSDP_VERSION", "1") != "2":
                raise ConfigError(f"accelerate launched this run with FSDP version {os.environ.get('FSDP_VERSION', '1')}; "
                                  "GF-ODG shards with FSDP2 (torch fully_shard): set fsdp_version: 2, as "
                                  "configs/accelerate/fsdp.yaml does.")
            for flag, what in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                               ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
                if _env_flag(flag):
                    raise ConfigError(f"{what}: true is not supported by GF-ODG's FSDP path; set it to false "
                                      "(for activation checkpointing use model.gradient_checkpointing=true).")
        if self.world_size > 1:
            from accelerate import PartialState

            # cpu=True on a machine without CUDA: gloo process group (tests, CPU clusters).
            timeout = collective_timeout()
            state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout))
            import torch.distributed as dist

            # Every process makes a Dist at the same points (train.py, the Trainer), so they create this in step.
            self._barrier_group = dist.new_group(timeout=timedelta(seconds=max(timeout, BARRIER_TIMEOUT_S)))
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

    # ------------------------------------------------------------- FSDP
    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def shard(self, model, model_cfg) -> None:
        """Under an FSDP launch: shard every decoder layer's weights (frozen and LoRA) across the
        processes with torch's FSDP2 `fully_shard`. The embeddings, final norm and output projection
        stay whole on every process (the sampler and scorer use the output projection directly);
        gradients of the sharded LoRA weights are reduce-scattered by FSDP, the rest (log Z) averaged
        by `average_gradients`. Generation runs in lockstep (every process makes the same number of
        forward calls; a process whose samples all ended waits for the others)."""
        if not (self.fsdp and self.enabled):
            return
        if model_cfg.quantization.load_in_4bit:
            raise ConfigError(
                "model.quantization.load_in_4bit=true under an FSDP launch: GF-ODG's FSDP path shards bf16/fp32 "
                "weights; 4-bit QLoRA runs data parallel, each process holding the whole 4-bit model. Launch with "
                "--config_file configs/accelerate/ddp.yaml, or set model.quantization.load_in_4bit=false "
                "model.dtype=bfloat16 to shard the full-precision weights.")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from gf_odg.generation.sampling import decoder_and_head

        decoder, _, _ = decoder_and_head(model)
        device_type = self.device.type if self.device is not None else "cpu"
        self.mesh = init_device_mesh(device_type, (self.world_size,))
        for layer in decoder.layers:
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward)
        self._layers = list(decoder.layers)
        model.gf_odg_all_true = self.all_true  # read by the sampler: stop when every process is done
        model.gf_odg_max_int = self.max_int  # read by rewards that run the policy: as many forward calls everywhere

    @contextmanager
    def full_params(self, model):
        """Every sharded layer gathered whole on every process (all must enter), so that rank 0 alone
        can save the adapter or evaluate; resharded on exit. Under FSDP this needs the whole model's
        weights in each process's memory for the duration. A no-op without FSDP."""
        if not self.sharded:
            yield
            return
        for layer in self._layers:
            layer.unshard()
            layer.set_reshard_after_forward(False)
        lockstep = {name: model.__dict__.pop(name) for name in _LOCKSTEP_ATTRS if name in model.__dict__}
        try:
            yield
        finally:
            for layer in self._layers:
                layer.reshard()
                layer.set_reshard_after_forward(self.reshard_after_forward)
            for name, fn in lockstep.items():
                setattr(model, name, fn)

    def full_trainable_state(self, model) -> Optional[dict]:
        """Under FSDP, every trainable parameter of the model gathered whole ({name: tensor}, all ranks
        must call): what PEFT's save_pretrained(state_dict=...) writes. None without FSDP."""
        if not self.sharded:
            return None
        from torch.distributed.tensor import DTensor

        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                for name, p in model.named_parameters() if p.requires_grad}

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """torch's clip_grad_norm_ over all processes' shards: the norm of the whole gradient."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        if not sharded:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        import torch.distributed as dist

        local = torch.zeros((), dtype=torch.float64)
        for g in sharded:
            local += g.to_local().double().pow(2).sum().cpu()
        local = local.to(self._group_device())
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        total_sq = float(local) + sum(float(g.double().pow(2).sum()) for g in grads if not isinstance(g, DTensor))
        total = math.sqrt(total_sq)
        coef = min(1.0, max_norm / (total + 1e-6))
        if math.isfinite(total) and coef < 1.0:
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
        return total

    def load_full_into(self, target: torch.Tensor, full: torch.Tensor) -> None:
        """Copy a whole tensor into a parameter, which under FSDP holds only this process's shard."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = full.to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            target.to_local().copy_(distribute_tensor(full, target.device_mesh, target.placements,
                                                      src_data_rank=None).to_local())
        else:
            target.copy_(full)

    @staticmethod
    def local_optimizer_state(optimizer) -> dict:
        """The optimizer's state with each sharded tensor as this process's local shard (plain tensors
        a checkpoint can hold)."""
        from torch.distributed.tensor import DTensor

        state = optimizer.state_dict()
        state["state"] = {i: {k: (v.to_local().detach().cpu().clone() if isinstance(v, DTensor) else v)
                              for k, v in s.items()} for i, s in state["state"].items()}
        return state

    @staticmethod
    def load_local_optimizer_state(optimizer, state: dict) -> None:
        """Inverse of local_optimizer_state: load, then wrap each sharded parameter's state back as a
        DTensor laid out like the parameter."""
        from torch.distributed.tensor import DTensor

        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not isinstance(p, DTensor) or p not in optimizer.state:
                    continue
                for key, value in optimizer.state[p].items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.dim() > 0:
                        optimizer.state[p][key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                                     run_check=False, shape=p.shape, stride=p.stride())

    # ------------------------------------------------------------- data parallel
    def broadcast_trainable(self, *modules) -> None:
        """Copy rank 0's values of every trainable parameter of `modules` (the LoRA policy, log Z) into
        every process, in place (optimizers built on them stay valid).

        Equal seeds do not guarantee equal initial weights: on a first run rank 0 alone converts the
        base model, which draws from the global RNG before the LoRA weights are initialised. Call once,
        after the trainable parameters are built and before FSDP shards them (`shard` cuts each
        process's shard from its own whole tensor, so broadcasting first makes the shards rank 0's);
        an already sharded parameter (a DTensor) is skipped: it is one tensor split across processes,
        with no replicas to disagree. Frozen weights are not sent: every process loads them from disk."""
        if not self.enabled:
            return
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        params = [p for m in modules if m is not None for p in m.parameters()
                  if p.requires_grad and not isinstance(p, DTensor)]
        with collective_errors(), torch.no_grad():
            for p in params:
                data = p.detach().to(self._group_device())
                dist.broadcast(data, src=0)
                if data.data_ptr() != p.data_ptr():  # on another device than the group's
                    p.data.copy_(data)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over processes (a missing gradient counts as 0).
        Sharded (FSDP) parameters are skipped: FSDP has already averaged theirs."""
        if self.sharded:
            from torch.distributed.tensor import DTensor

            params = [p for p in params if not isinstance(p, DTensor)]
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

    def max_int(self, value: int) -> int:
        """The largest `value` over processes (e.g. how many forward calls each must make under FSDP)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self._group_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

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
        """Wait for every process, patiently (BARRIER_TIMEOUT_S): rank 0 may be working alone."""
        if self.enabled:
            import torch.distributed as dist

            with collective_errors():
                dist.barrier(group=self._barrier_group)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


_LOCKSTEP_ATTRS = ("gf_odg_all_true", "gf_odg_max_int")  # set on a sharded model by Dist.shard


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
