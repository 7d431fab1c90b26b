"""--quality-jobs N: each (task, method) of the quality section trains and evaluates in its own
process (`python -m gf_odg.bench.quality_jobs SPEC_JSON`, --threads torch threads each), at most N at
a time. Every method seeds itself, so the rows are those of one process running them in turn (up to
floating-point summation order)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gf_odg.bench.common import Context, child_env, guarded
from gf_odg.bench.quality_train import Settings, quality_row
from gf_odg.errors import GFODGError


def rows_in_processes(ctx: Context, s: Settings) -> list[dict]:
    work = [(t, m) for t in s.tasks for m in s.methods]
    rows: dict[tuple[str, str], dict] = {}
    running: list[tuple[tuple[str, str], subprocess.Popen, Path]] = []
    with tempfile.TemporaryDirectory(prefix="gfodg-quality-jobs-") as tmpdir:
        def reap(block: bool) -> None:
            """Collect one finished child (the first, waiting for it where `block`); stop all on a failure."""
            for item in list(running):
                key, proc, out = item
                if block or proc.poll() is not None:
                    if proc.wait() != 0:
                        for _, other, _ in running:
                            other.kill()
                        raise GFODGError(f"quality {key[0]} {key[1]}: its process exited with {proc.returncode} "
                                         "(its output is above)")
                    rows[key] = json.loads(out.read_text())
                    running.remove(item)
                    return

        for key in work:
            while len(running) >= s.jobs:
                reap(block=False)
                if len(running) >= s.jobs:
                    time.sleep(1.0)
            out = Path(tmpdir) / f"{key[0]}-{key[1]}.json"
            spec = {"model": ctx.model, "device": str(ctx.device), "threads": ctx.threads,
                    "overrides": list(ctx.overrides), "samples_dir": str(ctx.samples_dir) if ctx.samples_dir else None,
                    "settings": dataclasses.asdict(s), "task": key[0], "method": key[1], "out": str(out)}
            proc = subprocess.Popen([sys.executable, "-m", "gf_odg.bench.quality_jobs", json.dumps(spec)],
                                    env=child_env(ctx.threads))
            running.append((key, proc, out))
        while running:
            reap(block=True)
    return [rows[key] for key in work]


def child(spec: dict) -> None:
    """One (task, method) row, written as JSON to spec["out"]."""
    from gf_odg.io.tracking import jsonable

    raw = spec["settings"]
    s = Settings(**{**raw, **{k: tuple(raw[k]) for k in ("tasks", "methods", "extra", "curve_methods", "curve_at")},
                    "budget": "steps", "jobs": 1})
    ctx = Context(model=spec["model"], device=torch.device(spec["device"]), threads=spec["threads"],
                  overrides=tuple(spec["overrides"]),
                  samples_dir=Path(spec["samples_dir"]) if spec["samples_dir"] else None)
    row = quality_row(ctx, s, spec["task"], spec["method"], None)
    Path(spec["out"]).write_text(json.dumps(jsonable(row)))


if __name__ == "__main__":  # one child of rows_in_processes
    spec = json.loads(sys.argv[1])
    sys.exit(guarded(lambda: child(spec), spec["threads"]))
