"""What a checkpoint holds beyond the adapter, and putting it back: log Z, optimiser and scheduler,
every RNG stream, the replay buffer, the step and counters. Under several processes each one's RNG
streams and replay buffer are gathered into the checkpoint; under FSDP sharding each one's shard of
the optimiser state is too, and the adapter is gathered whole on save and re-sharded on restore."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gf_odg.distributed import Dist
from gf_odg.errors import CheckpointError
from gf_odg.io import checkpoints
from gf_odg.io.atomic import write_folder

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deterministic_kernels(enabled: bool, device: torch.device) -> tuple[bool, bool]:
    """trainer.deterministic: torch's deterministic kernels, process-wide; returns the previous
    (enabled, warn_only) for `Trainer.close` to put back.

    On the CPU the one kernel of a step that gives different bits from run to run is the backward of
    indexing with a tensor: the shared prompt's KV cache and last hidden state handed to its K samples
    (`prefill`). With more than one thread, `index_put_(accumulate=True)` adds the K gradients with
    atomic float adds in whatever order the threads reach them; the deterministic kernel sorts the
    indices and adds in order. With one thread, or `trainer.share_prompt_prefill=false`, every step
    is already bit-identical. On CUDA cuBLAS needs a fixed workspace as well; a kernel that has no
    deterministic version warns (`warn_only`) and the run goes on."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        log.info("trainer.deterministic: deterministic kernels, %d CPU thread(s)", torch.get_num_threads())
    return previous


@dataclass
class Generators:
    """The trainer's own RNG streams: the behaviour policy's draws, the sampler's, the prompt order."""
    behaviour: torch.Generator
    sample: torch.Generator
    prompt: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int, device: torch.device) -> "Generators":
        # The same seed everywhere gives every process the same LoRA initialisation and prompt order;
        # the samples and the behaviour policy's draws differ per process.
        offset = 1009 * rank
        return cls(torch.Generator().manual_seed(seed + 1 + offset),
                   torch.Generator(device=device).manual_seed(seed + 2 + offset),
                   torch.Generator().manual_seed(seed + 3))


@dataclass
class Progress:
    """The run's counters, saved with the checkpoint and given back by `restore`."""
    step: int = 0
    nonfinite_total: int = 0
    found: set = field(default_factory=set)  # distinct valid completions sampled so far, stripped
    wandb_id: Optional[str] = None


