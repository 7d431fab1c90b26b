"""Measuring one set of samples: scores, validity, diversity, and modes against their target.

For rewards with modes (`rng`: the integers) each prompt's sampled mode distribution is compared
with the target
    p*(m | x) ∝ exp(score(x, m) / beta)        over the reward's listed modes (`modes()`)
(KL(p_hat || p*) over valid samples, TV including the invalid mass), averaged over prompts. The
plug-in KL of a perfect sampler is biased by about (k - 1) / (2n) nats (`kl_floor`). The exact
figures, for any reward on an enumerable space, are gf_odg.evaluation.exact's.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Iterable, Optional

import torch

from gf_odg.evaluation import metrics
from gf_odg.evaluation.sampling import Samples, mode_of
from gf_odg.rewards.base import call_reward

# What `measure` and the exact evaluation can report, by name (`eval.metrics=[...]`); each yields the keys listed.
METRICS = {
    "score": "score_mean, score_median, score_max, score_min, score_std; terms/<term>/{mean,median,max}",
    "validity": "valid_fraction, valid_percent (finite score), constraints_satisfied_percent",
    "unique_fraction": "unique_fraction",
    "distinct_n": "distinct_1, distinct_2, distinct_3",
    "self_bleu": "self_bleu",
    "semantic_diversity": "semantic_diversity (1 - mean pairwise cosine of MiniLM embeddings)",
    "above_threshold": "n_above_threshold: distinct completions scoring >= eval.threshold",
    "above_threshold_by_meaning": "n_above_threshold_by_meaning: the same, near-paraphrases (MiniLM cosine >= "
                                  "eval.same_meaning) counted once",
    "modes": "distinct, n_modes, mode_coverage, mode_entropy, target_entropy, kl_to_target, tv_to_target, kl_floor",
    "exact": "exact_kl, exact_reverse_kl, exact_tv, exact_valid_mass, exact_min_ratio, exact_starved, "
             "exact_support, exact_per_prompt",
}
# MiniLM embeddings, quadratic BLEU: off while training
SLOW_METRICS = frozenset({"self_bleu", "semantic_diversity", "above_threshold_by_meaning"})
NEEDS_THRESHOLD = frozenset({"above_threshold", "above_threshold_by_meaning"})
SELF_BLEU_MAX_TEXTS = 200  # per prompt: 200 texts take about 1 s on a CPU core, 500 about 5 s


def mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values (inf kept); NaN if there are none."""
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else math.nan


def mode_targets(task, beta: float) -> Optional[dict[int, dict[str, float]]]:
    """p*(m | x) ∝ exp(score(x, m) / beta) over the reward's listed modes, per prompt index;
    None when the reward lists no modes (`modes()` and `mode_of()`)."""
    reward = task.reward
    if not (hasattr(reward, "modes") and hasattr(reward, "mode_of")):
        return None
    modes = [str(m) for m in reward.modes()]
    if not modes:
        return None
    targets = {}
    for p in range(len(task.records)):
        scores = call_reward(reward, [task.prompts[p]] * len(modes), modes, **task.reward_kwargs([p] * len(modes)))
        if torch.isfinite(scores).any():
            # float64: a peaked target (Binomial tails near 1e-50) must not underflow to a zero mass
            weights = torch.softmax(scores.double() / beta, dim=0)
            targets[p] = {m: float(w) for m, w in zip(modes, weights) if w > 0}  # this prompt's modes
    return targets or None


def _tv_with_invalid(p: dict, target: dict, invalid_mass: float) -> float:
    """½ (Σ_m |p(m) − p*(m)| + invalid mass): p holds the valid modes' absolute frequencies."""
    keys = set(p) | set(target)
    return 0.5 * (sum(abs(p.get(k, 0.0) - target.get(k, 0.0)) for k in keys) + invalid_mass)


def _entropy(p: dict) -> float:
    return -sum(v * math.log(v) for v in p.values() if v > 0)


