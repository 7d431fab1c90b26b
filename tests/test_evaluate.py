"""The evaluation: metrics against hand-counted answers, best-of-n and per-prompt targets exact, and
scripts/evaluate.py end to end on the tiny model (adapter, base model, W&B, bad inputs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import CONFIGS, ROOT, compose_cfg
from enumerable import enumerable_cfg, exact_tvs
from gf_odg.errors import ConfigError, GFODGError
from gf_odg.evaluation.core import evaluate
from gf_odg.evaluation.exact import exact_metrics
from gf_odg.evaluation.loading import load_evaluated_policy, resolve_adapter
from gf_odg.evaluation.measure import measure, mode_targets
from gf_odg.evaluation.sampling import POLICY, Decoding, Samples, draw_samples
from gf_odg.evaluation.settings import check_eval_config
from gf_odg.data.tasks import build_task

EVAL_KEYS = ("n_samples", "score_mean", "score_median", "score_max", "valid_fraction", "valid_percent",
             "constraints_satisfied_percent", "unique_fraction", "distinct_1", "distinct_2", "distinct_3",
             "self_bleu", "semantic_diversity", "n_above_threshold", "n_above_threshold_by_meaning", "distinct", "n_modes", "mode_coverage",
             "mode_entropy", "kl_to_target", "tv_to_target")
EXACT_KEYS = ("exact_kl", "exact_reverse_kl", "exact_tv", "exact_valid_mass", "exact_min_ratio", "exact_starved",
              "exact_support")
TRAINER_KEYS = ("valid_fraction", "score_mean", "unique_fraction", "distinct", "n_modes", "kl_to_target",
                "tv_to_target", "mode_entropy", *EXACT_KEYS)


def compose_eval(overrides: list[str]):
    from gf_odg.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def run_evaluate(args: list[str], tmp_path: Path, name: str = "run") -> subprocess.CompletedProcess:
    """scripts/evaluate.py as a user runs it, on the tiny model, outputs under tmp_path/name."""
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "model=tiny-random", "trainer.threads=1",
           "eval.progress=false", *args, f"hydra.run.dir={tmp_path}/{name}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def make_adapter(dest: Path, *overrides: str) -> Path:
    """A LoRA adapter of the tiny model as training saves it, moved away from zero so it matters."""
    from gf_odg.model.loading import load_policy

    cfg = compose_cfg(["model=tiny-random", *overrides])
    model, _, _ = load_policy(cfg.model, cfg.paths, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint step folder as the trainer writes it: the adapter in step_000002/adapter/."""
    step = tmp_path_factory.mktemp("checkpoints") / "tiny-run" / "step_000002"
    make_adapter(step / "adapter")
    (step.parent / "latest").write_text("step_000002\n")
    return step


@pytest.fixture(scope="module")
def rng_task(tiny_policy):
    _, tokenizer = tiny_policy
    cfg = compose_cfg(["model=tiny-random"])
    return build_task(cfg.task, tokenizer, cfg.model.chat_template, cfg.paths.root)


def _digit_and_eos(task) -> tuple[int, int]:
    eos = task.constraints.eos_id
    return next(int(t) for t in task.constraints.columns if int(t) != eos), eos


def _samples(task, texts: list[str], prompt_indices: list[int] | None = None, terms=None) -> Samples:
    """Samples with given texts (their tokens a stand-in that satisfies the constraints)."""
    digit, eos = _digit_and_eos(task)
    scores = torch.tensor(task.reward([task.prompts[0]] * len(texts), texts), dtype=torch.float32)
    return Samples(POLICY, prompt_indices or [0] * len(texts), texts, [[digit, eos]] * len(texts), scores,
                   terms or {})


# ---------------------------------------------------------------- metrics of known samples