@dataclass
class Checkpointed:
    """The objects a checkpoint saves and restores in place."""
    model: Any
    log_z: Optional[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    replay: Optional[Any]
    generators: Generators
    dist: Dist
    base_path: str
    run_name: str


def rng_state(gens: Generators) -> dict:
    return {"python": random.getstate(), "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(), "behaviour": gens.behaviour.get_state(),
            "sample": gens.sample.get_state().cpu(), "prompt": gens.prompt.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(gens: Generators, rng: dict) -> None:
    random.setstate(_to_python_state(rng["python"]))
    np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    gens.behaviour.set_state(rng["behaviour"])
    gens.sample.set_state(rng["sample"])
    if rng.get("prompt") is not None:
        gens.prompt.set_state(rng["prompt"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def process_state(c: Checkpointed) -> dict:
    """What differs between processes: RNG streams and the replay buffer."""
    return {
        "rng": rng_state(c.generators),
        "replay": c.replay.state_dict() if c.replay is not None else None,
        # FSDP: each process's shard of the optimizer state (the whole state otherwise, in "optimizer")
        "optimizer": c.dist.local_optimizer_state(c.optimizer) if c.dist.sharded else None,
    }


def full_state(c: Checkpointed, progress: Progress, processes: Optional[list] = None) -> dict:
    own = processes[0] if processes else process_state(c)
    return {
        "step": progress.step,
        "log_z": c.log_z.state_dict() if c.log_z is not None else None,
        "optimizer": None if c.dist.sharded else c.optimizer.state_dict(),
        "scheduler": c.scheduler.state_dict(),
        "rng": own["rng"],
        "replay": own["replay"],
        "processes": processes if processes and len(processes) > 1 else None,
        "nonfinite_total": progress.nonfinite_total,
        "found": sorted(progress.found),
        "wandb_id": progress.wandb_id,
        "threads": torch.get_num_threads(),  # bit-identical resumes need the same count (trainer.deterministic)
        "base_model": c.base_path,
        "run_name": c.run_name,
    }


def save(c: Checkpointed, progress: Progress, run_dir: Path, config_yaml: str, keep: int) -> Optional[Path]:
    """Rank 0 writes the checkpoint, with every process's RNG streams and replay buffer in it (all
    processes call this)."""
    processes = c.dist.gather(process_state(c)) if c.dist.enabled else None
    adapter_state = c.dist.full_trainable_state(c.model)  # FSDP: the LoRA weights whole (all ranks)
    path = None
    if c.dist.is_main:
        path = checkpoints.save_checkpoint(run_dir, progress.step, c.model, full_state(c, progress, processes),
                                           config_yaml, keep, adapter_state)
        log.info("checkpoint: %s", path)
    c.dist.barrier()
    return path


def restore(c: Checkpointed, path: Path, device) -> Progress:
    """Put the checkpoint at `path` back into the objects of `c`; the run's counters come back."""
    state = checkpoints.load_state(path)
    if state.get("base_model") != c.base_path:
        raise CheckpointError(
            f"checkpoint {path} was made for base model {state.get('base_model')!r}, not {c.base_path!r}; "
            "resume it with the model it was trained with.")
    _restore_adapter(c, path, device)
    if c.log_z is not None and state["log_z"] is not None:
        c.log_z.load_state_dict(state["log_z"])
    processes = state.get("processes") or None
    saved_world = len(processes) if processes else 1
    if saved_world != c.dist.world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} training process(es); this launch has "
            f"{c.dist.world_size}. Resume it with --num_processes {saved_world}.")
    own = processes[c.dist.rank] if processes else {"rng": state["rng"], "replay": state.get("replay")}
    if (state["optimizer"] is None) != c.dist.sharded:
        how = ("with FSDP sharding; resume it under --config_file configs/accelerate/fsdp.yaml"
               if state["optimizer"] is None
               else "without FSDP sharding; resume it with configs/accelerate/ddp.yaml or as a single process")
        raise CheckpointError(f"checkpoint {path} was written {how}, with {saved_world} process(es).")
    if c.dist.sharded:
        c.dist.load_local_optimizer_state(c.optimizer, own["optimizer"])
    else:
        c.optimizer.load_state_dict(state["optimizer"])
    c.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(c.generators, own["rng"])
    saved_threads = state.get("threads")
    if torch.are_deterministic_algorithms_enabled() and saved_threads not in (None, torch.get_num_threads()):
        log.warning("trainer.deterministic: checkpoint %s was written with %d CPU thread(s), this run has %d; "
                    "it will not continue bit for bit. Set trainer.threads=%d.", path, saved_threads,
                    torch.get_num_threads(), saved_threads)
    if c.replay is not None and own.get("replay") is not None:
        c.replay.load_state_dict(own["replay"])
    log.info("resumed from %s at step %d", path, int(state["step"]))
    return Progress(step=int(state["step"]), nonfinite_total=int(state.get("nonfinite_total", 0)),
                    found=set(state.get("found") or []), wandb_id=state.get("wandb_id"))


def _restore_adapter(c: Checkpointed, path: Path, device) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_file = path / "adapter" / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no adapter weights ({adapter_file} missing).")
    saved = load_file(str(adapter_file), device=str(device))
    if not c.dist.sharded:
        set_peft_model_state_dict(c.model, saved)
        return
    targets = get_peft_model_state_dict(c.model)  # the saved names -> the parameters (shared storage)
    if set(targets) != set(saved):
        raise CheckpointError(f"checkpoint {path}: its adapter's tensors do not match this model's LoRA "
                              "parameters; resume with the model and LoRA settings it was trained with.")
    with torch.no_grad():  # each process keeps its shard of each saved tensor
        for key, target in targets.items():
            c.dist.load_full_into(target, saved[key])


def save_adapter(model, dest: Path, state: Optional[dict] = None) -> Path:
    """The final adapter, loadable by plain `PeftModel.from_pretrained(base, dest)`; written atomically.
    state: the trainable tensors whole, where the model holds only shards of them (FSDP)."""
    extra = {"state_dict": state} if state is not None else {}
    # replace: the trainer refuses an existing adapter up front unless the run is resumed
    return write_folder(dest, lambda tmp: model.save_pretrained(tmp, **extra), exists="replace")


def _numpy_state_to_plain(state) -> list:
    """np.random state with its key array as a list, so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)


def _to_python_state(state):
    """random.getstate() round-trips through torch.save as lists; setstate wants tuples."""
    if isinstance(state, list):
        return tuple(_to_python_state(s) for s in state)
    return state
