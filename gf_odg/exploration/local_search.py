"""Local search over completions: back off, resample the suffix, keep the better one
(Kim, Yun, Bengio, Zhang, Bengio, Ahn, Park, "Local Search GFlowNets", ICLR 2024).

For some of a step's fresh samples (`exploration.local_search.fraction`), each of `iterations` rounds:

  1. back off: keep the first n - k tokens of the completion (n tokens, EOS included), with
     k = `back_off` tokens, or k = ceil(back_off * n) when `back_off` is a fraction in (0, 1);
     a completion of no more than k tokens is resampled whole. In a language model the backward
     policy is deterministic (a state has one parent), so the paper's P_B-guided backtracking is
     simply this truncation.
  2. reconstruct: sample the rest from the behaviour policy P_F itself (the step's sampler, the same
     constraint mask, temperature 1, no epsilon), continuing the kept prefix.
  3. score the new completion with the task's reward, and accept it in place of the current one:
       greedy:      if log R' > log R (the paper's deterministic filtering: strictly higher);
       metropolis:  with probability min(1, R'/R).
     log R here is the tempered, floored score, score / beta (`log_reward_fn`, what replay ranks by),
     without the prior term lambda log p_ref: that would cost a reference pass per proposal.

The paper's stochastic filter is a Metropolis-Hastings test whose ratio also carries the proposal
terms, P_B(tau'|x') P_F(tau|...) over P_B(tau|x) P_F(tau'|...) (its code draws a Bernoulli with those
log-ratio logits). We follow the plain ratio min(1, R'/R) instead: the chain need not be exactly
reversible here, because its samples are never taken as draws from R; they are training data for
an off-policy loss (below), and what matters is that they lean to high reward without collapsing
onto the best one found.

Where the refined samples go: they replace the originals in the step's batch (the paper's step C
trains on the revised trajectories), and, being fresh rows of the batch, they then enter the replay
buffer with their own score like any fresh sample (`add_to_replay`). This is correct for the
off-policy objectives (TB, VarGrad, SubTB): the loss rescores every completion under P_F, with
its own reward, so any behaviour distribution is allowed, and local search is just another one.
The on-policy objectives (RLOO) refuse it (gf_odg/config/validation.py, `off_policy_keys`).

Cost: each round samples the refined rows again (the prefix is re-decoded token by token, forced,
then the suffix drawn) and scores them with the reward: about `iterations` x `fraction` more
sampling and reward calls per step; no extra gradient work (the batch size is unchanged).
"""

from __future__ import annotations

import math
import time

import torch

from gf_odg.generation.sampling import Trajectories, pad_tokens, sample
from gf_odg.log_reward import log_reward_fn
from gf_odg.rewards.base import call_reward

RULES = ("greedy", "metropolis")


def kept_length(length: int, back_off: float) -> int:
    """How many leading tokens of an `length`-token completion survive backing off."""
    k = int(back_off) if back_off >= 1 else math.ceil(back_off * length)
    return max(0, length - k)


def accept(log_r: torch.Tensor, new_log_r: torch.Tensor, rule: str, generator: torch.Generator) -> torch.Tensor:
    """[N] bool: which proposals replace the current completions (module docstring)."""
    if rule == "greedy":
        return new_log_r > log_r
    if rule == "metropolis":
        u = torch.rand(log_r.shape, generator=generator, dtype=torch.float64)
        return u < torch.exp((new_log_r.double() - log_r.double()).clamp(max=0.0))
    raise ValueError(f"exploration.local_search.accept={rule!r}: expected greedy or metropolis.")


def refine(policy, tokenizer, prompts, traj: Trajectories, score: torch.Tensor, constraints, score_fn, log_reward,
           settings, generator: torch.Generator, sample_gen: torch.Generator, share_prefill=True):
    """Local search on the rows of `traj` (scores `score`): returns (trajectories, scores, stats).

    `score_fn(group, texts) -> [M]` scores completions of the PromptBatch rows `group`; `log_reward`
    maps scores to the log R the acceptance compares; `settings` is `exploration.local_search`."""
    n = len(traj)
    if n == 0:
        return traj, score, {"local_search/accept_rate": 0.0, "local_search/score_gain": 0.0}
    tokens, texts, score = traj.token_lists(), list(traj.texts), score.clone().float()
    m = min(n, max(1, round(settings.fraction * n)))
    rows = torch.arange(n) if m == n else torch.randperm(n, generator=generator)[:m].sort().values
    group = traj.group[rows.to(traj.group.device)]
    proposed = accepted = 0
    before = score[rows].clone()
    for _ in range(int(settings.iterations)):
        prefixes = [tokens[i][: kept_length(len(tokens[i]), settings.back_off)] for i in rows.tolist()]
        new = sample(policy, tokenizer, prompts, group, constraints, temperature=1.0, epsilon=0.0,
                     generator=sample_gen, share_prefill=share_prefill, prefix_tokens=prefixes)
        new_score = torch.as_tensor(score_fn(group, new.texts), dtype=torch.float32).cpu()
        take = accept(log_reward(score[rows]), log_reward(new_score), settings.accept, generator)
        new_tokens = new.token_lists()
        for j, i in enumerate(rows.tolist()):
            if take[j]:
                tokens[i], texts[i], score[i] = new_tokens[j], new.texts[j], new_score[j]
        proposed, accepted = proposed + m, accepted + int(take.sum())
    after = score[rows]
    finite = torch.isfinite(before) & torch.isfinite(after)
    stats = {"local_search/accept_rate": accepted / proposed if proposed else 0.0,
             "local_search/score_gain": float((after - before)[finite].mean()) if bool(finite.any()) else 0.0}
    return _trajectories(traj, tokens, texts, constraints.eos_id), score, stats


def _trajectories(traj: Trajectories, tokens: list[list[int]], texts: list[str], eos: int) -> Trajectories:
    out, lengths = pad_tokens(tokens, eos, traj.tokens.device)
    return Trajectories(group=traj.group, tokens=out, lengths=lengths.to(traj.lengths.device, traj.lengths.dtype),
                        texts=texts)


def refine_batch(parts, cfg, prompts, indices: list[int], traj: Trajectories, score: torch.Tensor, step: int,
                 generator: torch.Generator, sample_gen: torch.Generator):
    """`refine` wired to a training step's collaborators (gf_odg/training/step.py `collect`)."""
    t0 = time.perf_counter()
    task = parts.task

    def score_fn(group, texts):
        rows = [indices[int(g)] for g in group]
        return call_reward(parts.reward, [task.prompts[i] for i in rows], texts, **task.reward_kwargs(rows))

    traj, score, stats = refine(parts.policy, parts.tokenizer, prompts, traj, score, task.constraints, score_fn,
                                log_reward_fn(cfg.objective, step), cfg.exploration.local_search, generator,
                                sample_gen, cfg.trainer.share_prompt_prefill)
    stats["time/local_search"] = time.perf_counter() - t0
    return traj, score, stats
