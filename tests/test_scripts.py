"""The README's sweep and benchmark commands, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_train
from gf_odg.tracking import read_offline_run


def test_a_two_by_two_multirun_gives_four_finished_runs(tmp_path):
    result = run_train(["-m", "model=tiny-random", "objective=tb,vargrad", "seed=0,1", "trainer.max_steps=2",
                        "trainer.samples_per_prompt=4", "task.evaluation.n_samples=8",
                        "task.evaluation.before_training=false", "trainer.progress=false", "logger.mode=offline"],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    run_ids = set()
    for job in jobs:
        assert (job / "eval.json").is_file()
        wandb_file = next((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert read_offline_run(wandb_file)["exit_code"] == 0
        run_ids.add(wandb_file.stem)
    assert len(run_ids) == 4
    assert len(list((tmp_path / "adapted").iterdir())) == 4  # one adapter per job, none overwritten


def test_benchmark_script_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny-random", "--quick",
                             "--sections", "prefill,memory,overhead", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert {r["prompt"] for r in report["prefill"]} == {"rng (chat prompt)", "few-shot (long prompt)"}
    assert all(r["speedup_step"] > 0 for r in report["prefill"])
    assert report["memory"]["peak_mb_naive"] > 0 and report["overhead"]["overhead_ratio"] > 0
    assert (out / "benchmark.md").read_text().startswith("Machine:") and (out / "benchmark.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--quality-steps", "keywords.ppo=3"], "'keywords.ppo=3' is not TASK=N"),
    (["--quality-tasks", "keywords", "--quality-steps", "rng=3"], "no count for keywords: add keywords=N"),
    (["--quality-methods", "tb,ppo"], "--quality-methods: unknown ppo"),
    (["--quality-curve-at", "4,x"], "--quality-curve-at: '4,x' is not a comma-separated list"),
    (["--quality-jobs", "0"], "--quality-jobs must be >= 1"),
    (["--quality-jobs", "2", "--quality-budget", "time"], "--quality-jobs > 1 needs --quality-budget steps"),
], ids=["unknown-method-count", "missing-task-count", "unknown-method", "curve-at", "jobs", "jobs-time"])
def test_benchmark_quality_flags_are_checked_before_any_model_loads(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny-random",
                             "--sections", "quality", *args, "--out", str(tmp_path / "bench")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "bench").exists()


def test_benchmark_gives_a_method_its_own_step_count(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny-random", "--quick",
                             "--sections", "quality", "--quality-tasks", "rng", "--quality-methods", "tb,vargrad",
                             "--quality-steps", "rng=2,rng.vargrad=3", "--quality-eval", "rng=8", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "benchmark.json").read_text())["quality"]
    assert {r["method"]: (r["steps"], r["eval_samples"]) for r in rows} == {"tb": (2, 8), "vargrad": (3, 8)}


def test_benchmark_quality_jobs_give_the_rows_of_one_process(tmp_path):
    """--quality-jobs 2 runs each method in its own process: the same rows (steps, curve points at
    --quality-curve-at, scores) as the methods run in turn in one process."""
    common = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny-random", "--quick",
              "--sections", "quality", "--quality-tasks", "rng", "--quality-methods", "tb,grpo",
              "--quality-steps", "rng=3", "--quality-eval", "rng=8", "--quality-curve-at", "1,2",
              "--quality-curve-methods", "grpo"]
    rows = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"bench{jobs}"
        result = subprocess.run([*common, "--quality-jobs", jobs, "--out", str(out)], cwd=ROOT, capture_output=True,
                                text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
        assert result.returncode == 0, result.stderr[-3000:]
        rows[jobs] = json.loads((out / "benchmark.json").read_text())["quality"]
    for one, two in zip(rows["1"], rows["2"], strict=True):
        assert (one["method"], one["steps"]) == (two["method"], two["steps"])
        assert abs(one["eval"]["score_mean"] - two["eval"]["score_mean"]) < 1e-3
        assert [c["step"] for c in one.get("curve", [])] == [c["step"] for c in two.get("curve", [])]
    assert [c["step"] for c in rows["2"][1]["curve"]] == [1, 2, 3]  # grpo: 1 and 2, then its final policy
