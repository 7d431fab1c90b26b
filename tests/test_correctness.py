"""Where features meet (issue 17): paths that used to train silently toward another target.

- Modified SubTB must push down a completion whose reward is -inf: the last state of such a
  trajectory may terminate (EOS allowed and taken), so it terminates with the floored reward.
- Global replay must replay a trajectory under the prompt it was scored with.
- p_ref is the base model's own probability of the completion, EOS included, unmasked.
"""

from __future__ import annotations

import math

import pytest
import torch

from enumerable import (PROMPTS, SHORT, SHORT_INVALID, base_log_probs, enumerable_cfg, exact_probs, log_weights,
                        set_scores)
from gf_odg.generation.sampling import Trajectories
from gf_odg.training.step import StepBatch, loss_and_backward, prompt_batch
from gf_odg.training.trainer import Trainer

SHORT_TASK = ["task.max_new_tokens=3"]


def _trainer(tmp_path, objective: str, extra=(), prompts=None, log_z=(0.5, 2.5)) -> tuple[Trainer, list[dict]]:
    prompts = prompts or PROMPTS[:1]
    cfg = enumerable_cfg(tmp_path, objective, prompts=prompts, seeds=[0, 1][: len(prompts)],
                         extra=[*SHORT_TASK, *extra])
    trainer = Trainer(cfg, tmp_path / objective)
    trainer.setup()
    weights = [log_weights(seed, z, SHORT, SHORT_INVALID) for seed, z in zip((0, 1), log_z[: len(prompts)])]
    set_scores(trainer, weights, cfg.objective.beta, cfg.objective.ref_weight)
    return trainer, weights


def _hand_batch(trainer, texts: list[str], prompt_index: int = 0) -> StepBatch:
    """A batch of the given completions (one letter token each, then EOS) for one prompt."""
    tok, dev = trainer.tokenizer, trainer.device
    eos = trainer.task.constraints.eos_id
    rows = [[tok.encode(ch, add_special_tokens=False)[0] for ch in text] + [eos] for text in texts]
    assert all(tok.decode(r, skip_special_tokens=True) == t for r, t in zip(rows, texts))
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=dev)
    traj = Trajectories(group=torch.zeros(len(rows), dtype=torch.long, device=dev), tokens=tokens,
                        lengths=torch.tensor([len(r) for r in rows], device=dev), texts=list(texts))
    prompt = trainer.task.prompts[prompt_index]
    score = torch.tensor(trainer.reward([prompt] * len(texts), texts), dtype=torch.float32)
    return StepBatch(prompt_batch(trainer.task, tok, [prompt_index], dev), [prompt_index], traj, score,
                     torch.zeros(len(rows), dtype=torch.bool))


def _gradients(trainer, batch) -> list[torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=False)
    result = loss_and_backward(trainer.parts, trainer.cfg, batch, 0)
    assert result.finite
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    return [p.grad.detach().clone() for p in params]


# ---------------------------------------------------------------- item 1: SubTB and -inf rewards


def test_subtb_pushes_down_the_eos_of_an_invalid_completion_as_tb_does(tmp_path):
    """One-letter completions: states s_0 (EOS masked, flow log Z) and s_1 (EOS allowed and taken),
    so SubTB's one pair is TB's residual and their gradients must agree, for an invalid "b"
    (score -inf, floored) as for a valid "a"."""
    assert "b" in SHORT_INVALID and "a" not in SHORT_INVALID
    grads = {}
    for objective in ("tb", "subtb"):
        trainer, _ = _trainer(tmp_path, objective)
        grads[objective] = _gradients(trainer, _hand_batch(trainer, ["b", "a", "b"]))
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads["subtb"]))
    assert norm > 1e-3  # the invalid completion's EOS log-probability gets a gradient
    for tb, subtb in zip(grads["tb"], grads["subtb"]):
        torch.testing.assert_close(subtb, tb, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_subtb_leaves_no_mass_on_invalid_completions(tmp_path):
    trainer, weights = _trainer(tmp_path, "subtb", extra=[
        "trainer.samples_per_prompt=48", "trainer.max_steps=60", "trainer.lr=1e-2", "trainer.lr_schedule=cosine",
        "trainer.min_lr_ratio=0", "trainer.log_z_lr=0.3", "objective.log_reward_min=-10"])
    before = sum(exact_probs(trainer, 0)[c] for c in SHORT_INVALID)
    assert before > 0.05  # the untrained policy does put mass there
    while trainer.global_step < trainer.cfg.trainer.max_steps:
        trainer.step()
    invalid = sum(exact_probs(trainer, 0)[c] for c in SHORT_INVALID)
    assert invalid <= 0.01, (before, invalid)


# ---------------------------------------------------------------- item 2: global replay


@pytest.mark.parametrize("scope", ["global", "prompt"])
def test_replay_keeps_each_trajectory_with_its_prompt(tmp_path, scope):
    trainer, weights = _trainer(tmp_path, "tb", prompts=PROMPTS, extra=[
        "trainer.prompts_per_step=2", "trainer.samples_per_prompt=8", "exploration=replay",
        f"exploration.replay.scope={scope}", "exploration.replay.fraction=0.5", "exploration.replay.priority=uniform"])
    tables = trainer.reward.tables
    assert any(tables[PROMPTS[0]].get(c) != tables[PROMPTS[1]].get(c) for c in SHORT)
    replayed = 0
    for _ in range(3):
        trainer.step()
        batch = trainer.last_batch
        for i in torch.nonzero(batch.from_replay).flatten().tolist():
            prompt = batch.prompts.texts[int(batch.traj.group[i])]
            assert float(batch.score[i]) == pytest.approx(tables[prompt][batch.traj.texts[i]]), (prompt, i)
            replayed += 1
    assert replayed >= 16  # half of each of the last two batches


# ---------------------------------------------------------------- item 6: what p_ref means


def test_reference_is_the_base_models_own_probability_with_eos(tmp_path):
    """log R = score / beta + lambda * log p_base(y, EOS | x), the whole vocabulary in the softmax;
    "ab" is cut at max_new_tokens (EOS forced there under the mask, not under p_base)."""
    trainer, _ = _trainer(tmp_path, "tb", extra=["objective.beta=2", "objective.ref_weight=1"])
    texts = ["a", "ab", "cb", "ba"]
    batch = _hand_batch(trainer, texts)
    result = loss_and_backward(trainer.parts, trainer.cfg, batch, 0)
    base = base_log_probs(trainer, 0)
    expected = [float(s) / 2 + base[t] for s, t in zip(batch.score, texts)]
    assert result.log_reward.tolist() == pytest.approx(expected, abs=1e-4)
