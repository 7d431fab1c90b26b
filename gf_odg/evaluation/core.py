"""Evaluating a sampler: draw completions under the constraint mask with a decoding, and measure them.

One code path serves the end-of-training evaluation (`evaluate` / `evaluate_policy`, called by the
trainer) and the standalone `scripts/evaluate.py` (`evaluate_decodings` on a base model plus an
adapter, with decoding baselines of the same model beside the policy):

    sampling.draw_samples    completions of one decoding (temperature T, nucleus p, best of n), scored once
    measure.measure          scores, validity, diversity, modes: `metrics` picks which (measure.METRICS)
    exact.exact_metrics      the policy's exact distribution over every completion against the training
                             target, for any reward, where the mask admits at most `exact_limit` completions
    report.save_evaluation   samples_<tag>.jsonl and the plots, into a run dir
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from gf_odg.evaluation.exact import (EXACT_LIMIT, LOG_REWARD_MIN, ExactDistribution, enumerate_terminals,
                                     exact_distribution, exact_metrics, target_of)
from gf_odg.evaluation.measure import METRICS, NEEDS_THRESHOLD, SELF_BLEU_MAX_TEXTS, SLOW_METRICS, measure, mode_targets
from gf_odg.evaluation.sampling import POLICY, Decoding, Samples, draw_samples, sample_rows
from gf_odg.log_reward import TargetOptions

# Older import paths (scripts/benchmark.py, tests/enumerable.py) read these from here.
__all__ = ["Evaluation", "evaluate", "evaluate_decodings", "evaluate_policy", "POLICY", "Decoding", "Samples",
           "sample_rows", "enumerate_terminals", "exact_distribution", "METRICS"]


def evaluate_decodings(model, tokenizer, task, prompt_order: list[int], decodings: list[Decoding],
                       metric_names: Iterable[str], batch_size: int = 128, beta: float = 1.0, seed: int = 0,
                       share_prefill: bool = True, threshold: Optional[float] = None,
                       self_bleu_max_texts: int = SELF_BLEU_MAX_TEXTS,
                       progress: bool = False, same_meaning: float = 0.9, *,
                       log_reward_min: float = LOG_REWARD_MIN, ref_weight: float = 0.0,
                       exact_limit: int = EXACT_LIMIT,
                       target: Optional[TargetOptions] = None) -> dict[str, tuple[dict, Samples]]:
    """{decoding name: (metrics, samples)}. Every decoding starts from the same seed (common random
    numbers: differences between decodings are not sampling noise of the seed). `exact` applies to
    the policy's own decoding only (temperature 1, no nucleus, one draw), whose samples then carry
    each prompt's exact distribution (`samples.exact`). The exact target is the training one:
    `target` (gf_odg.log_reward.target_options of the objective: prior, normalisation, fluency
    floor, ref_masked), or `beta`, `log_reward_min` and `ref_weight` alone."""
    target = target_of(beta, log_reward_min, ref_weight, target=target)
    names = set(metric_names)
    device = next(model.parameters()).device
    targets = mode_targets(task, beta) if "modes" in names else None
    results = {}
    for decoding in decodings:
        same = next((s for _, s in results.values() if s.decoding.is_policy), None) if decoding.is_policy else None
        if same is not None:  # temperature_1 beside the policy: the same draws
            samples = Samples(decoding, same.prompt_indices, same.texts, same.tokens, same.scores, same.terms,
                              same.exact)
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
            samples = draw_samples(model, tokenizer, task, prompt_order, decoding, batch_size, generator,
                                   share_prefill, progress)
        result = measure(task, samples, names - {"exact"}, targets, threshold,
                         self_bleu_max_texts=self_bleu_max_texts, same_meaning=same_meaning)
        if "exact" in names and decoding.is_policy:
            if same is None:
                figures, samples.exact = exact_metrics(model, tokenizer, task, share_prefill=share_prefill,
                                                       limit=exact_limit, target=target)
            else:
                figures = {key: value for key, value in results[same.decoding.name][0].items()
                           if key.startswith("exact_")}
            result.update(figures)
        results[decoding.name] = (result, samples)
    return results


@dataclass
class Evaluation:
    """The end-of-training evaluation: figures, one row per sample, and (on an enumerable task) each
    prompt's exact distribution against its target."""

    result: dict
    rows: list[dict]
    exact: list[ExactDistribution] = field(default_factory=list)


def evaluate_policy(model, tokenizer, task, n_samples: int = 512, batch_size: int = 128, beta: float = 1.0,
                    seed: int = 0, share_prefill: bool = True, exact: bool = True, diversity: bool = False,
                    log_reward_min: float = LOG_REWARD_MIN, ref_weight: float = 0.0,
                    exact_limit: int = EXACT_LIMIT, target: Optional[TargetOptions] = None) -> Evaluation:
    """The policy's evaluation: `n_samples` completions spread evenly over the prompts, measured;
    with `exact`, the exact figures where the task is enumerable. `diversity` adds self-BLEU and
    MiniLM semantic diversity (seconds to minutes on a CPU: off by default so that training runs
    stay short)."""
    names = set(METRICS) - NEEDS_THRESHOLD
    if not diversity:
        names -= SLOW_METRICS
    if not exact:
        names.discard("exact")
    order = [i % len(task.records) for i in range(n_samples)]
    result, samples = evaluate_decodings(model, tokenizer, task, order, [POLICY], names, batch_size, beta, seed,
                                         share_prefill, log_reward_min=log_reward_min, ref_weight=ref_weight,
                                         exact_limit=exact_limit, target=target)[POLICY.name]
    return Evaluation(result, sample_rows(task, samples), samples.exact)


def evaluate(model, tokenizer, task, n_samples: int = 512, batch_size: int = 128, beta: float = 1.0,
             seed: int = 0, share_prefill: bool = True, exact: bool = True, diversity: bool = False,
             log_reward_min: float = LOG_REWARD_MIN, ref_weight: float = 0.0,
             exact_limit: int = EXACT_LIMIT) -> tuple[dict, list[dict]]:
    """`evaluate_policy` as (metrics, sample rows)."""
    evaluation = evaluate_policy(model, tokenizer, task, n_samples, batch_size, beta, seed, share_prefill, exact,
                                 diversity, log_reward_min, ref_weight, exact_limit)
    return evaluation.result, evaluation.rows
