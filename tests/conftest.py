"""Shared fixtures: composed configs, the tiny random model, and run folders under tmp_path.

Base models are prepared once into the repository's models/base_models/ (git-ignored) and reused;
everything a test writes (checkpoints, adapters, run dirs) goes under its tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on 2 cores, torch threads competing with the W&B service or a second process
# were measured up to 10x slower than a single thread.
torch.set_num_threads(1)


def compose_cfg(overrides: list[str] | None = None, tmp_path: Path | None = None):
    from gf_odg.config.schema import register_configs

    register_configs()
    overrides = list(overrides or [])
    if tmp_path is not None:
        overrides += [f"paths.checkpoints={tmp_path}/checkpoints", f"paths.adapted_models={tmp_path}/adapted"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="main", overrides=overrides)
    if cfg.run_name is None:
        cfg.run_name = "test-run"
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    def make(*overrides: str):
        return compose_cfg(list(overrides), tmp_path)

    return make


# objective=tb, exploration=default: the configuration these tests were written for (they check TB's
# log Z, and FSDP refuses the default's ratio replay); later overrides in a test win over these.
TINY = ["model=tiny-random", "objective=tb", "exploration=default", "logger=none", "trainer.progress=false",
        "task.evaluation.n_samples=32", "task.evaluation.before_training=false", "task.evaluation.plots=false"]


@pytest.fixture(scope="session")
def tiny_policy():
    """(model, tokenizer) of the tiny random Llama with fresh LoRA, fp32 (shared: do not train it)."""
    from gf_odg.model.loading import load_policy

    cfg = compose_cfg(["model=tiny-random"])
    with torch.random.fork_rng():  # the LoRA init must not depend on which tests this worker ran first
        torch.manual_seed(0)
        model, tokenizer, _ = load_policy(cfg.model, cfg.paths, torch.device("cpu"))
    return model, tokenizer


def run_train(args: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run train.py as a user would, with run outputs under tmp_path."""
    flags = [a for a in args if a.startswith("-") and not a.startswith("~")]
    overrides = [a for a in args if a not in flags]  # after ours, so that a test's own paths win
    cmd = [sys.executable, str(ROOT / "train.py"), *flags,
           f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multirun",
           f"paths.checkpoints={tmp_path}/checkpoints", f"paths.adapted_models={tmp_path}/adapted", *overrides]
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def to_container(cfg):
    return OmegaConf.to_container(cfg, resolve=True)

