"""The README's sweep and benchmark commands, on the tiny model. The benchmark runs in this process
through gf_odg.bench (its CLI `main(argv)`), except where the shim scripts/benchmark.py is the point."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_train
from gf_odg.bench import SECTIONS, load_section
from gf_odg.bench.__main__ import main as bench_main
from gf_odg.bench.common import Context, compose
from gf_odg.errors import ConfigError
from gf_odg.io.tracking import read_offline_run


@pytest.mark.slow
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


def _report(out):
    return json.loads((out / "benchmark.json").read_text()), (out / "benchmark.md").read_text()


@pytest.mark.slow
def test_benchmark_sections_report_ratios_of_their_own_measured_rows(tmp_path):
    """prefill, memory and overhead on the tiny model: every ratio is the quotient of the two figures
    measured in the same row, and benchmark.md shows the figures benchmark.json holds."""
    out = tmp_path / "bench"
    assert bench_main(["prefill", "memory", "overhead", "--model", "tiny-random", "--quick", "--out", str(out)]) == 0
    report, md = _report(out)
    assert report["sections"] == ["prefill", "memory", "overhead"] and report["model"] == "tiny-random"

    rows = {r["prompt"]: r for r in report["prefill"]}
    assert set(rows) == {"rng (chat prompt)", "few-shot (long prompt)"} and all(r["K"] == 4 for r in rows.values())
    assert rows["few-shot (long prompt)"]["prompt_tokens"] >= 200 > rows["rng (chat prompt)"]["prompt_tokens"]
    for name, r in rows.items():
        assert math.isclose(r["speedup_sample"], r["sample_s_per_sample"] / r["sample_s_shared"])
        assert math.isclose(r["speedup_score"], r["score_s_per_sample"] / r["score_s_shared"])
        assert math.isclose(r["speedup_step"], (r["sample_s_per_sample"] + r["score_s_per_sample"])
                            / (r["sample_s_shared"] + r["score_s_shared"]))
        assert (f"| {name} | {r['prompt_tokens']} | 4 | {r['sample_s_shared']:.3f} / {r['sample_s_per_sample']:.3f} | "
                f"{r['score_s_shared']:.3f} / {r['score_s_per_sample']:.3f} | {r['speedup_step']:.1f}x |") in md

    m = report["memory"]
    assert (m["vocab"], m["batch"], m["completion_tokens"]) == (4096, 2, 8)  # --quick sizes
    assert math.isclose(m["ratio"], m["peak_mb_selective"] / m["peak_mb_naive"])
    assert f"selective chunked {m['peak_mb_selective']:.0f} MB, ratio {m['ratio']:.3f}" in md

    o = report["overhead"]
    assert o["K"] == 4 and math.isclose(o["overhead_ratio"], o["ours_step_s"] / o["raw_step_s"])
    # --quick times one step after the warm-up: its parts are that step's, inside its wall time.
    parts = [o["time/sample"], o["time/reward"], o["time/score_backward"]]
    assert all(p > 0 for p in parts) and sum(parts) <= o["ours_step_s"]
    assert f"ratio {o['overhead_ratio']:.2f}" in md and md.startswith("Machine:")
    assert (out / "benchmark.png").stat().st_size > 0


@pytest.mark.slow
def test_benchmark_memory_selective_scoring_holds_less_than_the_full_logits(tmp_path):
    """1024 scored tokens over a 16k vocabulary: the full log_softmax's peak holds at least the 64 MiB
    of [B, T, V] float32 logits; the selective scoring, 128 rows (an eighth) at a time, well under half
    of the full one's peak (measured on a 2-core CPU: 259 MB and 80 MB, ratio 0.31). With only two
    chunks (256 tokens) it saved nothing on a CPU (139 MB against 130 MB)."""
    options = argparse.Namespace(memory_vocab=16384, memory_batch=8, memory_tokens=128)
    row = load_section("memory").run(Context(model="tiny-random", device=torch.device("cpu"), options=options))
    assert row["peak_mb_naive"] >= 8 * 128 * 16384 * 4 / 2**20, row
    assert math.isclose(row["ratio"], row["peak_mb_selective"] / row["peak_mb_naive"]) and row["ratio"] < 0.5, row


@pytest.mark.slow
def test_benchmark_determinism_times_both_kernels_in_one_trainer_and_puts_the_flag_back(tmp_path, monkeypatch):
    from gf_odg.training.trainer import Trainer

    flags, step = [], Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda self: flags.append(torch.are_deterministic_algorithms_enabled())
                        or step(self))
    out = tmp_path / "bench"
    assert bench_main(["determinism", "--model", "tiny-random", "--quick", "--out", str(out)]) == 0
    assert flags == [False, False, True]  # warm-up, then default and deterministic steps alternated
    assert not torch.are_deterministic_algorithms_enabled()
    report, md = _report(out)
    r = report["determinism"]
    assert (r["K"], r["steps_each"], r["threads"]) == (4, 1, 1)
    assert r["default_step_s"] > 0 and r["deterministic_step_s"] > 0
    assert math.isclose(r["ratio"], r["deterministic_step_s"] / r["default_step_s"])
    assert f"default {r['default_step_s']:.3f} s, deterministic {r['deterministic_step_s']:.3f} s" in md


def test_benchmark_section_registry_runs_a_module_that_only_has_run(tmp_path, monkeypatch):
    """The interface another section (gpu) relies on: a module with `run(ctx)` alone, named in
    SECTIONS, is chosen by name, gets the context, and its rows land in benchmark.json and, without a
    `markdown` of its own, as a table in benchmark.md. A section whose module is absent is one line."""
    (tmp_path / "bench_probe_section.py").write_text(
        "def run(ctx):\n"
        "    return [{'K': k, 'threads': ctx.threads, 'model': ctx.model} for k in ctx.ks]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(SECTIONS, "probe", "bench_probe_section")
    monkeypatch.setitem(SECTIONS, "absent", "gf_odg.bench.no_such_section")
    assert SECTIONS["gpu"] == "gf_odg.bench.gpu"
    out = tmp_path / "bench"
    assert bench_main(["probe", "--model", "tiny-random", "--ks", "3,5", "--out", str(out)]) == 0
    report, md = _report(out)
    assert report["probe"] == [{"K": 3, "threads": 1, "model": "tiny-random"},
                               {"K": 5, "threads": 1, "model": "tiny-random"}]
    assert "| K | threads | model |\n|---|---|---|\n| 3 | 1 | tiny-random |\n| 5 | 1 | tiny-random |" in md
    with pytest.raises(ConfigError, match="its module gf_odg.bench.no_such_section is not in this checkout"):
        load_section("absent")


@pytest.mark.parametrize("args, message", [
    (["quality", "--quality-steps", "keywords.ppo=3"], "'keywords.ppo=3' is not TASK=N"),
    (["quality", "--quality-tasks", "keywords", "--quality-steps", "rng=3"], "no count for keywords: add keywords=N"),
    (["quality", "--quality-methods", "tb,ppo"], "--quality-methods: unknown ppo"),
    (["quality", "--quality-curve-at", "4,x"], "--quality-curve-at: '4,x' is not a comma-separated list"),
    (["quality", "--quality-jobs", "0"], "--quality-jobs must be >= 1"),
    (["quality", "--quality-jobs", "2", "--quality-budget", "time"], "--quality-jobs > 1 needs --quality-budget steps"),
    (["quality", "--quality-budget", "time", "--quality-methods", "tb"], "add grpo to --quality-methods"),
    (["prefill", "--ks", "4,x"], "--ks: '4,x' is not a comma-separated list of positive integers"),
    (["prefil"], "unknown benchmark section prefil; choose from: prefill,"),
], ids=["unknown-method-count", "missing-task-count", "unknown-method", "curve-at", "jobs", "jobs-time",
        "time-without-grpo", "ks", "section"])
def test_benchmark_flags_are_checked_before_any_model_loads(tmp_path, capsys, args, message):
    out = tmp_path / "bench"
    assert bench_main([*args, "--model", "tiny-random", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("task", ["rng", "keywords"])
def test_benchmark_rloo_and_grpo_rows_train_on_policy(task):
    """RLOO's loss is unbiased only for samples from the policy itself: its quality rows (and GRPO's,
    which share its config) run without tempering, epsilon or replay whatever the task's experiment
    says; TB keeps the experiment's exploration."""
    quality = load_section("quality")
    s = quality.Settings(tasks=(task,), steps={task: 2}, n_eval={task: 8}, methods=quality.METHODS)
    for method in ("rloo", "grpo"):
        cfg = compose(["model=tiny-random", *quality.method_overrides(task, method, s)])
        e = cfg.exploration
        assert cfg.objective.name == "rloo" and cfg.objective.ref_weight == 0, method
        assert (e.p_temper, e.epsilon, e.replay.enabled) == (0.0, 0.0, False), method
    tb = compose(["model=tiny-random", *quality.method_overrides(task, "tb", s)])
    assert tb.objective.name == "tb" and tb.exploration.p_temper == 0.5 and tb.exploration.epsilon == 0.05


