"""The benchmark section frontier (gf_odg.bench.frontier): its paths read at GRPO's mean scores, its
flags checked before anything is written, the TRL variants' settings, and one --quick run on the tiny
model (two seeds) whose report holds every method's points for every seed."""

from __future__ import annotations

import json
import math

import pytest

from gf_odg.bench.__main__ import build_parser
from gf_odg.bench.__main__ import main as bench_main
from gf_odg.bench.frontier import settings
from gf_odg.bench.frontier_report import MEANING, PATH_KEYS, at_score, matched_levels, spread
from gf_odg.bench.quality_train import Settings, method_overrides, trl_extra


def _point(method, seed, at, score, meaning, fluency=-3.0):
    return {"method": method, "seed": seed, "axis": "step", "at": at, "score_mean": score, MEANING: meaning,
            "semantic_diversity": 0.5, "fluency": fluency}


def test_a_path_is_read_at_a_score_by_interpolation_the_highest_crossing_or_not_at_all():
    # rises 0 -> 2 (count 10 -> 12), falls back to 1 (count 40): the scores in 1..2 are crossed twice
    line = [_point("m", 0, 0, 0.0, 10), _point("m", 0, 1, 2.0, 12), _point("m", 0, 2, 1.0, 40)]
    assert at_score(line, 1.0, MEANING) == pytest.approx(40.0)  # max(11, 40)
    assert at_score(line, 1.5, MEANING) == pytest.approx(26.0)  # max(11.5, 12 + 0.5 * 28)
    assert at_score(line, 0.5, MEANING) == pytest.approx(10.5)  # crossed once
    assert at_score(line, 2.5, MEANING) is None and at_score(line, -0.1, MEANING) is None
    assert at_score(line[:1], 0.0, MEANING) == 10 and at_score(line[:1], 0.5, MEANING) is None


def test_matched_levels_compare_each_method_at_every_grpo_point_after_step_0():
    points = [_point("grpo", 0, 0, 0.0, 10), _point("grpo", 0, 2, 1.0, 4), _point("grpo", 0, 4, 2.0, 0),
              _point("vargrad", 0, 0, 0.0, 10), _point("vargrad", 0, 2, 1.0, 12), _point("vargrad", 0, 4, 1.5, 9)]
    levels = matched_levels({"seeds": [0], "methods": ["vargrad", "grpo"], "points": points})
    assert [(lv["grpo_step"], lv["score"]) for lv in levels] == [(2, 1.0), (4, 2.0)]
    assert levels[0]["values"]["vargrad"][MEANING] == 12 and levels[0]["values"]["grpo"][MEANING] == 4
    assert levels[0]["ratio"] == {"vargrad": 3.0}
    assert levels[1]["values"]["vargrad"][MEANING] is None  # vargrad never scores 2.0
    assert levels[1]["ratio"] == {"vargrad": None}           # and GRPO's count there is 0
    assert spread([1.0, None, 3.0, math.nan, 2.0]) == {"n": 3, "min": 1.0, "median": 2.0, "max": 3.0, "mean": 2.0,
                                                        "sd": 1.0}


