"""scripts/benchmark.py's TRL comparisons (sections trl_step and quality) on the tiny model: they run
end to end and write sane figures. The measurements themselves are benchmarks, not tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import ROOT

METHODS = ["base", "tb", "vargrad", "rloo", "grpo"]


def test_trl_step_and_quality_sections_run_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny-random", "--quick",
                             "--sections", "trl_step,quality", "--quality-tasks", "rng",
                             "--quality-methods", ",".join(METHODS), "--quality-budget", "time",
                             "--quality-curve", "1", "--quality-curve-methods", "grpo", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())

    (step,) = report["trl_step"]
    assert step["K"] == 4 and step["prompt_tokens"] > 0 and step["max_new_tokens"] == 4
    for key in ("ours_masked_step_s", "ours_unmasked_step_s", "trl_step_s"):
        assert math.isfinite(step[key]) and step[key] > 0, key
    assert math.isclose(step["ratio_masked"], step["ours_masked_step_s"] / step["trl_step_s"])
    assert math.isclose(step["ratio_unmasked"], step["ours_unmasked_step_s"] / step["trl_step_s"])
    assert 1 <= step["ours_masked_length_mean"] <= 4 and 1 <= step["trl_length_mean"] <= 4
    assert step["trl_prompt_tokens_match_ours"] is True and step["trl_constraint_mask"] is False
    assert step["trl_beta"] == 0.0 and step["trl_lora_dtype"] == "float32"

    rows = {r["method"]: r for r in report["quality"]}
    assert sorted(rows) == sorted(METHODS) and all(r["task"] == "rng" for r in rows.values())
    n = rows["tb"]["eval_samples"]
    for method, row in rows.items():
        e = row["eval"]
        assert e["n_samples"] == n, method
        assert 0.0 <= e["valid_fraction"] <= 1.0 and 0 <= e["unique_fraction"] <= 1.0
        assert 0 <= e["n_above_threshold"] <= min(n, 101) and e["n_above_threshold"] == e["distinct"]
        assert 0 <= e["exact_kl"] < 20 and 0 <= e["exact_tv"] <= 1.0
        assert isinstance(e["semantic_diversity"], float)
        assert 0 <= e["n_above_threshold_by_meaning"] <= e["n_above_threshold"]
        assert 0.0 <= row["eval_unmasked"]["valid_fraction"] <= 1.0
        if method == "base":
            assert row["steps"] == 0 and row["step_s"] is None
        else:
            assert math.isfinite(row["step_s"]) and row["step_s"] > 0, method
    # --quality-budget time: GRPO's 2 steps set the seconds; ours take as many steps as fit at their probed pace.
    budget = rows["grpo"]["train_step_s_total"]
    assert rows["grpo"]["steps"] == 2 and budget > 0
    for method in ("tb", "vargrad", "rloo"):
        row = rows[method]
        assert row["budget_s"] == budget and row["probe_step_s"] > 0
        assert row["steps"] == max(1, int(budget // row["probe_step_s"])), method
        assert "curve" not in row  # --quality-curve-methods grpo
    # --quality-curve 1: GRPO evaluated after step 1, and its final policy as the path's last point.
    assert [p["step"] for p in rows["grpo"]["curve"]] == [1, 2]
    assert rows["grpo"]["curve"][-1]["n_above_threshold"] == rows["grpo"]["eval"]["n_above_threshold"]
    assert rows["grpo"]["sampled_with_constraint_mask"] is False and rows["tb"]["sampled_with_constraint_mask"] is True

    # Every evaluation's completions, one file each: the final policies and GRPO's curve point at step 1.
    samples = out / "quality_samples"
    expected = {f"rng-{m}-step{rows[m]['steps']:04d}.jsonl" for m in METHODS} | {"rng-grpo-step0001.jsonl"}
    assert {f.name for f in samples.iterdir()} == expected and report["quality_samples"] == "quality_samples/"
    assert not (out / "quality_samples.partial").exists()
    lines = [json.loads(x) for x in (samples / f"rng-tb-step{rows['tb']['steps']:04d}.jsonl").read_text().splitlines()]
    assert len(lines) == n and set(lines[0]) == {"prompt", "completion", "score", "mode", "decoding"}
    assert sum(1 for x in lines if x["score"] is not None) == round(rows["tb"]["eval"]["valid_fraction"] * n)

    md = (out / "benchmark.md").read_text()
    assert md.startswith("Machine:") and "TRL GRPO" in md and "| rng | grpo |" in md
    assert (out / "benchmark_trl_step.png").stat().st_size > 0 and (out / "benchmark_quality.png").stat().st_size > 0


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gfodg_benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(step, score, above, sem=0.5, meaning=None):
    point = {"step": step, "score_mean": score, "n_above_threshold": above, "semantic_diversity": sem}
    return point if meaning is None else {**point, "n_above_threshold_by_meaning": meaning}


def test_matched_score_reads_the_by_meaning_count_where_both_sides_have_it():
    bench = _benchmark_module()
    grpo = {"task": "kw", "method": "grpo", "eval": _point(4, 2.0, 30, 0.2, meaning=6),
            "curve": [_point(2, 0.0, 10, 0.6, meaning=8), _point(4, 2.0, 30, 0.2, meaning=6)]}
    ours = {"task": "kw", "method": "tb", "eval": _point(9, 1.0, 40, 0.7, meaning=21)}
    beyond = {"task": "kw", "method": "vargrad", "eval": _point(9, 2.5, 50, meaning=24)}
    old = {"task": "kw", "method": "rloo", "eval": _point(9, 1.0, 40)}  # a report from before the metric
    bench.matched_score([grpo, ours, beyond, old])
    assert ours["matched"]["grpo_n_above_threshold_by_meaning"] == 7.0 and ours["matched"]["ratio_by_meaning"] == 3.0
    assert beyond["above_grpo_path"]["grpo_n_above_threshold_by_meaning"] == 6
    assert beyond["above_grpo_path"]["ratio_by_meaning"] == 4.0
    assert "ratio_by_meaning" not in old["matched"] and old["matched"]["ratio"] == 2.0
    lines = bench.quality_table([{**r, "steps": 1, "K": 4, "prompts_per_step": 1} for r in (grpo, ours, beyond, old)])
    assert any("| 40 / 20.0 | 2.00x | 21 / 7.0 | 3.00x |" in line for line in lines)
    assert any("| 50 / 30 | 1.67x | 24 / 6 | 4.00x |" in line for line in lines)
    assert any("| kw | rloo | 1.000 | 40 / 20.0 | 2.00x | - | - |" in line for line in lines)


def test_matched_score_reads_grpo_path_at_our_score():
    bench = _benchmark_module()
    base = {"task": "kw", "method": "base", "eval": _point(0, -1.0, 6, 0.8)}
    grpo = {"task": "kw", "method": "grpo", "eval": _point(4, 2.0, 30, 0.2),
            "curve": [_point(2, 0.0, 10, 0.6), _point(4, 2.0, 30, 0.2)]}
    ours = {"task": "kw", "method": "tb", "eval": _point(9, 1.0, 40, 0.7)}
    beyond = {"task": "kw", "method": "vargrad", "eval": _point(9, 2.5, 50)}  # GRPO's path never got there
    rows = [base, grpo, ours, beyond]
    bench.matched_score(rows)
    m = ours["matched"]
    assert m["grpo_steps"] == [2, 4] and m["grpo_n_above_threshold"] == 20.0 and m["ratio"] == 2.0
    assert abs(m["grpo_semantic_diversity"] - 0.4) < 1e-12
    assert "matched" not in beyond and "matched" not in grpo
    # Above GRPO's whole path: compared with its best-scoring point (step 4), ours higher.
    assert beyond["above_grpo_path"] == {"score": 2.5, "grpo_score": 2.0, "grpo_step": 4, "grpo_n_above_threshold": 30,
                                         "grpo_semantic_diversity": 0.2, "ratio": 50 / 30}
    assert "above_grpo_path" not in ours
    # Below GRPO's second point: between the base model (step 0) and step 2.
    low = {"task": "kw", "method": "rloo", "eval": _point(9, -0.5, 9)}
    bench.matched_score([base, grpo, low])
    assert low["matched"]["grpo_steps"] == [0, 2] and low["matched"]["grpo_n_above_threshold"] == 8.0
    # A task whose scores do not move (rng: every valid integer scores alike) has nothing to match on.
    flat = [{"task": "rng", "method": r["method"], "eval": dict(r["eval"], score_mean=-4.6)} for r in (base, ours)]
    flat.append({"task": "rng", "method": "grpo", "eval": _point(4, -4.6, 1),
                 "curve": [_point(2, -4.6, 3), _point(4, -4.6, 1)]})
    bench.matched_score(flat)
    assert all("matched" not in r for r in flat)


def test_matched_score_keeps_every_crossing_of_a_path_that_rises_and_falls():
    bench = _benchmark_module()
    # GRPO rises to 3.0 at step 4, then collapses: fewer distinct completions at a lower score.
    grpo = {"task": "kw", "method": "grpo", "eval": _point(6, 1.0, 4, 0.1),
            "curve": [_point(2, 0.0, 10, 0.6), _point(4, 3.0, 40, 0.3), _point(6, 1.0, 4, 0.1)]}
    ours = {"task": "kw", "method": "vargrad", "eval": _point(9, 2.0, 60, 0.5)}
    bench.matched_score([grpo, ours])
    crossings = ours["matched_all"]
    assert [c["grpo_steps"] for c in crossings] == [[2, 4], [4, 6]]
    assert abs(crossings[0]["grpo_n_above_threshold"] - 30.0) < 1e-9 and abs(crossings[0]["ratio"] - 2.0) < 1e-9
    assert abs(crossings[1]["grpo_n_above_threshold"] - 22.0) < 1e-9  # halfway from 40 down to 4
    assert ours["matched"] == crossings[0]
    lines = bench.quality_table([{**r, "steps": 1, "K": 4, "prompts_per_step": 1} for r in (grpo, ours)])
    assert sum("| kw | vargrad | 2.000 |" in line for line in lines) == 2