@pytest.mark.slow
def test_benchmark_gives_a_method_its_own_step_count(tmp_path):
    out = tmp_path / "bench"
    assert bench_main(["quality", "--model", "tiny-random", "--quick", "--quality-tasks", "rng",
                       "--quality-methods", "tb,vargrad", "--quality-steps", "rng=2,rng.vargrad=3",
                       "--quality-eval", "rng=8", "--out", str(out)]) == 0
    rows = _report(out)[0]["quality"]
    assert {r["method"]: (r["steps"], r["eval_samples"], r["eval"]["n_samples"]) for r in rows} == \
        {"tb": (2, 8, 8), "vargrad": (3, 8, 8)}
    for r in rows:
        assert r["K"] == 4 and r["prompts_per_step"] == 1 and "curve" not in r  # --quick's batch, no curve asked
        assert r["step_s"] <= r["train_step_s_total"] <= r["train_s"]


@pytest.mark.slow
def test_benchmark_quality_jobs_give_the_rows_of_one_process(tmp_path):
    """--quality-jobs 2 runs each method in its own process: the same rows (steps, curve points at
    --quality-curve-at, scores) as the methods run in turn in one process."""
    common = ["quality", "--model", "tiny-random", "--quick", "--quality-tasks", "rng", "--quality-methods", "tb,grpo",
              "--quality-steps", "rng=3", "--quality-eval", "rng=8", "--quality-curve-at", "1,2",
              "--quality-curve-methods", "grpo"]
    rows = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"bench{jobs}"
        assert bench_main([*common, "--quality-jobs", jobs, "--out", str(out)]) == 0
        rows[jobs] = _report(out)[0]["quality"]
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