def _mode_metrics(task, samples: Samples, targets: dict[int, dict[str, float]]) -> dict:
    """Per prompt: the sampled mode distribution against that prompt's target; averaged over prompts."""
    per_prompt = []
    for prompt, positions in samples.by_prompt().items():
        target = targets.get(prompt)
        if target is None:
            continue
        modes = [mode_of(task, samples.texts[i], float(samples.scores[i])) for i in positions]
        hist = metrics.mode_histogram(modes)
        empirical = metrics.empirical_distribution(modes)
        support = [m for m, w in target.items() if w > 0]
        n_valid = sum(hist.values())
        per_prompt.append({
            "distinct": len(hist),
            "n_modes": len(target),
            "mode_coverage": metrics.mode_coverage(hist, support),
            "mode_entropy": metrics.mode_entropy(hist),
            "target_entropy": _entropy(target),
            "kl_to_target": metrics.kl_divergence(empirical, target) if empirical else math.inf,
            "tv_to_target": _tv_with_invalid({m: c / len(modes) for m, c in hist.items()}, target,
                                             1.0 - n_valid / len(modes)),
            "kl_floor": metrics.plug_in_kl_expected(len(support), n_valid) if n_valid else math.nan,
        })
    if not per_prompt:
        return {}
    result = {key: mean(row[key] for row in per_prompt) for key in per_prompt[0]}
    for key in ("distinct", "n_modes"):  # counts stay integers with a single prompt, as ever
        if len(per_prompt) == 1:
            result[key] = int(result[key])
    return result


def embedded_once(embed_fn: Callable, texts: list[str]) -> Callable:
    """embed_fn over every distinct text in one call, then rows looked up: the diversity metrics embed
    each prompt's texts, each metric again, and every small call costs the embedder's overhead."""
    unique = list(dict.fromkeys(texts))
    vectors = embed_fn(unique) if unique else None
    row = {text: i for i, text in enumerate(unique)}
    return lambda batch: vectors[[row[text] for text in batch]]


def measure(task, samples: Samples, metric_names: Iterable[str], targets: Optional[dict] = None,
            threshold: Optional[float] = None, embed_fn: Optional[Callable] = None,
            self_bleu_max_texts: int = SELF_BLEU_MAX_TEXTS, same_meaning: float = 0.9) -> dict:
    """The metrics named in `metric_names` (keys of METRICS, `exact` excepted) of one set of samples.

    Diversity figures (unique fraction, distinct-n, self-BLEU, semantic diversity) are computed
    within each prompt's completions and averaged over prompts: texts for different prompts differ
    for reasons that say nothing about the sampler.
    """
    names = set(metric_names)
    texts, scores = samples.texts, samples.scores
    groups = list(samples.by_prompt().values())
    per_prompt = [[texts[i] for i in positions] for positions in groups]
    result: dict = {"n_samples": len(texts)}
    if "score" in names:
        summary = metrics.score_summary(scores.tolist())
        result.update({f"score_{key}": summary[key] for key in ("mean", "median", "max", "min", "std")})
        for term, values in samples.terms.items():
            term_summary = metrics.score_summary(values.tolist())
            result.update({f"terms/{term}/{key}": term_summary[key] for key in ("mean", "median", "max")})
    if "validity" in names:
        valid = float(torch.isfinite(scores).float().mean()) if len(texts) else math.nan
        satisfied = [not task.constraints.violations(tokens) for tokens in samples.tokens]
        result.update({
            "valid_fraction": valid,
            "valid_percent": 100.0 * valid,
            "constraints_satisfied_percent": 100.0 * statistics.fmean(satisfied) if satisfied else math.nan,
        })
    if "unique_fraction" in names:
        result["unique_fraction"] = mean(metrics.unique_fraction(group) for group in per_prompt)
    if "distinct_n" in names:
        for n in (1, 2, 3):
            result[f"distinct_{n}"] = mean(metrics.distinct_n(group, n) for group in per_prompt)
    if "self_bleu" in names:
        result["self_bleu"] = mean(metrics.self_bleu(group, max_texts=self_bleu_max_texts) for group in per_prompt)
    if names & {"semantic_diversity", "above_threshold_by_meaning"}:
        if embed_fn is None:
            from gf_odg.rewards.embedding import embed as embed_fn
        embed_fn = embedded_once(embed_fn, texts)
    if "semantic_diversity" in names:
        result["semantic_diversity"] = mean(metrics.semantic_diversity(group, embed_fn) for group in per_prompt)
    if "above_threshold" in names and threshold is not None:
        result["n_above_threshold"] = sum(
            metrics.count_above([texts[i] for i in positions], [float(scores[i]) for i in positions], threshold)
            for positions in groups)
    if "above_threshold_by_meaning" in names and threshold is not None:
        result["n_above_threshold_by_meaning"] = sum(
            metrics.count_above_by_meaning([texts[i] for i in positions], [float(scores[i]) for i in positions],
                                           threshold, embed_fn, same_meaning)
            for positions in groups)
    if "modes" in names and targets:
        result.update(_mode_metrics(task, samples, targets))
    return result
