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
                             "--quality-methods", ",".join(METHODS), "--out", str(out)],
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
        assert 0.0 <= row["eval_unmasked"]["valid_fraction"] <= 1.0
        if method == "base":
            assert row["steps"] == 0 and row["step_s"] is None
        else:
            assert row["steps"] == 2 and math.isfinite(row["step_s"]) and row["step_s"] > 0, method
    assert rows["grpo"]["sampled_with_constraint_mask"] is False and rows["tb"]["sampled_with_constraint_mask"] is True

    md = (out / "benchmark.md").read_text()
    assert md.startswith("Machine:") and "TRL GRPO" in md and "| rng | grpo |" in md
    assert (out / "benchmark_trl_step.png").stat().st_size > 0 and (out / "benchmark_quality.png").stat().st_size > 0