@pytest.mark.slow
def test_benchmark_quality_from_merges_runs_and_rematches_against_one_grpo_path(tmp_path, capsys):
    """--quality-from (through the scripts/benchmark.py shim, as the README runs it): a variant run
    later against the GRPO path of an earlier run, no training; a method present in two runs is
    named by the overrides that differ."""
    first = _quality_report(tmp_path / "a" / "benchmark.json",
                            [_quality_row("vargrad", 1.0, 40),
                             _quality_row("grpo", 3.0, 10, curve=[(2, 0.0, 10), (4, 2.0, 30), (6, 3.0, 10)])],
                            ["objective.beta=0.25"])
    second = _quality_report(tmp_path / "b" / "benchmark.json", [_quality_row("vargrad", 3.5, 50)],
                             ["objective.beta=0.25", "objective.ref_weight=0.5"])
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quality-from", first, second,
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((out / "benchmark.json").read_text())["quality"]}
    assert set(rows) == {f"vargrad ({first})", "vargrad (objective.ref_weight=0.5)", "grpo"}
    assert rows[f"vargrad ({first})"]["matched"]["grpo_n_above_threshold"] == 20.0  # halfway from 10 to 30
    above = rows["vargrad (objective.ref_weight=0.5)"]["above_grpo_path"]
    assert (above["grpo_step"], above["grpo_n_above_threshold"], above["ratio"]) == (6, 10, 5.0)
    text = (out / "benchmark.md").read_text()
    assert "| keywords | vargrad (objective.ref_weight=0.5) | 3.500 / 3.000 | 50 / 10 | 5.00x |" in text
    assert f"Rows from: vargrad ({first}) <- {first} (objective.beta=0.25);" in text
    # Rows evaluated on different sample counts are not comparable; a missing file is named.
    other = _quality_report(tmp_path / "c" / "benchmark.json", [_quality_row("tb", 1.0, 5, samples=128)], [])
    for paths, message in (([first, other], "keywords rows were evaluated differently"),
                           ([first, str(tmp_path / "nope.json")], "cannot read " + str(tmp_path / "nope.json"))):
        assert bench_main(["--quality-from", *paths, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_benchmark_quality_jobs_stop_with_one_line_when_a_method_fails(tmp_path, capfd):
    """A child process that fails (here: an override no config has) stops the run: the key named by
    the child, the method by the parent, no traceback, non-zero exit, no report written."""
    out = tmp_path / "bench"
    assert bench_main(["quality", "--model", "tiny-random", "--quick", "--quality-tasks", "rng",
                       "--quality-methods", "tb,vargrad", "--quality-steps", "rng=2", "--quality-eval", "rng=8",
                       "--quality-jobs", "2", "--quality-overrides", "trainer.no_such_key=1", "--out", str(out)]) == 2
    err = capfd.readouterr().err
    assert "quality rng tb: its process exited with 2" in err or "quality rng vargrad: its process exited with 2" in err
    assert "config: Could not override 'trainer.no_such_key'" in err and "Traceback" not in err, err[-3000:]
    assert not (out / "benchmark.json").exists()
