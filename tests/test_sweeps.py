"""Hydra sweepers and launchers on the tiny model: Optuna trials, submitit local jobs, ready configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import CONFIGS, ROOT, run_train
from gf_odg.config.schema import register_configs
from gf_odg.io.tracking import read_offline_run

QUICK = ["model=tiny-random", "trainer.max_steps=1", "trainer.samples_per_prompt=4", "task.evaluation.n_samples=8",
         "task.evaluation.before_training=false", "trainer.progress=false", "trainer.threads=1"]


@pytest.mark.slow
def test_a_two_trial_optuna_sweep_reports_its_best_value(tmp_path):
    result = run_train(["-m", "hparams_search=rng_optuna", "hydra.sweeper.n_trials=2", "logger=none", *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert trials == ["0", "1"]
    values = [json.loads((tmp_path / "multirun" / t / "eval.json").read_text())["after"]["exact_kl"] for t in trials]
    report = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert report["best_value"] == pytest.approx(min(values))  # minimised, as configured
    assert set(report["best_params"]) == {"trainer.lr", "trainer.log_z_lr", "exploration.p_temper",
                                          "exploration.epsilon"}


@pytest.mark.slow
def test_two_jobs_through_the_submitit_local_launcher(tmp_path):
    result = run_train(["-m", "hydra/launcher=local", "objective=tb,vargrad", "logger.mode=offline", *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        folder = tmp_path / "multirun" / job
        assert (folder / "eval.json").is_file()
        wandb_file = next((folder / "wandb").glob("offline-run-*/run-*.wandb"))
        assert read_offline_run(wandb_file)["exit_code"] == 0
    assert len(list((tmp_path / "adapted").iterdir())) == 2


@pytest.mark.parametrize("name", ["rng_optuna", "keywords_optuna"])
def test_hparams_search_configs_compose(name):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="main", overrides=[f"hparams_search={name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.params and cfg.optimize_metric.startswith("eval_after/")
    if name == "keywords_optuna":
        assert cfg.task.name == "keywords" and cfg.objective.ref_weight == 1.0


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_launcher_configs_compose(launcher):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="main", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "submitit_launcher" in cfg.hydra.launcher._target_


@pytest.mark.slow
def test_a_finished_job_leaves_no_model_behind(tmp_path):
    """Hydra's basic launcher runs sweep jobs one after another in one process: each job's model must go.
    (In a subprocess: pytest's log capture keeps records whose tracebacks would hold the model.)"""
    script = f"""
import gc, sys, weakref
sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]
from pathlib import Path
from conftest import TINY, compose_cfg
from gf_odg.training.trainer import Trainer
import train
refs = []
setup = Trainer.setup
def recording_setup(self):
    setup(self)
    refs.append(weakref.ref(self.model))
Trainer.setup = recording_setup
cfg = compose_cfg([*TINY, "trainer.max_steps=1", "trainer.samples_per_prompt=4", "task.evaluation.n_samples=4"],
                  Path({str(tmp_path)!r}))
result = train.run(cfg, Path({str(tmp_path / 'run')!r}))
gc.collect()
print("STEPS", result["steps"], "MODELS", len(refs), "ALIVE", sum(r() is not None for r in refs))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STEPS 1 MODELS 1 ALIVE 0" in out.stdout