def test_mode_metrics_of_hand_made_samples(rng_task):
    texts = ["7", "7", "42", "042", "x"]  # two valid modes (7 twice), a leading zero and a non-number invalid
    result = measure(rng_task, _samples(rng_task, texts), ["score", "validity", "unique_fraction", "modes",
                                                           "above_threshold"],
                     targets=mode_targets(rng_task, beta=1.0), threshold=-10.0)
    assert result["valid_fraction"] == pytest.approx(3 / 5) and result["valid_percent"] == pytest.approx(60.0)
    assert result["score_mean"] == pytest.approx(math.log(1 / 101), abs=1e-6)
    assert result["unique_fraction"] == pytest.approx(4 / 5)
    assert result["n_above_threshold"] == 2  # distinct texts: "7" counts once
    assert result["distinct"] == 2 and result["n_modes"] == 101
    assert result["mode_coverage"] == pytest.approx(2 / 101)
    p_hat = {"7": 2 / 3, "42": 1 / 3}
    assert result["kl_to_target"] == pytest.approx(sum(p * math.log(p * 101) for p in p_hat.values()), abs=1e-5)
    # TV with the invalid mass: ½(|0.4 - 1/101| + |0.2 - 1/101| + 99/101 + 0.4)
    assert result["tv_to_target"] == pytest.approx(0.5 * (0.4 - 1 / 101 + 0.2 - 1 / 101 + 99 / 101 + 0.4), abs=1e-6)
    assert result["mode_entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert result["target_entropy"] == pytest.approx(math.log(101), abs=1e-5)


def test_constraint_violations_and_reward_terms_are_reported(rng_task):
    digit, eos = _digit_and_eos(rng_task)
    samples = _samples(rng_task, ["1", "2"], terms={"a": torch.tensor([1.0, -math.inf]), "b": torch.tensor([3.0, 5.0])})
    samples.tokens = [[digit, eos], [eos, digit, eos]]  # the second has EOS before its end
    result = measure(rng_task, samples, ["score", "validity"])
    assert result["constraints_satisfied_percent"] == pytest.approx(50.0)
    assert result["terms/a/mean"] == 1.0 and result["terms/b/max"] == 5.0 and result["terms/b/median"] == 4.0


def test_diversity_metrics_are_within_each_prompt(rng_task):
    samples = _samples(rng_task, ["a b", "a b", "c d", "e f"], prompt_indices=[0, 0, 1, 1])
    result = measure(rng_task, samples, ["unique_fraction", "distinct_n", "self_bleu"])
    assert result["unique_fraction"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert result["distinct_2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert result["self_bleu"] == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)


def test_embedding_metrics_embed_every_distinct_text_once(rng_task):
    """semantic_diversity and above_threshold_by_meaning read one embedding call over the distinct
    texts, with each prompt's texts (and a text met twice) given their own rows."""
    vectors = {"1": [1.0, 0.0], "2": [0.0, 1.0], "3": [1.0, 0.0], "4": [0.6, 0.8]}
    calls = []

    def embed_fn(texts):
        calls.append(list(texts))
        return torch.tensor([vectors[t] for t in texts])

    samples = _samples(rng_task, ["1", "2", "3", "4", "1"], prompt_indices=[0, 0, 0, 1, 1])
    result = measure(rng_task, samples, ["semantic_diversity", "above_threshold_by_meaning"], threshold=-10.0,
                     embed_fn=embed_fn)
    assert calls == [["1", "2", "3", "4"]]
    # prompt 0: cosines (1,2)=0, (1,3)=1, (2,3)=0 -> 1 - 2/6; prompt 1: cos("4", "1") = 0.6 -> 0.4
    assert result["semantic_diversity"] == pytest.approx(((1 - 2 / 6) + 0.4) / 2)
    assert result["n_above_threshold_by_meaning"] == 2 + 2  # "1" and "3" mean the same; "4" and "1" do not


def test_table_reward_modes_cover_every_prompts_table(tiny_policy):
    """Per-prompt tables with different completions: each prompt's mode target is its own table."""
    from gf_odg.rewards.table import TableReward

    _, tokenizer = tiny_policy
    cfg = compose_cfg(["model=tiny-random"])
    cfg.task.prompts = ["first", "second"]
    reward = TableReward(tables={"first": {"1": 0.0, "2": 0.0}, "second": {"3": 0.0, "4": math.log(3.0)}})
    task = build_task(cfg.task, tokenizer, cfg.model.chat_template, cfg.paths.root, reward=reward)
    targets = mode_targets(task, beta=1.0)
    assert targets == {0: pytest.approx({"1": 0.5, "2": 0.5}), 1: pytest.approx({"3": 0.25, "4": 0.75})}
    samples = _samples(task, ["1", "4", "4", "3"], prompt_indices=[0, 1, 1, 1])
    samples.scores = torch.tensor(reward(["first", "second", "second", "second"], samples.texts))
    result = measure(task, samples, ["modes"], targets=targets)
    assert result["distinct"] == pytest.approx((1 + 2) / 2) and result["n_modes"] == pytest.approx(2.0)
    assert result["tv_to_target"] == pytest.approx((0.5 + 0.5 * (abs(2 / 3 - 0.75) + abs(1 / 3 - 0.25))) / 2)


# ---------------------------------------------------------------- decodings and exactness


def test_best_of_n_keeps_the_best_of_the_same_draws(tiny_policy, rng_task):
    model, tokenizer = tiny_policy
    order, n = [0] * 12, 4
    best = draw_samples(model, tokenizer, rng_task, order, Decoding("best_of_4", best_of=n), 16,
                        torch.Generator().manual_seed(3))
    every = draw_samples(model, tokenizer, rng_task, [0] * (12 * n), POLICY, 16, torch.Generator().manual_seed(3))
    for k in range(12):
        group = every.scores[k * n:(k + 1) * n]
        assert best.texts[k] == every.texts[k * n + int(group.argmax())]
        assert best.scores[k] == group.max()
    assert bool(torch.isfinite(every.scores).any())  # the tiny model does write valid integers


@pytest.mark.slow
def test_trainer_evaluate_keeps_its_keys_and_skips_slow_diversity(tiny_policy, rng_task):
    model, tokenizer = tiny_policy
    result, rows = evaluate(model, tokenizer, rng_task, n_samples=24, batch_size=16, seed=1)
    for key in TRAINER_KEYS:
        assert key in result, key
    assert "self_bleu" not in result and "semantic_diversity" not in result
    assert result["constraints_satisfied_percent"] == 100.0  # the mask holds on every sample
    assert len(rows) == 24 and set(rows[0]) == {"prompt", "completion", "score", "mode", "decoding"}
    assert all((r["score"] is None) == (r["mode"] is None) for r in rows)


@pytest.mark.slow
def test_exact_metrics_use_each_prompts_own_target(tmp_path):
    """Two prompts with different target tables: the exact TV is each prompt's against its own."""
    from enumerable import PROMPTS
    from gf_odg.training.trainer import Trainer

    cfg = enumerable_cfg(tmp_path, "tb", prompts=PROMPTS, seeds=[0, 1], normalised=True)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    result, distributions = exact_metrics(trainer.model, trainer.tokenizer, trainer.task, beta=1.0)
    trainer.close()
    assert result["exact_tv"] == pytest.approx(sum(exact_tvs(trainer)) / 2, abs=1e-5)
    assert result["exact_valid_mass"] == pytest.approx(1.0, abs=1e-4)
    per_prompt = [row["exact_tv"] for row in result["exact_per_prompt"]]
    assert per_prompt == pytest.approx(exact_tvs(trainer), abs=1e-5)
    assert [d.prompt_index for d in distributions] == [0, 1]


# ---------------------------------------------------------------- settings, adapters, bad input in-process


def test_eval_config_is_typed_and_resolves_its_nulls():
    cfg = compose_eval(["model=tiny-random", "eval.baselines=[temperature_0.7,nucleus_0.95,best_of_n]"])
    settings = check_eval_config(cfg)
    assert settings.samples_per_prompt == cfg.task.evaluation.n_samples  # one prompt
    assert [d.name for d in settings.decodings] == ["policy", "temperature_0.7", "nucleus_0.95", "best_of_n"]
    assert settings.decodings[2].top_p == 0.95 and settings.decodings[3].best_of == cfg.eval.best_of_n
    assert not settings.metrics & {"above_threshold", "above_threshold_by_meaning"}  # no threshold given
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_eval(["eval.adaptr=x"])
    assert "adaptr" in str(err.value)
    assert compose_cfg([]).eval is None  # one schema: a training run carries no eval settings


@pytest.mark.parametrize("override,expected", [
    ("eval.samples_per_prompt=0", "eval.samples_per_prompt=0"),
    ("eval.samples_per_prompt=-3", "eval.samples_per_prompt=-3"),
    ("eval.metrics=[score,bleu]", "unknown 'bleu'"),
    ("eval.baselines=[greedy]", "'greedy' is not a decoding"),
    ("eval.baselines=[temperature_0]", "'temperature_0' is not a decoding"),
    ("eval.baselines=[nucleus_1.5]", "'nucleus_1.5' is not a decoding"),
    ("eval.metrics=[above_threshold]", "eval.threshold is null"),
    ("eval.metrics=[above_threshold_by_meaning]", "asks for above_threshold_by_meaning but eval.threshold is null"),
    ("eval.same_meaning=1.5", "eval.same_meaning=1.5: expected a cosine in (0, 1]"),
    ("eval.exact_limit=0", "eval.exact_limit=0: expected >= 1"),
])
def test_bad_eval_settings_are_named(override, expected):
    with pytest.raises(ConfigError) as err:
        check_eval_config(compose_eval(["model=tiny-random", override]))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_adapter_paths_resolve_from_a_checkpoint_a_run_folder_and_a_run_name(checkpoint, tmp_path):
    adapter = checkpoint / "adapter"
    paths = compose_cfg([]).paths
    assert resolve_adapter(str(checkpoint), paths) == adapter.resolve()
    assert resolve_adapter(str(adapter), paths) == adapter.resolve()
    assert resolve_adapter(str(checkpoint.parent), paths) == adapter.resolve()  # via its `latest`
    paths.adapted_models = str(checkpoint.parents[1])
    assert resolve_adapter("tiny-run", paths) == adapter.resolve()
    with pytest.raises(GFODGError, match=str(tmp_path / "missing")):
        resolve_adapter(str(tmp_path / "missing"), paths)


def test_adapter_of_other_shapes_under_the_same_name_is_caught_on_loading(tmp_path):
    cfg = compose_cfg(["model=tiny-random"])
    adapter = make_adapter(tmp_path / "h32", "model.tiny.hidden_size=32", "model.name_or_path=tiny-random-h32")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(Path(cfg.paths.base_models) / cfg.model.name_or_path)  # a lie
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(GFODGError) as err:
        load_evaluated_policy(cfg.model, cfg.paths, torch.device("cpu"), adapter)
    assert "size mismatch" in str(err.value) and str(adapter) in str(err.value)


# ---------------------------------------------------------------- scripts/evaluate.py end to end


@pytest.mark.slow
def test_evaluate_script_with_adapter_and_baselines(checkpoint, tmp_path):
    n = 16
    result = run_evaluate([f"eval.adapter={checkpoint}", f"eval.samples_per_prompt={n}", "eval.batch_size=32",
                           "eval.baselines=[temperature_1,temperature_0.7,nucleus_0.95,best_of_n]",
                           "eval.threshold=-10", "logger=none"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "eval.json").read_text())
    assert report["adapter"] == str((checkpoint / "adapter").resolve())
    assert report["samples_per_prompt"] == n and report["n_prompts"] == 1
    assert list(report["baselines"]) == ["temperature_1", "temperature_0.7", "nucleus_0.95", "best_of_n"]
    policy = report["policy"]
    for key in (*EVAL_KEYS, *EXACT_KEYS):
        assert key in policy, key
    assert policy["constraints_satisfied_percent"] == 100.0
    assert 1 <= policy["n_above_threshold_by_meaning"] <= policy["n_above_threshold"]  # merging only lowers it
    assert report["same_meaning"] == 0.9
    assert report["baselines"]["temperature_1"] == policy  # the same decoding: the same draws
    best = report["baselines"]["best_of_n"]
    assert "exact_kl" not in best and best["valid_fraction"] >= policy["valid_fraction"]
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * n
    for decoding in ("policy", "temperature_0.7", "nucleus_0.95", "best_of_n"):
        assert sum(r["decoding"] == decoding for r in rows) == n
    assert set(rows[0]) == {"prompt", "completion", "score", "mode", "decoding"}
    for name in ("scores", "modes", "reward_vs_diversity", "exact_distribution"):
        png = run / "plots" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "policy" in result.stdout and "nucleus_0.95" in result.stdout  # the console table
    assert "policy samples (16 drawn" in result.stdout  # and a few completions under it
    assert policy["exact_per_prompt"][0]["exact_kl"] == policy["exact_kl"]  # one prompt: its figures are the mean


@pytest.mark.slow
def test_evaluate_script_on_the_base_model_logs_to_wandb(tmp_path):
    from gf_odg.io.tracking import read_offline_run

    result = run_evaluate(["eval.adapter=null", "eval.samples_per_prompt=8", "eval.metrics=[score,validity,modes]",
                           "logger=wandb", "logger.mode=offline"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["adapter"] is None and report["baselines"] == {}
    assert "kl_to_target" in report["policy"] and "self_bleu" not in report["policy"]
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 8
    wandb_file = next((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = read_offline_run(wandb_file)
    assert logged["exit_code"] == 0
    assert "eval/policy/valid_fraction" in logged["summary"]
    assert any(key.startswith("eval/plots/scores/") for row in logged["history"] for key in row)
    media = wandb_file.parent / "files" / "media" / "images" / "eval" / "plots"
    assert any(p.name.startswith("scores_") and p.stat().st_size > 1000 for p in media.glob("*.png"))


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_evaluate_script_missing_adapter_fails_in_one_line(tmp_path):
    missing = tmp_path / "no-such-run"
    message = _one_line_error(run_evaluate([f"eval.adapter={missing}", "logger=none"], tmp_path))
    assert str(missing) in message
    assert not (tmp_path / "run" / "eval.json").exists()


@pytest.mark.slow
def test_evaluate_script_bad_settings_fail_before_loading(tmp_path):
    message = _one_line_error(run_evaluate(["eval.samples_per_prompt=0", "eval.baselines=[greedy]",
                                            "eval.adapter=/nowhere", "logger=none"], tmp_path))
    assert "eval.samples_per_prompt=0" in message and "greedy" in message


@pytest.mark.slow
def test_evaluate_script_adapter_of_another_base_model_fails_in_one_line(tmp_path):
    adapter = make_adapter(tmp_path / "h32", "model.tiny.hidden_size=32", "model.name_or_path=tiny-random-h32")
    message = _one_line_error(run_evaluate([f"eval.adapter={adapter}", "logger=none"], tmp_path))
    base = compose_cfg(["model=tiny-random"]).paths.base_models
    assert str(adapter) in message and f"{base}/tiny-random-h32" in message and f"{base}/tiny-random-llama" in message
