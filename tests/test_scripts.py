"""The README's sweep and benchmark commands, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_train
from gf_odg.io.tracking import read_offline_run


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


def _quality_report(path, rows, overrides):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": "CPU", "model": "tiny-random", "date": "2026-11-26T00:00:00",
                                "quality": rows, "quality_overrides": overrides}))
    return str(path)


def _quality_row(method, score, above, curve=None, samples=64):
    point = {"score_mean": score, "n_above_threshold": above, "semantic_diversity": 0.5, "unique_fraction": 1.0,
             "valid_fraction": 1.0}
    row = {"task": "keywords", "method": method, "steps": 4, "K": 4, "prompts_per_step": 1, "eval_samples": samples,
           "threshold": 2.0, "step_s": 1.0, "train_valid_fraction": 1.0, "eval": point}
    if curve:
        row["curve"] = [{"step": s, **point, "score_mean": sc, "n_above_threshold": n} for s, sc, n in curve]
    return row


def test_benchmark_quality_from_merges_runs_and_rematches_against_one_grpo_path(tmp_path):
    """--quality-from: a variant run later against the GRPO path of an earlier run, no training;
    a method present in two runs is named by the overrides that differ."""
    first = _quality_report(tmp_path / "a" / "benchmark.json",
                            [_quality_row("vargrad", 1.0, 40),
                             _quality_row("grpo", 3.0, 10, curve=[(2, 0.0, 10), (4, 2.0, 30), (6, 3.0, 10)])],
                            ["objective.beta=0.25"])
    second = _quality_report(tmp_path / "b" / "benchmark.json", [_quality_row("vargrad", 3.5, 50)],
                             ["objective.beta=0.25", "objective.ref_weight=0.5"])
    out = tmp_path / "merged"
    script = [sys.executable, str(ROOT / "scripts" / "benchmark.py")]
    result = subprocess.run([*script, "--quality-from", first, second, "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((out / "benchmark.json").read_text())["quality"]}
    assert set(rows) == {f"vargrad ({first})", "vargrad (objective.ref_weight=0.5)", "grpo"}
    assert rows[f"vargrad ({first})"]["matched"]["grpo_n_above_threshold"] == 20.0  # halfway from 10 to 30
    above = rows["vargrad (objective.ref_weight=0.5)"]["above_grpo_path"]
    assert (above["grpo_step"], above["grpo_n_above_threshold"], above["ratio"]) == (6, 10, 5.0)
    text = (out / "benchmark.md").read_text()
    assert "| keywords | vargrad (objective.ref_weight=0.5) | 3.500 / 3.000 | 50 / 10 | 5.00x |" in text
    # Rows evaluated on different sample counts are not comparable; a missing file is named.
    other = _quality_report(tmp_path / "c" / "benchmark.json", [_quality_row("tb", 1.0, 5, samples=128)], [])
    for paths, message in (([first, other], "keywords rows were evaluated differently"),
                           ([first, str(tmp_path / "nope.json")], "cannot read " + str(tmp_path / "nope.json"))):
        result = subprocess.run([*script, "--quality-from", *paths, "--out", str(tmp_path / "bad")], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "bad").exists()


def test_benchmark_quality_jobs_stop_with_one_line_when_a_method_fails(tmp_path):
    """A child process that fails (here: an override no config has) stops the run: the key named by
    the child, the method by the parent, no traceback, non-zero exit, no report written."""
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny-random", "--quick",
                             "--sections", "quality", "--quality-tasks", "rng", "--quality-methods", "tb,vargrad",
                             "--quality-steps", "rng=2", "--quality-eval", "rng=8", "--quality-jobs", "2",
                             "--quality-overrides", "trainer.no_such_key=1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode != 0
    assert "quality rng tb: its process exited with" in result.stderr or \
        "quality rng vargrad: its process exited with" in result.stderr, result.stderr[-3000:]
    assert "config: Could not override 'trainer.no_such_key'" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
