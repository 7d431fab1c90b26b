"""Atomic checkpoints under `paths.checkpoints/<run_name>/`.

A checkpoint is a folder `step_000120/` holding the LoRA adapter (`adapter/`, loadable by plain
`PeftModel.from_pretrained`), `state.pt` (log Z, optimiser, scheduler, RNG states, replay buffer,
step, W&B run id: plain tensors and containers, loaded with `weights_only=True`), `config.yaml`
(the resolved config) and `COMPLETE`, written last. It is built in a temporary sibling folder,
flushed, then renamed into place; the `latest` pointer moves after it. A folder without
`COMPLETE` (a crash mid-write) is never picked for resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from gf_odg.errors import CheckpointError
from gf_odg.io.atomic import write_atomic_text, write_folder


def write_folder_atomic(dest: Path, fill: Callable[[Path], None]) -> Path:
    """A folder written atomically, replacing one already there (scripts/prepare_model.py imports it)."""
    return write_folder(dest, fill, exists="replace")


def save_checkpoint(run_dir: Path, step: int, model, state: dict, config_yaml: str, keep: int,
                    adapter_state: Optional[dict] = None) -> Path:
    """adapter_state: the trainable tensors whole, where the model holds only shards of them (FSDP)."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter", **({"state_dict": adapter_state} if adapter_state is not None else {}))
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        (tmp / "COMPLETE").write_text(json.dumps({"step": step}), encoding="utf-8")

    dest = write_folder(run_dir / f"step_{step:06d}", fill, exists="replace")
    write_atomic_text(run_dir / "latest", dest.name + "\n")
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def complete_checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob("step_*") if p.is_dir() and (p / "COMPLETE").is_file()
             and (p / "state.pt").is_file() and (p / "adapter").is_dir()]
    return sorted(found, key=lambda p: p.name)


def find_resume(resume: str, checkpoints_root: Path, run_name: str) -> Optional[Path]:
    """`auto`: the newest complete checkpoint of this run name (None if there is none); else a path."""
    if resume == "auto":
        found = complete_checkpoints(checkpoints_root / run_name)
        return found[-1] if found else None
    path = Path(resume)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "COMPLETE").is_file() or not (path / "state.pt").is_file():
        raise CheckpointError(
            f"resume={resume!r}: {path} is not a complete checkpoint (expected a step_* folder with "
            "COMPLETE, state.pt and adapter/). Use resume=auto with the run's run_name, or another path."
        )
    return path


def load_state(path: Path) -> dict:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {str(err)[:200]}); "
            "resume from an earlier one with resume=<path>."
        ) from None
