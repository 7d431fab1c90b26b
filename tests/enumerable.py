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
