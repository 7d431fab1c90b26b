"""Broad targets (issue 21): the fluency floor and the length-normalised prior, and the one function
that computes log R for training, SubTB's prefixes, the exact evaluation and replay.

    log R = log_reward_min   if the score is -inf, or log p_ref(y|x) / |y| < objective.fluency_floor
          = max(score / beta + lambda * prior, log_reward_min)   otherwise,
    prior = log p_ref(y|x)  (ref_normalize=none)  or  log p_ref(y|x) / |y|  (ref_normalize=length)

log p_ref is checked against `enumerable.base_log_probs`, a plain forward of the base model written
independently of the trainer (one token a letter, then EOS, so |y| = letters + 1).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import compose_cfg
from enumerable import SHORT, SHORT_INVALID, base_log_probs, exact_probs
from gf_odg.config.validation import validate
from gf_odg.errors import ConfigError
from gf_odg.evaluation.exact import enumerate_terminals, exact_distributions, summarize
from gf_odg.exploration.seeding import seed_replay
from gf_odg.log_reward import TargetOptions, target_log_reward, target_options
from gf_odg.training.step import loss_and_backward
from test_correctness import _hand_batch, _trainer

MIN = -10.0


def _floor_between(values: dict[str, float]) -> float:
    """A floor in the widest gap of the middle half of `values` (so rounding cannot put one on it)."""
    ordered = sorted(values.values())
    middle = range(len(ordered) // 4, 3 * len(ordered) // 4)
    i = max(middle, key=lambda k: ordered[k + 1] - ordered[k])
    return (ordered[i] + ordered[i + 1]) / 2


def _per_token(trainer, prompt_index: int = 0) -> dict[str, float]:
    return {t: v / (len(t) + 1) for t, v in base_log_probs(trainer, prompt_index).items()}


# ---------------------------------------------------------------- the function


SCORES = [1.0, -math.inf, 3.0, 0.2, math.nan, -40.0]
LOG_REF = [-3.0, -1.0, -10.0, -4.5, -2.0, -1.0]
LENGTHS = [2, 1, 4, 3, 2, 1]


def _by_hand(beta, ref_weight, normalize, floor, log_min):
    out = []
    for s, r, n in zip(SCORES, LOG_REF, LENGTHS):
        if math.isnan(s) or s == -math.inf or (floor is not None and r / n < floor):
            out.append(log_min)
            continue
        prior = r / n if normalize == "length" else r
        out.append(max(s / beta + ref_weight * prior, log_min))
    return out


@pytest.mark.parametrize("ref_weight,normalize,floor",
                         list(itertools.product([0.0, 0.5], ["none", "length"], [None, -2.0])))
def test_log_reward_matches_a_hand_computation(ref_weight, normalize, floor):
    beta, log_min = 0.5, -30.0
    target = TargetOptions(beta=beta, log_reward_min=log_min, ref_weight=ref_weight, ref_normalize=normalize,
                           fluency_floor=floor)
    got = target_log_reward(torch.tensor(SCORES, dtype=torch.float64), target,
                            torch.tensor(LOG_REF, dtype=torch.float64), torch.tensor(LENGTHS))
    assert got.tolist() == pytest.approx(_by_hand(beta, ref_weight, normalize, floor, log_min))
    if floor is not None:
        assert got[2] == log_min  # 3.0 / 0.5 = 6 would be its log R, but -10 / 4 < -2


def test_target_options_read_the_objective_config():
    cfg = compose_cfg(["objective=vargrad", "objective.beta=0.25", "objective.fluency_floor=-3.5",
                       "objective.ref_normalize=length", "objective.ref_weight=0.2"])
    target = target_options(cfg.objective)
    assert target == TargetOptions(beta=0.25, log_reward_min=cfg.objective.log_reward_min, ref_weight=0.2,
                                   ref_normalize="length", fluency_floor=-3.5)
    assert target.needs_reference and not TargetOptions().needs_reference
    assert TargetOptions(fluency_floor=-1.0).needs_reference  # the floor alone needs the reference pass


@pytest.mark.parametrize("override,key", [
    ("objective.fluency_floor=0.5", "objective.fluency_floor"),
    ("objective.fluency_floor=0", "objective.fluency_floor"),
    ("objective.fluency_floor=-inf", "objective.fluency_floor"),
    ("objective.ref_normalize=tokens", "objective.ref_normalize"),
])
def test_bad_target_keys_fail_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([override]))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_the_floor_refuses_a_masked_prior():
    with pytest.raises(ConfigError, match="objective.ref_masked"):
        validate(compose_cfg(["objective.fluency_floor=-4", "objective.ref_masked=true"]))
    validate(compose_cfg(["objective.fluency_floor=-4", "objective.ref_normalize=length"]))


# ---------------------------------------------------------------- training, metrics, replay


def test_the_floor_is_a_violation_in_training_and_keeps_samples_out_of_replay(tmp_path):
    """The floor with lambda = 0: the step makes the reference pass anyway, floors exactly the
    completions under it, logs their fraction, and the replay buffer does not take them."""
    trainer, _ = _trainer(tmp_path, "tb", extra=[
        "objective.beta=2", f"objective.log_reward_min={MIN}", "exploration=replay",
        "exploration.replay.fraction=0"])
    per_token = _per_token(trainer)
    floor = _floor_between(per_token)
    trainer.cfg.objective.fluency_floor = floor
    texts = [t for t in SHORT if t not in SHORT_INVALID]
    below = [per_token[t] < floor for t in texts]
    assert any(below) and not all(below)
    batch = _hand_batch(trainer, texts)
    result = loss_and_backward(trainer.parts, trainer.cfg, batch, 0)
    expected = [MIN if b else max(float(s) / 2, MIN) for s, b in zip(batch.score, below)]
    assert result.log_reward.tolist() == pytest.approx(expected, abs=1e-5)
    assert result.below_floor.tolist() == below

    metrics = trainer.train_step(batch)
    assert metrics["reward/below_fluency_floor"] == pytest.approx(sum(below) / len(below))
    assert metrics["log_ref/token_mean"] == pytest.approx(sum(per_token[t] for t in texts) / len(texts), abs=1e-4)
    kept = {e.text for e in trainer.replay.entries(trainer.task.prompts[0])}
    assert kept == {t for t, b in zip(texts, below) if not b}


def test_rloo_scores_a_floored_completion_at_the_floor(tmp_path):
    trainer, _ = _trainer(tmp_path, "rloo", extra=["exploration=on_policy", "objective.beta=2",
                                                    f"objective.log_reward_min={MIN}"])
    per_token = _per_token(trainer)
    trainer.cfg.objective.fluency_floor = floor = _floor_between(per_token)
    texts = [t for t in SHORT if t not in SHORT_INVALID]
    batch = _hand_batch(trainer, texts)
    result = loss_and_backward(trainer.parts, trainer.cfg, batch, 0)
    reward = torch.tensor([2 * MIN if per_token[t] < floor else float(s) for t, s in zip(texts, batch.score)])
    loo = reward - (reward.sum() - reward) / (len(texts) - 1)
    assert result.diagnostics["residual"].tolist() == pytest.approx(loo.tolist(), abs=1e-4)


def test_subtbs_prefix_rewards_floor_a_prefix_as_the_whole_completion(tmp_path, monkeypatch):
    """log R(s_t ⊤) is log R of the completion y_<t EOS, floor and length normalisation included."""
    trainer, _ = _trainer(tmp_path, "subtb", extra=["objective.beta=2", f"objective.log_reward_min={MIN}",
                                                    "objective.ref_weight=0.5", "objective.ref_normalize=length"])
    per_token, base = _per_token(trainer), base_log_probs(trainer, 0)
    trainer.cfg.objective.fluency_floor = floor = _floor_between(per_token)
    seen = []
    monkeypatch.setattr(type(trainer.objective), "__call__", lambda self, b: (seen.append(b), (b.log_pf.sum(), {}))[1])
    texts = ["ab", "ba", "ca", "cb", "aa"]
    loss_and_backward(trainer.parts, trainer.cfg, _hand_batch(trainer, texts), 0)
    got = seen[0].prefix_log_reward
    table = trainer.reward.tables[trainer.task.prompts[0]]

    def by_hand(text):
        score = table.get(text, -math.inf)
        if score == -math.inf or per_token[text] < floor:
            return MIN
        return max(score / 2 + 0.5 * base[text] / (len(text) + 1), MIN)

    assert any(per_token[t[:1]] < floor for t in texts) and any(per_token[t[:1]] >= floor for t in texts)
    for i, text in enumerate(texts):
        assert got[i, 1:3].tolist() == pytest.approx([by_hand(text[:1]), by_hand(text)], abs=1e-4), text


def test_seeding_leaves_floored_completions_out(tmp_path):
    trainer, _ = _trainer(tmp_path, "tb", extra=[f"objective.log_reward_min={MIN}", "exploration=replay"])
    per_token = _per_token(trainer)
    floor = _floor_between(per_token)
    trainer.cfg.objective.fluency_floor = floor
    with pytest.raises(ValueError, match="fluency_floor"):
        seed_replay(trainer.replay, trainer.task, trainer.tokenizer, trainer.cfg.objective, "enumerate", 100)
    seed_replay(trainer.replay, trainer.task, trainer.tokenizer, trainer.cfg.objective, "enumerate", 100,
                trainer.model)
    kept = {e.text for e in trainer.replay.entries(trainer.task.prompts[0])}
    assert kept == {t for t in SHORT if t not in SHORT_INVALID and per_token[t] >= floor}


# ---------------------------------------------------------------- the exact target


def _exact(trainer, target):
    [dist] = exact_distributions(trainer.model, trainer.tokenizer, trainer.task, target=target)
    return dist, dict(zip(dist.texts, dist.log_target.tolist()))


def _softmax(values: dict[str, float]) -> dict[str, float]:
    z = math.log(sum(math.exp(v) for v in values.values()))
    return {k: v - z for k, v in values.items()}


def test_the_exact_target_puts_the_floors_mass_on_floored_completions(tmp_path):
    trainer, _ = _trainer(tmp_path, "tb")
    per_token = _per_token(trainer)
    floor = _floor_between(per_token)
    scores = dict(zip(SHORT, trainer.reward([trainer.task.prompts[0]] * len(SHORT), SHORT)))
    target = TargetOptions(beta=0.5, log_reward_min=MIN, fluency_floor=floor)
    dist, got = _exact(trainer, target)
    by_hand = _softmax({t: MIN if (s == -math.inf or per_token[t] < floor) else max(s / 0.5, MIN)
                        for t, s in scores.items()})
    assert got == pytest.approx(by_hand, abs=1e-6)
    valid = dict(zip(dist.texts, dist.valid.tolist()))
    assert valid == {t: scores[t] > -math.inf and per_token[t] >= floor for t in SHORT}
    policy = exact_probs(trainer, 0)
    assert summarize([dist])["exact_valid_mass"] == pytest.approx(sum(policy[t] for t in SHORT if valid[t]))


def test_length_normalisation_changes_the_exact_target_as_by_hand(tmp_path):
    trainer, _ = _trainer(tmp_path, "tb")
    base = base_log_probs(trainer, 0)
    scores = dict(zip(SHORT, trainer.reward([trainer.task.prompts[0]] * len(SHORT), SHORT)))
    targets = {}
    for normalize in ("none", "length"):
        target = TargetOptions(beta=0.5, log_reward_min=-1000.0, ref_weight=1.0, ref_normalize=normalize)
        _, targets[normalize] = _exact(trainer, target)
        prior = {t: base[t] / (len(t) + 1) if normalize == "length" else base[t] for t in SHORT}
        by_hand = _softmax({t: max(s / 0.5 + prior[t], -1000.0) for t, s in scores.items()})
        assert targets[normalize] == pytest.approx(by_hand, abs=1e-5), normalize
    # per token, the two-letter completions no longer pay about twice the one-letter ones' prior
    assert max(abs(targets["none"][t] - targets["length"][t]) for t in SHORT if scores[t] > -math.inf) > 1.0


@torch.no_grad()
def _masked_base_log_probs(trainer, prompt_index: int = 0) -> dict[str, float]:
    """log p_base(y, EOS | x) renormalised over the tokens the constraint mask allows at each step."""
    tok, model, constraints = trainer.tokenizer, trainer.model, trainer.task.constraints
    prompt = list(trainer.task.prompt_tokens[prompt_index])
    out = {}
    with model.disable_adapter():
        for completion in enumerate_terminals(constraints):
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].double()
            total = 0.0
            for t, token in enumerate(completion):
                allowed = constraints.mask(torch.tensor([completion[:t]], dtype=torch.long), t)[0]
                total += float(torch.log_softmax(logits[t].masked_fill(~allowed, -math.inf), -1)[token])
            out[tok.decode(completion, skip_special_tokens=True)] = total
    return out


def test_the_exact_evaluation_honours_ref_masked(tmp_path):
    trainer, _ = _trainer(tmp_path, "tb")
    masked, unmasked = _masked_base_log_probs(trainer), base_log_probs(trainer, 0)
    assert max(abs(masked[t] - unmasked[t]) for t in SHORT) > 1.0  # the two priors are far apart here
    scores = dict(zip(SHORT, trainer.reward([trainer.task.prompts[0]] * len(SHORT), SHORT)))
    for ref_masked, prior in ((True, masked), (False, unmasked)):
        _, got = _exact(trainer, TargetOptions(log_reward_min=-1000.0, ref_weight=1.0, ref_masked=ref_masked))
        by_hand = _softmax({t: max(s + prior[t], -1000.0) for t, s in scores.items()})
        assert got == pytest.approx(by_hand, abs=1e-5), ref_masked


def test_the_trainers_evaluation_uses_the_objectives_target(tmp_path, monkeypatch):
    """Trainer._evaluate hands the objective's keys (floor, normalisation, ref_masked) to the exact
    evaluation, at the final beta."""
    trainer, _ = _trainer(tmp_path, "tb", extra=["objective.fluency_floor=-3", "objective.ref_normalize=length",
                                                 "objective.beta=0.5", "task.evaluation.exact=true",
                                                 "task.evaluation.n_samples=4", "task.evaluation.plots=false"])
    import gf_odg.evaluation.core as core

    seen = []
    monkeypatch.setattr(core, "exact_metrics", lambda *a, **k: (seen.append(k["target"]), ({}, []))[1])
    trainer._evaluate("after")
    assert seen == [TargetOptions(beta=0.5, log_reward_min=trainer.cfg.objective.log_reward_min,
                                  ref_normalize="length", fluency_floor=-3.0)]


# ---------------------------------------------------------------- a short training run


@pytest.mark.slow
def test_training_with_the_floor_leaves_no_mass_on_floored_completions(tmp_path):
    trainer, _ = _trainer(tmp_path, "tb", extra=[
        "trainer.samples_per_prompt=48", "trainer.max_steps=60", "trainer.lr=1e-2", "trainer.lr_schedule=cosine",
        "trainer.min_lr_ratio=0", "trainer.log_z_lr=0.3", f"objective.log_reward_min={MIN}"])
    per_token = _per_token(trainer)
    trainer.cfg.objective.fluency_floor = floor = _floor_between(per_token)
    floored = [t for t in SHORT if t not in SHORT_INVALID and per_token[t] < floor]
    assert floored
    before = sum(exact_probs(trainer, 0)[t] for t in floored)
    assert before > 0.05
    while trainer.global_step < trainer.cfg.trainer.max_steps:
        trainer.step()
    after = sum(exact_probs(trainer, 0)[t] for t in floored)
    assert after <= 0.01, (before, after)



# ---------------------------------------------------------------- scripts/fluency_floor.py


def test_fluency_floor_script_reports_percentiles_of_the_base_models_own_per_token_log_prob(tmp_path):
    """The script's figures, recomputed from its samples with the independent forward of
    `enumerable.base_log_probs` (whole vocabulary, EOS included, / (letters + 1))."""
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("fluency_floor_script", ROOT / "scripts" / "fluency_floor.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trainer, _ = _trainer(tmp_path, "tb")
    cfg = trainer.cfg
    cfg.task.evaluation.n_samples, cfg.task.evaluation.batch_size = 40, 16  # three batches
    report = script.run(cfg, tmp_path / "fluency")
    assert json.loads((tmp_path / "fluency" / "fluency.json").read_text())["p25"] == report["p25"]
    per_token = _per_token(trainer)
    values = torch.tensor([per_token[row["completion"]] for row in report["samples"]], dtype=torch.float64)
    assert len(values) == 40 and len(set(row["completion"] for row in report["samples"])) > 5
    for p in (5, 25, 50, 75):
        assert report[f"p{p}"] == pytest.approx(float(torch.quantile(values, p / 100)), abs=1e-4), p
