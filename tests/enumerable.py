"""A small enumerable problem for exactness tests: three letters, completions of 1..3 letters + EOS.

39 terminal states; the target is a fixed non-uniform table per prompt. `exact_tv(trainer)` computes
the trained policy's exact distribution by scoring all 39 completions.
"""

from __future__ import annotations

import itertools
import math

import torch

from conftest import compose_cfg
from gf_odg.evaluation.core import enumerate_terminals, exact_distribution

LETTERS = ["a", "b", "c"]
COMPLETIONS = ["".join(p) for n in (1, 2, 3) for p in itertools.product(LETTERS, repeat=n)]
PROMPTS = ["Write some letters.", "Now write some other letters, please, in a different way."]


def target_table(seed: int, normalised: bool = False) -> dict[str, float]:
    """Scores log w(y) with w spread over two orders of magnitude, fixed by the seed; `normalised`
    shifts them to log-probabilities, so that every such table has log Z = 0."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(len(COMPLETIONS), generator=g) * 4.5 - 3.0  # natural-log weights in [-3, 1.5]
    if normalised:
        weights = weights - torch.logsumexp(weights, 0)
    return {c: float(w) for c, w in zip(COMPLETIONS, weights)}


def target_probs(table: dict[str, float]) -> dict[str, float]:
    z = math.log(sum(math.exp(v) for v in table.values()))
    return {k: math.exp(v - z) for k, v in table.items()}




def enumerable_cfg(tmp_path, objective: str, prompts=None, seeds=None, extra=(), normalised=False):
    prompts = prompts or PROMPTS[:1]
    seeds = seeds or [0] * len(prompts)
    overrides = [
        "model=tiny-random", "logger=none", "trainer.progress=false", f"objective={objective}",
        "task.max_new_tokens=4", "task.constraints={allowed:[a,b,c],min_new_tokens:1}",
        "task.evaluation.before_training=false", "task.evaluation.n_samples=16", "task.evaluation.exact=false",
        "model.lora.r=8", "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "exploration=on_policy", "trainer.samples_per_prompt=32", "trainer.lr=1e-2", "trainer.log_z_lr=0.1",
        "trainer.warmup_steps=0", "trainer.checkpoint_every=0", "trainer.sample_table_every=0",
        *extra,
    ]
    cfg = compose_cfg(overrides, tmp_path)
    cfg.task.prompts = prompts
    cfg.task.reward = {"_target_": "gf_odg.rewards.table.TableReward",
                       "tables": {p: target_table(s, normalised) for p, s in zip(prompts, seeds)}}
    return cfg


def exact_tvs(trainer) -> list[float]:
    """TV between the policy's exact distribution and each prompt's target."""
    task, tok = trainer.task, trainer.tokenizer
    terminals = enumerate_terminals(task.constraints)
    texts = [tok.decode(t, skip_special_tokens=True) for t in terminals]
    assert sorted(texts) == sorted(COMPLETIONS)
    out = []
    for i, prompt in enumerate(task.prompts):
        probs = exact_distribution(trainer.model, tok, task, i, terminals)
        assert abs(float(probs.sum()) - 1.0) < 1e-4  # the mask leaves exactly these 39 completions
        target = target_probs(task.reward.tables[prompt])
        out.append(0.5 * sum(abs(float(p) - target[t]) for p, t in zip(probs, texts)))
    return out


# ---------------------------------------------------------------- a harder problem, for the matrix
#
# What the plain problem above cannot tell apart: beta != 1 (a log_reward that ignores beta), lambda = 1
# (one that drops lambda * log p_ref, or uses another p_ref), -inf completions (SubTB without its
# floor), several scoring chunks, and two prompts with different partition functions. Here the
# score is built so that the target is known whatever beta and lambda are:
#
#     score(x, y) = beta * (w_x(y) - lambda * log p_ref(y | x)),   so   log R(x, y) = w_x(y)
#
# with w_x normalised to logsumexp = log_z[x], and -inf (absent from the table) on a third of the
# completions. log p_ref is computed here independently of the trainer: a plain forward of the base
# model (adapters off), log-softmax over the whole vocabulary, the completion's EOS included.
# SHORT (1..2 letters, 12 completions, `task.max_new_tokens=3`) trains in a few dozen steps; "b" is
# invalid while "ba" and "bb" are not: a state with an -inf prefix reward that must still terminate.

SHORT = [c for c in COMPLETIONS if len(c) <= 2]
SHORT_INVALID = ["b", "ac", "ca", "cc"]
INVALID = [COMPLETIONS[i] for i in torch.randperm(len(COMPLETIONS), generator=torch.Generator().manual_seed(7))[:13]]


def log_weights(seed: int, log_z: float, completions=COMPLETIONS, invalid=INVALID,
                spread: float = 4.5) -> dict[str, float]:
    """w(y) for the valid completions (spread over `spread` nats, fixed by the seed), logsumexp = log_z."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(len(completions), generator=g) * spread
    table = {c: float(v) for c, v in zip(completions, raw) if c not in invalid}
    shift = log_z - math.log(sum(math.exp(v) for v in table.values()))
    return {c: v + shift for c, v in table.items()}


@torch.no_grad()
def base_log_probs(trainer, prompt_index: int) -> dict[str, float]:
    """log p_base(y, EOS | x) of every completion: the base model's own probability, unmasked."""
    tok, model = trainer.tokenizer, trainer.model
    prompt = list(trainer.task.prompt_tokens[prompt_index])
    out = {}
    with model.disable_adapter():
        for completion in enumerate_terminals(trainer.task.constraints):  # one token a letter, then EOS
            text = tok.decode(completion, skip_special_tokens=True)
            ids = torch.tensor([prompt + completion], device=trainer.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].double()
            out[text] = float(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).sum())
    return out


def set_scores(trainer, weights: list[dict[str, float]], beta: float, ref_weight: float) -> None:
    """Give the trainer's table reward the scores whose log-reward is `weights[x]` (see above)."""
    tables = {}
    for i, prompt in enumerate(trainer.task.prompts):
        log_ref = base_log_probs(trainer, i) if ref_weight else {}
        tables[prompt] = {c: beta * (w - ref_weight * log_ref.get(c, 0.0)) for c, w in weights[i].items()}
    assert trainer.task.reward is trainer.reward
    trainer.reward.tables = tables


def exact_probs(trainer, prompt_index: int) -> dict[str, float]:
    """The trained policy's exact P_F(y | x) of every completion the mask admits, at temperature 1."""
    tok = trainer.tokenizer
    terminals = enumerate_terminals(trainer.task.constraints)
    texts = [tok.decode(t, skip_special_tokens=True) for t in terminals]
    assert len(set(texts)) == len(texts) and set(texts) <= set(COMPLETIONS)
    probs = exact_distribution(trainer.model, tok, trainer.task, prompt_index, terminals)
    assert abs(float(probs.sum()) - 1.0) < 1e-4
    return {t: float(p) for t, p in zip(texts, probs)}


def tv_to(probs: dict[str, float], weights: dict[str, float]) -> float:
    """TV between a distribution over completions and the target ∝ exp(weights), invalid mass included."""
    target = target_probs(weights)
    assert set(target) <= set(probs)
    return 0.5 * sum(abs(p - target.get(c, 0.0)) for c, p in probs.items())
