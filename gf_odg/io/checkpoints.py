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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from gf_odg.errors import CheckpointError


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def write_atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_folder_atomic(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of `dest`, fsync it, then rename it into place (replacing nothing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def save_checkpoint(run_dir: Path, step: int, model, state: dict, config_yaml: str, keep: int,
                    adapter_state: Optional[dict] = None) -> Path:
    """adapter_state: the trainable tensors whole, where the model holds only shards of them (FSDP)."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter", **({"state_dict": adapter_state} if adapter_state is not None else {}))
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        (tmp / "COMPLETE").write_text(json.dumps({"step": step}), encoding="utf-8")

    dest = write_folder_atomic(run_dir / f"step_{step:06d}", fill)
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
