"""Evaluating a sampler: draw completions at temperature 1 under the constraint mask and measure them.

For tasks with modes (`rng`: the integers) the empirical distribution is compared with the target
    p*(m) ∝ exp(score(m) / beta)
(KL(p_hat || p*) over valid samples, TV including the invalid mass). Where the completion space is
enumerable under the constraint mask (`rng`: 1,110 digit strings), the policy's *exact*
distribution is computed by scoring every terminal completion, and reported beside the sampled
figures: the plug-in KL of a perfect sampler is biased by about (k - 1) / (2n) nats.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional

import torch

from gf_odg import metrics
from gf_odg.prompts import PromptBatch
from gf_odg.rewards.base import call_reward
from gf_odg.sampling import sample
from gf_odg.scoring import score_completions


def sample_task(model, tokenizer, task, n_samples: int, batch_size: int, generator: torch.Generator,
                share_prefill: bool = True, temperature: float = 1.0, device=None):
    """n_samples completions spread evenly over the task's prompts -> (texts, prompt_indices, token lists)."""
    device = device or next(model.parameters()).device
    n_prompts = len(task.records)
    order = [i % n_prompts for i in range(n_samples)]
    texts, indices, tokens = [], [], []
    for start in range(0, n_samples, batch_size):
        chunk = order[start: start + batch_size]
        used = sorted(set(chunk))
        local = {p: j for j, p in enumerate(used)}
        prompts = PromptBatch.build([task.prompt_tokens[p] for p in used], [task.prompts[p] for p in used],
                                    tokenizer.pad_token_id, device)
        group = torch.tensor([local[p] for p in chunk], device=device)
        traj = sample(model, tokenizer, prompts, group, task.constraints, temperature=temperature,
                      generator=generator, share_prefill=share_prefill)
        texts += traj.texts
        indices += chunk
        tokens += traj.token_lists()
    return texts, indices, tokens


def mode_target(task, beta: float) -> Optional[dict]:
    """p*(m) ∝ exp(score(m)/beta) over the reward's listed modes (first prompt's context)."""
    if not hasattr(task.reward, "modes"):
        return None
    modes = list(task.reward.modes())
    scores = call_reward(task.reward, [task.prompts[0]] * len(modes), modes, **task.reward_kwargs([0] * len(modes)))
    weights = torch.softmax(scores / beta, dim=0)
    return {m: float(w) for m, w in zip(modes, weights)}


def enumerate_terminals(constraints, limit: int = 20000) -> Optional[list[list[int]]]:
    """Every completion (tokens incl. EOS) the constraint mask admits, or None if more than `limit`."""
    frontier, terminals = [[]], []
    for t in range(constraints.max_new_tokens):
        if not frontier:
            break
        prefix = torch.tensor(frontier, dtype=torch.long).reshape(len(frontier), t)
        allowed = constraints.mask(prefix, t)
        nxt = []
        for row, tokens in zip(allowed, frontier):
            for token in row.nonzero().flatten().tolist():
                (terminals if token == constraints.eos_id else nxt).append(tokens + [token])
        if len(terminals) + len(nxt) > limit:
            return None
        frontier = nxt
    return terminals


@torch.no_grad()
def exact_distribution(model, tokenizer, task, prompt_index: int, terminals: list[list[int]],
                       share_prefill: bool = True, batch_size: int = 512) -> torch.Tensor:
    """P_F(y|x) of every terminal completion: [len(terminals)]."""
    device = next(model.parameters()).device
    prompts = PromptBatch.build([task.prompt_tokens[prompt_index]], [task.prompts[prompt_index]],
                                tokenizer.pad_token_id, device)
    out = []
    for start in range(0, len(terminals), batch_size):
        chunk = terminals[start: start + batch_size]
        width = max(len(t) for t in chunk)
        tokens = torch.full((len(chunk), width), task.constraints.eos_id, dtype=torch.long, device=device)
        for i, t in enumerate(chunk):
            tokens[i, : len(t)] = torch.tensor(t)
        lengths = torch.tensor([len(t) for t in chunk], device=device)
        group = torch.zeros(len(chunk), dtype=torch.long, device=device)
        lp = score_completions(model, prompts, group, tokens, lengths, task.constraints, task.constraints.eos_id,
                               share_prefill=share_prefill)
        out.append(lp.total().float().cpu())
    return torch.cat(out).exp()


def evaluate(model, tokenizer, task, n_samples: int = 512, batch_size: int = 128, beta: float = 1.0,
             seed: int = 0, share_prefill: bool = True, exact: bool = True) -> tuple[dict, list[dict]]:
    """Returns (metrics, sample rows)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    texts, indices, _ = sample_task(model, tokenizer, task, n_samples, batch_size, generator, share_prefill)
    prompts = [task.prompts[i] for i in indices]
    scores = call_reward(task.reward, prompts, texts, **task.reward_kwargs(indices))
    finite = torch.isfinite(scores)
    result = {
        "n_samples": len(texts),
        "valid_fraction": float(finite.float().mean()),
        "score_mean": float(scores[finite].mean()) if finite.any() else float("nan"),
        "unique_fraction": metrics.unique_fraction(texts),
    }
    target = mode_target(task, beta) if hasattr(task.reward, "mode_of") else None
    if target is not None:
        modes = [task.reward.mode_of(t) for t in texts]
        modes = [None if m is None else str(m) for m in modes]
        hist = metrics.mode_histogram(modes)
        empirical = metrics.empirical_distribution(modes)
        result.update({
            "distinct": len(hist),
            "n_modes": len(target),
            "kl_to_target": metrics.kl_divergence(empirical, target) if empirical else float("inf"),
            "tv_to_target": _tv_with_invalid(Counter({m: c / len(modes) for m, c in hist.items()}), target,
                                              1.0 - result["valid_fraction"]),
            "mode_entropy": metrics.mode_entropy(hist),
        })
        if exact:
            result.update(_exact_metrics(model, tokenizer, task, target, share_prefill))
    rows = [{"prompt": p, "completion": t, "score": float(s)} for p, t, s in zip(prompts, texts, scores)]
    return result, rows


def _tv_with_invalid(p: dict, target: dict, invalid_mass: float) -> float:
    keys = set(p) | set(target)
    return 0.5 * (sum(abs(p.get(k, 0.0) - target.get(k, 0.0)) for k in keys) + invalid_mass)


def _exact_metrics(model, tokenizer, task, target: dict, share_prefill: bool) -> dict:
    terminals = enumerate_terminals(task.constraints)
    if terminals is None:
        return {}
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in terminals]
    modes = [task.reward.mode_of(t) for t in texts]
    kls, tvs, valid = [], [], []
    for prompt_index in range(len(task.records)):
        probs = exact_distribution(model, tokenizer, task, prompt_index, terminals, share_prefill)
        per_mode, invalid = Counter(), 0.0
        for mode, p in zip(modes, probs.tolist()):
            if mode is None:
                invalid += p
            else:
                per_mode[str(mode)] += p
        valid_mass = sum(per_mode.values())
        conditional = {m: p / valid_mass for m, p in per_mode.items()} if valid_mass > 0 else {}
        kls.append(metrics.kl_divergence(conditional, target) if conditional else math.inf)
        tvs.append(_tv_with_invalid(per_mode, target, invalid))
        valid.append(valid_mass)
    return {"exact_kl": sum(kls) / len(kls), "exact_tv": sum(tvs) / len(tvs),
            "exact_valid_mass": sum(valid) / len(valid)}
