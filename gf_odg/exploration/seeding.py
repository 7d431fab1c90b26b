"""Seeding the replay buffer before the first step (`exploration.replay.seed`).

    none        the buffer starts empty (it fills with the sampler's own finds)
    enumerate   every completion the constraint mask admits is enumerated (as the exact evaluation
                does, at most `task.evaluation.exact_limit` of them), scored by the task's reward, and
                each one with a finite score enters the buffer under every prompt; a space too large
                to enumerate is a configuration error
    auto        enumerate where the space is enumerable, none elsewhere (text tasks)

A completion under `objective.fluency_floor` (mean per-token log p_ref of the base model below it) is
a violation like a -inf score, and stays out as well (this needs `model`, for the reference pass).

Why: a valid completion behind mostly-invalid continuations is found by on-policy sampling, tempering
or epsilon-uniform mixing only by luck. On `rng`, "100" is the one valid three-digit answer under "10";
once the policy learns that "10" followed by a digit is nearly always invalid, it stops sampling
"100" and trajectory balance never sees it again (issue 18: "100" ended with 0.0 of its target mass).
A seeded buffer replays it, at the priority of its log-reward, so the policy is trained on every
valid completion from the first step. The loss is unchanged: replayed trajectories are off-policy
samples, which trajectory balance and its relatives accept (on-policy objectives refuse replay).
"""

from __future__ import annotations

import logging
import math

from gf_odg.errors import ConfigError
import torch

from gf_odg.evaluation.exact import enumerate_terminals, reference_log_probs
from gf_odg.log_reward import below_fluency_floor, log_reward_fn, target_options
from gf_odg.rewards.base import call_reward

log = logging.getLogger(__name__)

SEEDS = ("none", "enumerate", "auto")


def seed_replay(replay, task, tokenizer, ocfg, mode: str, limit: int, model=None) -> int:
    """Fill `replay` as `mode` says (module docstring); the number of entries added."""
    if mode not in SEEDS:
        raise ConfigError(f"exploration.replay.seed={mode!r} is not one of {', '.join(SEEDS)}.")
    if replay is None or mode == "none":
        return 0
    terminals = enumerate_terminals(task.constraints, limit)
    if terminals is None or not terminals:
        if mode == "enumerate":
            raise ConfigError(
                f"exploration.replay.seed=enumerate: task {task.name!r} admits more than "
                f"task.evaluation.exact_limit={limit} completions (or none), too many to enumerate. Use "
                "exploration.replay.seed=auto (seeds only enumerable tasks) or none, or raise the limit.")
        return 0
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in terminals]
    target = target_options(ocfg, 0)
    if target.fluency_floor is not None and model is None:
        raise ValueError("seed_replay: objective.fluency_floor needs the model (for log p_ref).")
    lengths = torch.tensor([len(t) for t in terminals], dtype=torch.float64)  # tokens incl. EOS
    added = 0
    for index, prompt in enumerate(task.prompts):
        score = call_reward(task.reward, [prompt] * len(texts), texts, **task.reward_kwargs([index] * len(texts)))
        below = None
        if target.fluency_floor is not None:
            log_ref = reference_log_probs(model, tokenizer, task, index, terminals, target)
            below = below_fluency_floor(target, log_ref, lengths).tolist()
        keep = [i for i, s in enumerate(score.tolist()) if math.isfinite(s) and not (below and below[i])]
        if len(keep) > replay.capacity:
            log.warning("exploration.replay.seed=%s: %d valid completions for prompt %d, more than "
                        "exploration.replay.capacity=%d; the buffer keeps the best of them",
                        mode, len(keep), index, replay.capacity)
        added += sum(replay.add_batch([prompt] * len(keep), [tuple(terminals[i]) for i in keep],
                                      [texts[i] for i in keep], [float(score[i]) for i in keep],
                                      log_reward_fn=log_reward_fn(ocfg, 0)))
    log.info("replay seeded with %d enumerated valid completions (%d prompts)", added, len(task.prompts))
    return added
