"""gf_odg.bench's TRL comparisons (sections trl_step and quality) on the tiny model: each figure the
report derives (ratios, counts, curve points) agrees with what was measured in the same run, and the
matched-score comparison reads GRPO's path correctly. The measurements themselves are benchmarks."""

from __future__ import annotations

import json
import math

import pytest

from gf_odg.bench.__main__ import main as bench_main
from gf_odg.bench.quality_match import matched_score
from gf_odg.bench.quality_report import quality_table

METHODS = ["base", "tb", "vargrad", "rloo", "grpo"]
ON_POLICY = {"p_temper": 0.0, "epsilon": 0.0, "replay": False}


def _high(lines, threshold):
    """Distinct completions at or above the threshold in an evaluation's samples file."""
    return len({x["completion"] for x in lines if x["score"] is not None and x["score"] >= threshold})


@pytest.mark.slow
def test_trl_step_and_quality_sections_run_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench"
    assert bench_main(["trl_step", "quality", "--model", "tiny-random", "--quick", "--quality-tasks", "rng",
                       "--quality-methods", ",".join(METHODS), "--quality-budget", "time", "--quality-curve", "1",
                       "--quality-curve-methods", "grpo", "--out", str(out)]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    md = (out / "benchmark.md").read_text()

    (step,) = report["trl_step"]
    assert step["K"] == 4 and step["prompt_tokens"] > 0 and step["max_new_tokens"] == 4
    assert math.isclose(step["ratio_masked"], step["ours_masked_step_s"] / step["trl_step_s"])
    assert math.isclose(step["ratio_unmasked"], step["ours_unmasked_step_s"] / step["trl_step_s"])
    assert 1 <= step["ours_masked_length_mean"] <= 4 and 1 <= step["trl_length_mean"] <= 4
    assert 0.0 <= step["trl_valid_fraction"] <= 1.0
    assert step["trl_prompt_tokens_match_ours"] is True and step["trl_constraint_mask"] is False
    assert step["trl_beta"] == 0.0 and step["trl_lora_dtype"] == "float32"
    assert (f"| 4 | {step['prompt_tokens']} | 4 | {step['ours_masked_step_s']:.3f} | "
            f"{step['ours_unmasked_step_s']:.3f} | {step['trl_step_s']:.3f} | {step['ratio_masked']:.2f}x | "
            f"{step['ratio_unmasked']:.2f}x |") in md

    rows = {r["method"]: r for r in report["quality"]}
    assert [r["method"] for r in report["quality"]] == ["grpo", "base", "tb", "vargrad", "rloo"]  # GRPO sets the budget
    n, threshold = rows["tb"]["eval_samples"], rows["tb"]["threshold"]
    samples = out / "quality_samples"
    for method, row in rows.items():
        e = row["eval"]
        assert row["task"] == "rng" and e["n_samples"] == n, method
        path = samples / f"rng-{method}-step{row['steps']:04d}.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(lines) == n and set(lines[0]) == {"prompt", "completion", "score", "mode", "decoding"}
        # The report's counts are those of the completions it wrote.
        assert sum(x["score"] is not None for x in lines) == round(e["valid_fraction"] * n), method
        assert e["n_above_threshold"] == _high(lines, threshold) == e["distinct"], method
        assert e["unique_fraction"] == len({x["completion"] for x in lines}) / n, method
        assert 0 <= e["n_above_threshold_by_meaning"] <= e["n_above_threshold"]
        assert e["exact_kl"] >= 0 and 0 <= e["exact_tv"] <= 1.0 and isinstance(e["semantic_diversity"], float)
        assert 0.0 <= row["eval_unmasked"]["valid_fraction"] <= 1.0
        if method == "base":
            assert row["steps"] == 0 and row["step_s"] is None
        else:
            assert row["step_s"] <= row["train_step_s_total"] <= row["train_s"], method
        assert f"| rng | {method} | {row['steps']} | 4 x 1 | {e['score_mean']:.3f} | {e['valid_fraction']:.3f} |" in md
    # RLOO (issue 17, item 5) trains on-policy; TB keeps rng_tb's tempering and epsilon.
    assert rows["rloo"]["exploration"] == ON_POLICY and rows["tb"]["exploration"]["p_temper"] == 0.5
    # --quality-budget time: GRPO's 2 steps set the seconds; ours take as many steps as fit at their probed pace.
    budget = rows["grpo"]["train_step_s_total"]
    assert rows["grpo"]["steps"] == 2 and budget > 0
    for method in ("tb", "vargrad", "rloo"):
        row = rows[method]
        assert row["budget_s"] == budget and row["probe_step_s"] > 0
        assert row["steps"] == max(1, int(budget // row["probe_step_s"])), method
        assert "curve" not in row  # --quality-curve-methods grpo
    # --quality-curve 1: GRPO evaluated after step 1 (its own samples file), its final policy last.
    curve = rows["grpo"]["curve"]
    assert [p["step"] for p in curve] == [1, 2]
    step1 = [json.loads(x) for x in (samples / "rng-grpo-step0001.jsonl").read_text().splitlines()]
    assert curve[0]["n_above_threshold"] == _high(step1, threshold)
    assert curve[-1]["n_above_threshold"] == rows["grpo"]["eval"]["n_above_threshold"]
    assert rows["grpo"]["sampled_with_constraint_mask"] is False and rows["tb"]["sampled_with_constraint_mask"] is True
    expected = {f"rng-{m}-step{rows[m]['steps']:04d}.jsonl" for m in METHODS} | {"rng-grpo-step0001.jsonl"}
    assert {f.name for f in samples.iterdir()} == expected and report["quality_samples"] == "quality_samples/"
    assert not (out / "quality_samples.partial").exists()
    assert md.startswith("Machine:") and "TRL GRPO" in md
    assert (out / "benchmark_trl_step.png").stat().st_size > 0 and (out / "benchmark_quality.png").stat().st_size > 0


def _point(step, score, above, sem=0.5, meaning=None):
    point = {"step": step, "score_mean": score, "n_above_threshold": above, "semantic_diversity": sem}
    return point if meaning is None else {**point, "n_above_threshold_by_meaning": meaning}


def test_matched_score_reads_the_by_meaning_count_where_both_sides_have_it():
    grpo = {"task": "kw", "method": "grpo", "eval": _point(4, 2.0, 30, 0.2, meaning=6),
            "curve": [_point(2, 0.0, 10, 0.6, meaning=8), _point(4, 2.0, 30, 0.2, meaning=6)]}
    ours = {"task": "kw", "method": "tb", "eval": _point(9, 1.0, 40, 0.7, meaning=21)}
    beyond = {"task": "kw", "method": "vargrad", "eval": _point(9, 2.5, 50, meaning=24)}
    old = {"task": "kw", "method": "rloo", "eval": _point(9, 1.0, 40)}  # a report from before the metric
    matched_score([grpo, ours, beyond, old])
    assert ours["matched"]["grpo_n_above_threshold_by_meaning"] == 7.0 and ours["matched"]["ratio_by_meaning"] == 3.0
    assert beyond["above_grpo_path"]["grpo_n_above_threshold_by_meaning"] == 6
    assert beyond["above_grpo_path"]["ratio_by_meaning"] == 4.0
    assert "ratio_by_meaning" not in old["matched"] and old["matched"]["ratio"] == 2.0
    lines = quality_table([{**r, "steps": 1, "K": 4, "prompts_per_step": 1} for r in (grpo, ours, beyond, old)])
    assert any("| 40 / 20.0 | 2.00x | 21 / 7.0 | 3.00x |" in line for line in lines)
    assert any("| 50 / 30 | 1.67x | 24 / 6 | 4.00x |" in line for line in lines)
    assert any("| kw | rloo | 1.000 | 40 / 20.0 | 2.00x | - | - |" in line for line in lines)


def test_matched_score_reads_grpo_path_at_our_score():
    base = {"task": "kw", "method": "base", "eval": _point(0, -1.0, 6, 0.8)}
    grpo = {"task": "kw", "method": "grpo", "eval": _point(4, 2.0, 30, 0.2),
            "curve": [_point(2, 0.0, 10, 0.6), _point(4, 2.0, 30, 0.2)]}
    ours = {"task": "kw", "method": "tb", "eval": _point(9, 1.0, 40, 0.7)}
    beyond = {"task": "kw", "method": "vargrad", "eval": _point(9, 2.5, 50)}  # GRPO's path never got there
    rows = [base, grpo, ours, beyond]
    matched_score(rows)
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
    matched_score([base, grpo, low])
    assert low["matched"]["grpo_steps"] == [0, 2] and low["matched"]["grpo_n_above_threshold"] == 8.0
    # A task whose scores do not move (rng: every valid integer scores alike) has nothing to match on.
    flat = [{"task": "rng", "method": r["method"], "eval": dict(r["eval"], score_mean=-4.6)} for r in (base, ours)]
    flat.append({"task": "rng", "method": "grpo", "eval": _point(4, -4.6, 1),
                 "curve": [_point(2, -4.6, 3), _point(4, -4.6, 1)]})
    matched_score(flat)
    assert all("matched" not in r for r in flat)


def test_matched_score_keeps_every_crossing_of_a_path_that_rises_and_falls():
    # GRPO rises to 3.0 at step 4, then collapses: fewer distinct completions at a lower score.
    grpo = {"task": "kw", "method": "grpo", "eval": _point(6, 1.0, 4, 0.1),
            "curve": [_point(2, 0.0, 10, 0.6), _point(4, 3.0, 40, 0.3), _point(6, 1.0, 4, 0.1)]}
    ours = {"task": "kw", "method": "vargrad", "eval": _point(9, 2.0, 60, 0.5)}
    matched_score([grpo, ours])
    crossings = ours["matched_all"]
    assert [c["grpo_steps"] for c in crossings] == [[2, 4], [4, 6]]
    assert abs(crossings[0]["grpo_n_above_threshold"] - 30.0) < 1e-9 and abs(crossings[0]["ratio"] - 2.0) < 1e-9
    assert abs(crossings[1]["grpo_n_above_threshold"] - 22.0) < 1e-9  # halfway from 40 down to 4
    assert ours["matched"] == crossings[0]
    lines = quality_table([{**r, "steps": 1, "K": 4, "prompts_per_step": 1} for r in (grpo, ours)])
    assert sum("| kw | vargrad | 2.000 |" in line for line in lines) == 2
