"""What every benchmark section shares: the run's settings (`Context`), config composition, model
and trainer set-up, and timing."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gf_odg.errors import ConfigError
from gf_odg.startup import ROOT

CONFIG_DIR = ROOT / "configs"
FEW_SHOT = ("You are a random number generator. Each answer is one integer between 0 and 100, chosen uniformly "
            "at random, written with digits only and nothing else.\n\n")


@dataclass(frozen=True)
class Context:
    """One benchmark run's settings, passed to every section's `run(ctx)`."""

    model: str                      # a configs/model/*.yaml name
    device: torch.device
    ks: tuple[int, ...] = (16, 32)  # completions per prompt
    repeats: int = 3                # timed repeats after a warm-up
    threads: int = 1                # torch threads (this process and each child)
    overrides: tuple[str, ...] = ()  # Hydra overrides applied to every model a section loads
    out: Path = ROOT / "outputs" / "benchmark"
    samples_dir: Path | None = None  # where quality evaluations write their completions; None: nowhere
    quick: bool = False             # tiny sizes: checks that the sections run
    options: argparse.Namespace = field(default_factory=argparse.Namespace)  # every parsed flag


def compose(overrides: list[str]):
    """The main config with these overrides; a mistyped override is one line naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from gf_odg.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name="main", overrides=overrides)
        except HydraException as err:
            message = " ".join(str(err).split())  # Hydra's message spans lines; a user's error is one
            raise ConfigError(f"config: {message} (overrides: {' '.join(overrides)})") from None


def load(ctx: Context, extra: list[str] = ()):
    """(cfg, policy with fresh LoRA, tokenizer) of ctx.model under ctx.overrides + extra."""
    from gf_odg.model.loading import load_policy

    cfg = compose([f"model={ctx.model}", *ctx.overrides, *extra])
    model, tokenizer, _ = load_policy(cfg.model, cfg.paths, ctx.device)
    return cfg, model, tokenizer


def our_trainer(ctx: Context, extra: list[str], tmp: Path, run_name: str = "benchmark"):
    """A set-up Trainer on ctx.model, writing nothing outside `tmp`, no logger, no progress bar."""
    from gf_odg.training.trainer import Trainer

    cfg = compose([f"model={ctx.model}", *ctx.overrides, "logger=none", "trainer.progress=false",
                   "trainer.max_steps=100000", f"run_name={run_name}", f"trainer.device={ctx.device}",
                   f"paths.checkpoints={tmp}/checkpoints", f"paths.adapted_models={tmp}/adapted", *extra])
    trainer = Trainer(cfg, tmp / "run")
    trainer.setup()
    return trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_steps(trainer, repeats: int) -> tuple[float, float, list[dict]]:
    """Median seconds of one `trainer.step()` after a warm-up step, the mean completion length
    (tokens, EOS included) over the timed steps, and their metrics."""
    times, lengths, metrics = [], [], []
    for i in range(repeats + 1):
        sync(trainer.device)
        t0 = time.perf_counter()
        m = trainer.step()
        sync(trainer.device)
        if i:
            times.append(time.perf_counter() - t0)
            lengths += trainer.last_batch.traj.lengths.tolist()
            metrics.append(m)
    return statistics.median(times), statistics.fmean(lengths), metrics


def long_prompt(tokenizer, min_tokens: int = 200) -> str:
    """A few-shot rng prompt of at least `min_tokens` tokens (seeded: the same text every run)."""
    rng = random.Random(0)
    text, n = FEW_SHOT, 1
    while len(tokenizer.encode(text)) < min_tokens:
        text += f"Question {n}: give me a random integer between 0 and 100.\nAnswer: {rng.randint(0, 100)}\n\n"
        n += 1
    return text + f"Question {n}: give me a random integer between 0 and 100.\nAnswer:"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def commit() -> str:
    """The checkout's commit (12 hex digits), "+ uncommitted changes" where tracked files differ from
    it; "unknown" outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def child_env(threads: int = 1) -> dict[str, str]:
    """The environment of a section's child process: its thread count, no W&B, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def guarded(fn: Callable[[], object], threads: int) -> int:
    """Run an entry point (the CLI or a section's child process) with `threads` torch threads and
    libraries quiet; a user's mistake (GFODGError) is one line on stderr and exit status 2."""
    import sys

    from gf_odg.errors import GFODGError
    from gf_odg.startup import prepare_environment, quiet_libraries

    prepare_environment()
    torch.set_num_threads(threads)
    quiet_libraries()
    try:
        fn()
    except GFODGError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
