"""Exact evaluation: where the constraint mask admits few enough completions, enumerate them all and
compare the policy's distribution over them with the training target, for any reward.

For each prompt x and every completion y the mask admits (tokens, EOS included):

    P_F(y | x)     the policy at temperature 1 under the mask (what the sampler draws from)
    log R(x, y)    = max(score(x, y) / beta + lambda * prior(x, y), log_reward_min), or log_reward_min
                     under the fluency floor (gf_odg.log_reward.target_log_reward, as training computes
                     it, with the same p_ref: unmasked, or masked with objective.ref_masked)
    p*(y | x)      = R(x, y) / Σ_y' R(x, y')

The support is the valid completions: a finite score and not under the fluency floor (a violation;
training floors it, so it keeps a mass of order exp(log_reward_min) in p*). Reported per prompt:

    exact_kl          KL(P_F ‖ p*) over the support, both renormalised to it (the invalid mass is
                      exact_valid_mass's and exact_tv's to report)
    exact_reverse_kl  KL(p* ‖ P_F), the same renormalisation: large when the policy starves
                      completions the target wants, which the forward KL barely sees
    exact_tv          ½ Σ_y |P_F(y) − p*(y)| over every completion, invalid ones included
    exact_valid_mass  Σ_{y in support} P_F(y)
    exact_min_ratio   min over the support of P_F(y) / p*(y)
    exact_starved     completions of the support with P_F(y) < ½ p*(y)
    exact_support     completions with a finite score

and over prompts: the mean of the first four, the minimum ratio, and the totals of the counts.
Log-probabilities are kept in float64 throughout, so that a target tail near 1e-50 (a Binomial
table) is neither lost to underflow on the target's side nor on the policy's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from gf_odg.config.schema import EvaluationConfig, ObjectiveConfig
from gf_odg.data.prompts import PromptBatch
from gf_odg.generation.sampling import decoder_and_head, head_logits, pad_tokens
from gf_odg.generation.scoring import completion_hidden, score_completions
from gf_odg.log_reward import TargetOptions, below_fluency_floor, target_log_reward
from gf_odg.rewards.base import call_reward

EXACT_LIMIT = EvaluationConfig.exact_limit
LOG_REWARD_MIN = ObjectiveConfig.log_reward_min
STARVED_RATIO = 0.5  # a completion holding less than this fraction of its target mass counts as starved


def enumerate_terminals(constraints, limit: int = EXACT_LIMIT) -> Optional[list[list[int]]]:
    """Every completion (tokens incl. EOS) the constraint mask admits, or None if more than `limit`."""
    frontier, terminals = [[]], []
    for t in range(constraints.max_new_tokens):
        if not frontier:
            break
        prefix = torch.tensor(frontier, dtype=torch.long).reshape(len(frontier), t)
        allowed = constraints.mask(prefix, t)
        if int(allowed.sum()) + len(terminals) > limit:
            return None
        nxt = []
        for row, tokens in zip(allowed, frontier):
            for token in row.nonzero().flatten().tolist():
                (terminals if token == constraints.eos_id else nxt).append(tokens + [token])
        frontier = nxt
    return terminals


@torch.no_grad()
def completion_log_probs(model, tokenizer, task, prompt_index: int, terminals: list[list[int]],
                         share_prefill: bool = True, batch_size: int = 512, masked: bool = True) -> torch.Tensor:
    """log P_F(y|x) under the constraint mask of every terminal completion: [len(terminals)] float64.
    `masked=False`: over the whole vocabulary, as the prior p_ref is scored in training."""
    device = next(model.parameters()).device
    prompts = PromptBatch.build([task.prompt_tokens[prompt_index]], [task.prompts[prompt_index]],
                                tokenizer.pad_token_id, device)
    out = []
    for start in range(0, len(terminals), batch_size):
        chunk = terminals[start: start + batch_size]
        tokens, lengths = pad_tokens(chunk, task.constraints.eos_id, device)
        group = torch.zeros(len(chunk), dtype=torch.long, device=device)
        lp = score_completions(model, prompts, group, tokens, lengths, task.constraints if masked else None,
                               task.constraints.eos_id,
                               share_prefill=share_prefill)
        out.append(lp.total().double().cpu())
    return torch.cat(out)


def exact_distribution(model, tokenizer, task, prompt_index: int, terminals: list[list[int]],
                       share_prefill: bool = True, batch_size: int = 512) -> torch.Tensor:
    """P_F(y|x) of every terminal completion: [len(terminals)] float64."""
    return completion_log_probs(model, tokenizer, task, prompt_index, terminals, share_prefill, batch_size).exp()


@dataclass
class ExactDistribution:
    """One prompt's policy and target over every completion the mask admits (enumeration order)."""

    prompt_index: int
    texts: list[str]  # [C] decoded as the sampler decodes
    log_policy: torch.Tensor  # [C] float64 log P_F(y | x)
    log_target: torch.Tensor  # [C] float64 log p*(y | x)
    valid: torch.Tensor  # [C] bool: finite score (the support)

    def figures(self) -> dict:
        """This prompt's exact figures (the module docstring defines them)."""
        p, t = self.log_policy.exp(), self.log_target.exp()
        support = self.valid & (t > 0)
        n_support = int(support.sum())
        valid_mass = float(p[self.valid].sum())
        result = {"exact_tv": 0.5 * float((p - t).abs().sum()), "exact_valid_mass": valid_mass,
                  "exact_support": n_support, "exact_starved": int((p[support] < STARVED_RATIO * t[support]).sum())}
        if n_support == 0:
            return {**result, "exact_kl": math.nan, "exact_reverse_kl": math.nan, "exact_min_ratio": math.nan}
        log_p = self.log_policy[support] - torch.logsumexp(self.log_policy[support], 0)  # renormalised to the support
        log_t = self.log_target[support] - torch.logsumexp(self.log_target[support], 0)
        result["exact_kl"] = _kl(log_p, log_t)
        result["exact_reverse_kl"] = _kl(log_t, log_p)
        result["exact_min_ratio"] = float((self.log_policy[support] - self.log_target[support]).min().exp())
        return result


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Σ p (log p − log q) from log-probabilities; terms with p = 0 add nothing, q = 0 < p gives inf."""
    p = log_p.exp()
    if bool(((p > 0) & torch.isneginf(log_q)).any()):
        return math.inf
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return max(0.0, float(terms.sum()))  # rounding can leave -1e-17 for identical distributions


@torch.no_grad()
def tree_log_probs(model, tokenizer, task, prompt_index: int, limit: int = EXACT_LIMIT, share_prefill: bool = True,
                   batch_size: int = 512, masked: bool = True) -> Optional[tuple[list[list[int]], torch.Tensor]]:
    """(every completion the mask admits, in `enumerate_terminals`' order; log P_F(y|x) of each [C]
    float64), or None if more than `limit`. One forward position per prefix of the completion tree,
    not one per token of every completion: rng's 1,110 completions (3,330 teacher-forced tokens) are
    111 prefixes, and a prefix where the mask admits a single token costs nothing under the mask.
    `masked=False`: over the whole vocabulary (EOS included), as the prior p_ref is scored in
    training; every prefix then runs. `completion_log_probs` is the teacher-forced equivalent."""
    constraints = task.constraints
    device = next(model.parameters()).device
    _, lm_head, config = decoder_and_head(model)
    prompts = PromptBatch.build([task.prompt_tokens[prompt_index]], [task.prompts[prompt_index]],
                                tokenizer.pad_token_id, device)
    columns = constraints.columns  # the tokens that can ever be allowed (None: the vocabulary)
    ids = None if columns is None else columns.cpu()
    frontier, frontier_lp = [[]], [0.0]
    terminals, terminal_lp = [], []
    for t in range(constraints.max_new_tokens):
        if not frontier:
            break
        prefix = torch.tensor(frontier, dtype=torch.long).reshape(len(frontier), t)
        allowed = constraints.mask(prefix, t).cpu()  # [F, V] bool
        allowed = allowed if ids is None else allowed[:, ids]  # [F, C]: column j is token ids[j]
        counts = allowed.count_nonzero(1)
        if int(counts.sum()) + len(terminals) > limit:
            return None
        log_cond = torch.zeros(allowed.shape, dtype=torch.float64)  # log P(token | prefix) where allowed
        rows = (counts > 1).nonzero().flatten() if masked else torch.arange(len(frontier))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            tokens = torch.full((len(chunk), t + 1), constraints.eos_id, dtype=torch.long)
            tokens[:, :t] = prefix[chunk]  # the last column is never fed: hidden[:, t] predicts token t
            group = torch.zeros(len(chunk), dtype=torch.long, device=device)
            hidden = completion_hidden(model, prompts, group, tokens.to(device), share_prefill)[:, t]
            if masked:
                logits = head_logits(lm_head, config, hidden, None if ids is None else ids.to(device))
                logits = logits.double().cpu().masked_fill(~allowed[chunk], float("-inf"))
                log_cond[chunk] = torch.log_softmax(logits, dim=-1)
            else:
                full = torch.log_softmax(head_logits(lm_head, config, hidden).double(), dim=-1).cpu()
                log_cond[chunk] = full if ids is None else full[:, ids]
        nxt, nxt_lp = [], []
        for i, j in allowed.nonzero().tolist():  # row-major: each prefix's children in token order
            token = j if ids is None else int(ids[j])
            child, child_lp = frontier[i] + [token], frontier_lp[i] + float(log_cond[i, j])
            if token == constraints.eos_id:
                terminals.append(child)
                terminal_lp.append(child_lp)
            else:
                nxt.append(child)
                nxt_lp.append(child_lp)
        frontier, frontier_lp = nxt, nxt_lp
    return terminals, torch.tensor(terminal_lp, dtype=torch.float64)


def target_of(beta: float = 1.0, log_reward_min: float = LOG_REWARD_MIN, ref_weight: float = 0.0,
              ref_masked: bool = False, target: Optional[TargetOptions] = None) -> TargetOptions:
    """`target`, or one made of the separate keys (older call sites)."""
    if target is not None:
        return target
    return TargetOptions(beta=beta, log_reward_min=log_reward_min, ref_weight=ref_weight, ref_masked=ref_masked)


def task_scores(task, prompt_index: int, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
    """The task's reward of each of `texts` under one prompt: [C] float64."""
    scores = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start: start + batch_size]
        slots = [prompt_index] * len(chunk)
        scores.append(call_reward(task.reward, [task.prompts[prompt_index]] * len(chunk), chunk,
                                  **task.reward_kwargs(slots)))
    return torch.cat(scores).double()


