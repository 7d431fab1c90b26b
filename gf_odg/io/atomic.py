"""One atomic folder writer: build the folder in a temporary sibling, fsync it, rename it into place.
A crash leaves either nothing or the whole folder, never half of one. What happens when the
destination exists is the caller's explicit choice (`exists=`):

- "replace": the new folder takes its place (checkpoints; a resumed run's final adapter);
- "keep": the existing folder is kept and nothing is built (a converted base model: whoever
  converted it first, this process or another, wins);
- "refuse": an error, nothing is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Literal

from gf_odg.errors import GFODGError

Exists = Literal["replace", "keep", "refuse"]


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_folder(dest: Path, fill: Callable[[Path], None], *, exists: Exists) -> Path:
    """`fill(tmp)` writes the folder's content into `tmp`; then it becomes `dest` (see `exists`)."""
    if exists not in ("replace", "keep", "refuse"):
        raise ValueError(f"exists={exists!r}: expected replace, keep or refuse")
    dest = Path(dest)
    if dest.exists():
        if exists == "keep":
            return dest
        if exists == "refuse":
            raise GFODGError(f"{dest} already exists; it will not be overwritten.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if exists == "replace" and dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, dest)  # fails onto a non-empty folder another process put there meanwhile
            except OSError:
                if not dest.exists():
                    raise
                if exists == "refuse":
                    raise GFODGError(f"{dest} already exists; it will not be overwritten.") from None
                # "keep": another process won the race; keep theirs
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
