"""Exact evaluation for any reward on an enumerable space: a reward defined here (no modes) on the tiny
model, its target with beta, floor and prior as training computes it, every figure against a hand
computation; and what an evaluation leaves behind (samples, plots, a printable block)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from enumerable import COMPLETIONS, enumerable_cfg
from gf_odg.data.tasks import build_task
from gf_odg.evaluation.core import evaluate, evaluate_policy
from gf_odg.evaluation.exact import (ExactDistribution, completion_log_probs, enumerate_terminals, exact_distribution,
                                     tree_log_probs)
from gf_odg.evaluation.report import format_samples, save_evaluation

LETTER_SCORES = {"a": 1.0, "b": -0.5, "c": -2.0}


def letters_reward(prompts, completions, **kwargs):
    """A user's reward with no modes(): the letters' scores summed; a doubled "c" is a hard violation."""
    return [-math.inf if "cc" in c else sum(LETTER_SCORES[ch] for ch in c) for c in completions]


def constant_reward(prompts, completions, **kwargs):
    return [-math.inf if "cc" in c else 0.0 for c in completions]


@pytest.fixture(scope="module")
def letters_task(tiny_policy, tmp_path_factory):
    _, tokenizer = tiny_policy
    cfg = enumerable_cfg(tmp_path_factory.mktemp("letters"), "tb")
    return lambda reward: build_task(cfg.task, tokenizer, cfg.model.chat_template, cfg.paths.root, reward=reward)


def _policy_by_text(model, tokenizer, task) -> dict[str, float]:
    terminals = enumerate_terminals(task.constraints)
    probs = exact_distribution(model, tokenizer, task, 0, terminals)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in terminals]
    assert sorted(texts) == sorted(COMPLETIONS) and abs(float(probs.sum()) - 1.0) < 1e-5
    return dict(zip(texts, probs.tolist()))


def _expected(policy: dict[str, float], scores: dict[str, float], beta: float, floor: float) -> dict:
    """The exact figures computed by hand: log R = max(score / beta, floor), p* ∝ R over all 39."""
    log_r = {y: max(s / beta, floor) if math.isfinite(s) else floor for y, s in scores.items()}
    z = sum(math.exp(v) for v in log_r.values())
    target = {y: math.exp(v) / z for y, v in log_r.items()}
    support = [y for y, s in scores.items() if math.isfinite(s)]
    p_mass, t_mass = sum(policy[y] for y in support), sum(target[y] for y in support)
    p_v = {y: policy[y] / p_mass for y in support}
    t_v = {y: target[y] / t_mass for y in support}
    return {
        "exact_kl": sum(p_v[y] * math.log(p_v[y] / t_v[y]) for y in support),
        "exact_reverse_kl": sum(t_v[y] * math.log(t_v[y] / p_v[y]) for y in support),
        "exact_tv": 0.5 * sum(abs(policy[y] - target[y]) for y in scores),
        "exact_valid_mass": p_mass,
        "exact_min_ratio": min(policy[y] / target[y] for y in support),
        "exact_starved": sum(policy[y] < 0.5 * target[y] for y in support),
        "exact_support": len(support),
    }


def test_exact_figures_of_a_reward_without_modes_match_a_hand_computation(tiny_policy, letters_task):
    model, tokenizer = tiny_policy
    task = letters_task(letters_reward)
    beta, floor = 0.5, -4.0  # scores / beta span [-9, 6]: the floor binds on some valid completions
    result, rows = evaluate(model, tokenizer, task, n_samples=16, batch_size=16, beta=beta, seed=0,
                            log_reward_min=floor)
    assert "kl_to_target" not in result and "n_modes" not in result  # the reward lists no modes
    scores = dict(zip(COMPLETIONS, letters_reward(None, COMPLETIONS)))
    expected = _expected(_policy_by_text(model, tokenizer, task), scores, beta, floor)
    assert 0 < expected["exact_starved"] < expected["exact_support"] < len(COMPLETIONS)  # every figure has work
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert result["exact_per_prompt"] == [{"prompt": 0, **{k: result[k] for k in expected}}]
    # neither beta nor the floor is decorative: without them the figures move
    plain, _ = evaluate(model, tokenizer, task, n_samples=16, batch_size=16, beta=1.0, seed=0, log_reward_min=-50.0)
    unfloored = _expected(_policy_by_text(model, tokenizer, task), scores, 1.0, -50.0)
    assert plain["exact_kl"] == pytest.approx(unfloored["exact_kl"], rel=1e-6)
    assert abs(plain["exact_kl"] - result["exact_kl"]) > 0.05


def test_the_prior_is_the_base_models_own_probability_with_eos(tiny_policy, letters_task):
    """A constant score with ref_weight = 1: the target on the support is p_ref(y|x), the base model's
    own probability over its whole vocabulary with the completion's EOS (docs/design.md), computed here
    by a plain forward pass; without the prior the target is uniform on the support."""
    from gf_odg.evaluation.exact import exact_distributions
    from gf_odg.model.loading import reference_mode

    model, tokenizer = tiny_policy
    task = letters_task(constant_reward)
    [dist] = exact_distributions(model, tokenizer, task, ref_weight=1.0)
    terminals = enumerate_terminals(task.constraints)
    prompt, eos = list(task.prompt_tokens[0]), task.constraints.eos_id
    expected = []
    with torch.no_grad(), reference_mode(model):
        for tokens in terminals:
            body = tokens[:-1] if tokens and tokens[-1] == eos else tokens
            ids = torch.tensor([prompt + body])
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
            steps = [*body, eos]
            expected.append(sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(steps)))
    expected = torch.tensor(expected, dtype=torch.float64)
    support = dist.valid
    want = (expected[support] - expected[support].logsumexp(0)).exp()
    got = (dist.log_target[support] - dist.log_target[support].logsumexp(0)).exp()
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    assert float((want - 1.0 / int(support.sum())).abs().max()) > 1e-3  # the prior is not uniform here
    [flat] = exact_distributions(model, tokenizer, task, ref_weight=0.0)
    flat_target = (flat.log_target[support] - flat.log_target[support].logsumexp(0)).exp()
    assert torch.allclose(flat_target, torch.full_like(flat_target, 1.0 / int(support.sum())), atol=1e-12)


@pytest.mark.parametrize("masked", [True, False])
def test_the_prefix_tree_gives_the_teacher_forced_probabilities(tiny_policy, letters_task, masked):
    """The exact evaluation runs one position per prefix of the completion tree; each completion's
    log-probability must equal teacher-forcing it whole, in the enumeration's order, under the mask
    (the policy) and over the whole vocabulary (the prior)."""
    model, tokenizer = tiny_policy
    task = letters_task(letters_reward)
    terminals, tree = tree_log_probs(model, tokenizer, task, 0, masked=masked)
    assert terminals == enumerate_terminals(task.constraints)
    forced = completion_log_probs(model, tokenizer, task, 0, terminals, masked=masked)
    assert torch.allclose(tree, forced, atol=1e-5), (tree - forced).abs().max()
    if masked:
        assert abs(float(tree.exp().sum()) - 1.0) < 1e-6
    else:
        assert float(tree.exp().sum()) < 0.99  # the unmasked prior puts mass outside the letters
    assert tree_log_probs(model, tokenizer, task, 0, limit=len(terminals) - 1, masked=masked) is None


def test_exact_limit_bounds_the_enumeration(tiny_policy, letters_task):
    model, tokenizer = tiny_policy
    task = letters_task(letters_reward)
    over, _ = evaluate(model, tokenizer, task, n_samples=8, batch_size=8, exact_limit=len(COMPLETIONS) - 1)
    at, _ = evaluate(model, tokenizer, task, n_samples=8, batch_size=8, exact_limit=len(COMPLETIONS))
    assert not any(key.startswith("exact_") for key in over)
    assert at["exact_support"] == sum(math.isfinite(s) for s in letters_reward(None, COMPLETIONS))


def test_figures_of_a_hand_made_distribution():
    """Three completions and an invalid one: one starved to zero mass, the target uniform on the support."""
    log = torch.tensor
    third = math.log(1 / 3)
    starved = ExactDistribution(0, ["x", "y", "z", "bad"], log([math.log(0.45), math.log(0.45), -math.inf,
                                                                 math.log(0.1)], dtype=torch.float64),
                                log([third, third, third, -math.inf], dtype=torch.float64),
                                torch.tensor([True, True, True, False])).figures()
    assert starved["exact_valid_mass"] == pytest.approx(0.9)
    assert starved["exact_kl"] == pytest.approx(math.log(1.5))  # p renormalised: (½, ½, 0) against thirds
    assert starved["exact_reverse_kl"] == math.inf and starved["exact_min_ratio"] == 0.0
    assert starved["exact_starved"] == 1 and starved["exact_support"] == 3
    assert starved["exact_tv"] == pytest.approx(0.5 * (2 * (0.45 - 1 / 3) + 1 / 3 + 0.1))


@pytest.mark.slow  # matplotlib and four figures: ~9 s on a loaded 2-core machine
def test_save_evaluation_writes_every_sample_and_the_plots(tiny_policy, letters_task, tmp_path):
    model, tokenizer = tiny_policy
    task = letters_task(letters_reward)
    evaluation = evaluate_policy(model, tokenizer, task, n_samples=24, batch_size=24, seed=1)
    assert len(evaluation.exact) == 1
    written = save_evaluation(tmp_path, "after", evaluation.result, evaluation.rows, task, exact=evaluation.exact)
    lines = (tmp_path / "samples_after.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == evaluation.rows and len(lines) == 24
    exact_lines = [json.loads(line) for line in (tmp_path / "exact_after.jsonl").read_text().splitlines()]
    (d,) = evaluation.exact
    assert [row["completion"] for row in exact_lines] == d.texts  # one row per enumerated completion
    assert sum(row["policy"] for row in exact_lines) == pytest.approx(1.0, abs=1e-6)  # float32 log-softmax per token
    assert [row["target"] for row in exact_lines] == pytest.approx(d.log_target.exp().tolist(), rel=1e-12)
    assert [row["valid"] for row in exact_lines] == d.valid.tolist()
    starved = sum(row["starved"] for row in exact_lines)
    assert starved == d.figures()["exact_starved"]
    for name in ("scores_after", "exact_distribution_after"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png in written and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    assert not list(tmp_path.rglob("*.tmp"))  # written whole, then moved into place


def test_format_samples_shows_the_most_frequent_and_a_seeded_few():
    rows = ([{"prompt": "p", "completion": "42", "score": -1.0}] * 5
            + [{"prompt": "p", "completion": "7", "score": -2.0}] * 3
            + [{"prompt": "p", "completion": f"x{i}", "score": None} for i in range(6)])
    block = format_samples(rows, k=2, seed=0)
    lines = block.splitlines()
    assert lines[0] == "samples (14 drawn, 8 distinct, 6 invalid):"
    assert lines[2].split() == ["5x", '"42"', "score", "-1"] and lines[3].split() == ["3x", '"7"', "score", "-2"]
    assert len(lines) == 2 + 2 + 1 + 2  # header, 2 frequent, header, 2 random
    assert format_samples(rows, k=2, seed=0) == block
    assert len({format_samples(rows, k=2, seed=s) for s in range(6)}) > 1  # the random few follow the seed
    two_prompts = format_samples([{"prompt": "first", "completion": "a", "score": 0.0},
                                  {"prompt": "second", "completion": "a", "score": 1.0}], k=2)
    assert '["first"]' in two_prompts and '["second"]' in two_prompts