def exact_target(task, prompt_index: int, texts: list[str], beta: float = 1.0,
                 log_reward_min: float = LOG_REWARD_MIN, ref_weight: float = 0.0,
                 log_ref: Optional[torch.Tensor] = None, batch_size: int = 1024, *,
                 target: Optional[TargetOptions] = None,
                 lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p*(y | x) [C] float64, valid mask [C]) for one prompt's completions `texts`: each scored
    by the task's reward and priced by `target_log_reward` as training prices its samples. Valid: a
    finite score, not under the fluency floor. `lengths`: tokens incl. EOS (floor, length normalisation)."""
    target = target_of(beta, log_reward_min, ref_weight, target=target)
    score = task_scores(task, prompt_index, texts, batch_size)  # [C]
    log_ref = None if log_ref is None else log_ref.double()
    lengths = None if lengths is None else lengths.double()
    log_r = target_log_reward(score, target, log_ref, lengths)
    valid = torch.isfinite(score)
    below = below_fluency_floor(target, log_ref, lengths)
    if below is not None:
        valid &= ~below
    return torch.log_softmax(log_r, dim=0), valid


def reference_log_probs(model, tokenizer, task, prompt_index: int, terminals: list[list[int]],
                        target: TargetOptions, share_prefill: bool = True) -> Optional[torch.Tensor]:
    """log p_ref(y | x) [C] float64 as training computes it (the same network with its adapters off;
    unmasked, EOS included, or under the mask with objective.ref_masked), or None when the target does
    not read it."""
    if not target.needs_reference:
        return None
    from gf_odg.model.loading import reference_mode

    with reference_mode(model):
        tree = tree_log_probs(model, tokenizer, task, prompt_index, len(terminals), share_prefill,
                              masked=target.ref_masked)
    if tree is None or tree[0] != terminals:  # terminals not the mask's whole space: teacher-force them
        with reference_mode(model):
            return completion_log_probs(model, tokenizer, task, prompt_index, terminals, share_prefill,
                                        masked=target.ref_masked)
    return tree[1]


@torch.no_grad()
def exact_distributions(model, tokenizer, task, beta: float = 1.0, log_reward_min: float = LOG_REWARD_MIN,
                        ref_weight: float = 0.0, share_prefill: bool = True, limit: int = EXACT_LIMIT,
                        prompt_indices: Optional[list[int]] = None, ref_masked: bool = False, *,
                        target: Optional[TargetOptions] = None) -> Optional[list[ExactDistribution]]:
    """Each prompt's exact policy and target over every completion (every prompt of the task by
    default); None when the mask admits more than `limit` completions. `target` (target_options of
    the objective) replaces beta, log_reward_min, ref_weight and ref_masked."""
    target = target_of(beta, log_reward_min, ref_weight, ref_masked, target)
    out, texts, lengths = [], None, None
    for p in (range(len(task.records)) if prompt_indices is None else prompt_indices):
        tree = tree_log_probs(model, tokenizer, task, p, limit, share_prefill)
        if tree is None or not tree[0]:  # more than `limit` completions (or none)
            return None
        terminals, log_policy = tree
        if texts is None:
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in terminals]
            lengths = torch.tensor([len(t) for t in terminals], dtype=torch.float64)  # tokens incl. EOS
        log_ref = reference_log_probs(model, tokenizer, task, p, terminals, target, share_prefill)
        log_target, valid = exact_target(task, p, texts, target=target, log_ref=log_ref, lengths=lengths)
        out.append(ExactDistribution(p, texts, log_policy, log_target, valid))
    return out


def summarize(distributions: list[ExactDistribution]) -> dict:
    """The figures over prompts: means of KL, reverse KL, TV and valid mass; the minimum ratio; the
    totals of the counts; and each prompt's own under `exact_per_prompt`."""
    per_prompt = [{"prompt": d.prompt_index, **d.figures()} for d in distributions]
    if not per_prompt:
        return {}

    def finite_mean(key):
        values = [row[key] for row in per_prompt if not math.isnan(row[key])]
        return sum(values) / len(values) if values else math.nan

    ratios = [row["exact_min_ratio"] for row in per_prompt if not math.isnan(row["exact_min_ratio"])]
    result = {key: finite_mean(key) for key in ("exact_kl", "exact_reverse_kl", "exact_tv", "exact_valid_mass")}
    result["exact_min_ratio"] = min(ratios) if ratios else math.nan
    result["exact_starved"] = sum(row["exact_starved"] for row in per_prompt)
    result["exact_support"] = sum(row["exact_support"] for row in per_prompt)
    result["exact_per_prompt"] = per_prompt
    return result


def exact_metrics(model, tokenizer, task, beta: float = 1.0, log_reward_min: float = LOG_REWARD_MIN,
                  ref_weight: float = 0.0, share_prefill: bool = True,
                  limit: int = EXACT_LIMIT, ref_masked: bool = False, *,
                  target: Optional[TargetOptions] = None) -> tuple[dict, list[ExactDistribution]]:
    """(figures, per-prompt distributions) of the policy at temperature 1 against the training
    target; ({}, []) when the completion space is too large to enumerate."""
    distributions = exact_distributions(model, tokenizer, task, share_prefill=share_prefill, limit=limit,
                                        target=target_of(beta, log_reward_min, ref_weight, ref_masked, target))
    if not distributions:
        return {}, []
    return summarize(distributions), distributions