@pytest.mark.parametrize("args, message", [
    (["--frontier-methods", "vargrad,ppo,grpo"], "--frontier-methods: unknown ppo; known: "),
    (["--frontier-methods", "vargrad,rloo"], "--frontier-methods: add grpo"),
    (["--seeds", "0,x"], "--seeds: '0,x' is not a comma-separated list of distinct integers >= 0"),
    (["--seeds", "1,1"], "--seeds: '1,1' is not a comma-separated list of distinct integers >= 0"),
    (["--seeds", "-1"], "--seeds: '-1' is not a comma-separated list of distinct integers >= 0"),
    (["--frontier-task", "rng"], "--frontier-task: unknown 'rng'; known: keywords, sentiment"),
    (["--frontier-temperatures", "0.7,0"], "--frontier-temperatures: '0.7,0' is not a comma-separated list"),
    (["--frontier-best-of", "1,4"], "--frontier-best-of: '1,4' is not a comma-separated list"),
    (["--frontier-every", "0"], "--frontier-every must be >= 1, got 0"),
    (["--frontier-grpo-beta", "0"], "--frontier-grpo-beta must be > 0, got 0.0"),
    (["--frontier-methods", "subtb,grpo"], "subtb needs a reward that scores every prefix; keywords's has none"),
    (["--frontier-overrides", "trainer.no_such_key=1", "--frontier-methods", "grpo"], "config: "),
], ids=["unknown-method", "no-grpo", "seeds-word", "seeds-twice", "seeds-negative", "task", "temperature",
        "best-of", "every", "beta", "subtb", "override"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "bench"
    assert bench_main(["frontier", *args, "--model", "tiny-random", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.slow  # trains GRPO on the tiny model (5 s)
def test_grpo_entropy_is_skipped_where_trl_has_no_entropy_coef(monkeypatch):
    import gf_odg.baselines.grpo as grpo

    options = build_parser().parse_args(["frontier", "--frontier-methods", "vargrad,grpo,grpo_entropy,base"])
    assert settings(options).methods == ("vargrad", "grpo", "grpo_entropy", "base")  # this TRL has it
    monkeypatch.setattr(grpo, "grpo_config_has", lambda name: False)
    f = settings(options)
    assert f.methods == ("vargrad", "grpo", "base") and f.trained == ("vargrad", "grpo")
    assert len(f.skipped) == 1 and f.skipped[0].startswith("grpo_entropy: TRL ") and "no entropy_coef" in f.skipped[0]


def test_the_trl_variants_set_beta_and_the_entropy_bonus_and_train_on_policy(tmp_path):
    from gf_odg.baselines.grpo import grpo_args
    from gf_odg.bench.common import compose

    s = Settings(tasks=("keywords",), steps={"keywords": 2}, n_eval={"keywords": 8}, methods=("grpo",),
                 grpo_kl_beta=0.5, grpo_entropy_coef=0.25)
    expected = {"grpo": (0.0, 0.0), "grpo_kl": (0.5, 0.0), "grpo_entropy": (0.0, 0.25)}
    for method, (beta, entropy_coef) in expected.items():
        args = grpo_args(tmp_path, k=4, prompts_per_step=1, max_new_tokens=8, max_steps=2, lr=1e-4,
                         **trl_extra(method, s))
        assert (args.beta, args.entropy_coef) == (beta, entropy_coef), method
        cfg = compose(["model=tiny-random", *method_overrides("keywords", method, s)])
        assert cfg.objective.name == "rloo" and cfg.exploration.epsilon == 0.0 and cfg.task.name == "keywords"


@pytest.mark.slow  # the whole --quick run end to end (13 s)
def test_quick_run_has_every_method_for_every_seed_and_the_matched_table(tmp_path):
    out = tmp_path / "bench"
    methods = ["vargrad", "grpo", "base", "best_of_n"]
    argv = ["frontier", "--model", "tiny-random", "--quick", "--seeds", "0,1", "--frontier-methods", ",".join(methods),
            "--frontier-threshold", "-30", "--out", str(out)]
    assert bench_main(argv) == 0
    report = json.loads((out / "benchmark.json").read_text())
    md = (out / "benchmark.md").read_text()
    assert (out / "benchmark_frontier.png").stat().st_size > 0 and not (out / "quality_samples.partial").exists()
    f = report["frontier"]
    assert f["methods"] == methods and f["seeds"] == [0, 1] and f["eval_samples"] == 16 and f["threshold"] == -30
    axes = {"vargrad": [0, 1, 2], "grpo": [0, 1, 2], "base": [0.7, 1.0], "best_of_n": [1, 2]}
    for seed in (0, 1):
        line = {m: [p for p in f["points"] if p["method"] == m and p["seed"] == seed] for m in methods}
        for m in methods:
            assert [p["at"] for p in line[m]] == axes[m], (m, seed)
            for p in line[m]:
                assert all(isinstance(p[k], (int, float)) and math.isfinite(p[k]) for k in PATH_KEYS), p
                assert 0 < p[MEANING] <= p["n_above_threshold"] <= 16 and p["fluency"] < 0
        start = {k: line["base"][1][k] for k in PATH_KEYS}  # temperature 1: step 0 of the trained paths, n = 1
        assert {k: line["vargrad"][0][k] for k in PATH_KEYS} == start == {k: line["best_of_n"][0][k] for k in PATH_KEYS}
        samples = out / "quality_samples" / f"seed{seed}"
        for name in ("keywords-vargrad-step0001", "keywords-grpo-step0002", "keywords-base-temperature_0.7",
                     "keywords-base-best_of_2"):
            assert len((samples / f"{name}.jsonl").read_text().splitlines()) == 16, name
    # GRPO's path after step 0 gives the levels: its own count there at least, ours over it as the ratio
    levels = f["matched"]
    assert [(lv["seed"], lv["grpo_step"]) for lv in levels] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for lv in levels:
        own = next(p for p in f["points"] if p["method"] == "grpo" and p["seed"] == lv["seed"]
                   and p["at"] == lv["grpo_step"])
        assert lv["score"] == own["score_mean"] and lv["values"]["grpo"][MEANING] >= own[MEANING]
        ours = lv["values"]["vargrad"][MEANING]
        assert lv["ratio"]["vargrad"] == (None if ours is None else pytest.approx(ours / lv["values"]["grpo"][MEANING]))
    assert [r["trl_beta"] for r in f["runs"] if r["method"] == "grpo"] == [0.0, 0.0]
    header = "| seed | GRPO step | score mean | vargrad | grpo | base | best_of_n | vargrad / GRPO |"
    rows = md.split(header)[1].split("\n\n")[0].strip().splitlines()[1:]
    assert [r.split(" | ")[:2] for r in rows] == [["| 0", "1"], ["| 0", "2"], ["| 1", "1"], ["| 1", "2"]]
    assert f"| {levels[0]['score']:.3f} | " in rows[0]
    assert report["commit"] in md and "--seeds 0,1 --frontier-methods vargrad,grpo,base,best_of_n" in md
    assert "| vargrad | 3 | " in md and "| base | 2 | - | - | - | - | " in md  # the summary over seeds
