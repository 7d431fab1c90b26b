"""Metrics for a sampler's output: diversity of texts, match of a mode distribution, scores.

Pure functions on plain Python inputs (texts, scores, modes); nothing here loads a model.
Empty-input convention: a *fraction of what was seen* (unique_fraction, distinct_n) is 0.0 when
nothing was seen; a quantity that is *undefined* without data (self-BLEU or semantic diversity of
fewer than 2 texts, KL/TV/entropy of an empty distribution, statistics of no scores) is NaN, so
that it shows as missing in a plot rather than as a perfect or a terrible value.

Modes are any hashable label of a text (e.g. the integer a `rng` completion names); `None` marks an
invalid sample and is never counted as a mode.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from typing import Callable, Hashable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

NAN = float("nan")


# ---------------------------------------------------------------- diversity of texts


def unique_fraction(texts: Sequence[str]) -> float:
    """Fraction of distinct texts: |set(texts)| / |texts|; 0.0 for no texts."""
    if not texts:
        return 0.0
    return len(set(texts)) / len(texts)


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n: |distinct n-grams| / |n-grams|, pooled over all texts.

    Tokens are the lower-cased whitespace-split words; n-grams never cross a text boundary.
    0.0 when there are no n-grams (no texts, or every text shorter than n words).
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got n={n}.")
    ngrams = []
    for text in texts:
        words = text.lower().split()
        ngrams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not ngrams:
        return 0.0
    return len(set(ngrams)) / len(ngrams)


def self_bleu(texts: Sequence[str], max_texts: int = 500, seed: int = 0) -> float:
    """Self-BLEU on a 0..1 scale (higher = less diverse):

        self_BLEU = (1/N) Σ_i BLEU(t_i ; references = {t_j : j ≠ i})

    sentence BLEU with effective order (sacrebleu), over a random subsample of at most `max_texts`
    texts (drawn with `seed`; the cost is quadratic in N). Identical texts give 1.0.
    NaN for fewer than 2 texts.
    """
    from sacrebleu.metrics import BLEU

    texts = list(texts)
    if len(texts) < 2:
        return NAN
    if len(texts) > max_texts:
        texts = random.Random(seed).sample(texts, max_texts)
    bleu = BLEU(effective_order=True)
    scores = [
        bleu.sentence_score(text, texts[:i] + texts[i + 1 :]).score / 100.0
        for i, text in enumerate(texts)
    ]
    # sacrebleu returns 100.00000000000004 for an exact match: keep the scale's bound
    return min(1.0, statistics.fmean(scores))


def semantic_diversity(
    texts: Sequence[str], embed_fn: Callable[[list[str]], torch.Tensor]
) -> float:
    """1 − mean pairwise cosine similarity of the texts' embeddings, diagonal excluded:

        div = 1 − (1 / (N(N−1))) Σ_{i≠j} cos(e_i, e_j),     e = embed_fn(texts)  # [N, D]

    0 for identical embeddings, 1 for mutually orthogonal ones (up to 2 for opposite ones).
    The caller supplies the embedder. NaN for fewer than 2 texts.
    """
    texts = list(texts)
    n = len(texts)
    if n < 2:
        return NAN
    unit = F.normalize(embed_fn(texts).float(), dim=-1)  # [N, D]
    similarity = unit @ unit.T  # [N, N]
    off_diagonal_sum = similarity.sum() - similarity.diagonal().sum()
    return 1.0 - off_diagonal_sum.item() / (n * (n - 1))


# ---------------------------------------------------------------- distributions over modes


def mode_histogram(modes: Iterable[Hashable | None]) -> Counter:
    """Count of each valid mode; `None` (an invalid sample) is not counted."""
    return Counter(mode for mode in modes if mode is not None)


def empirical_distribution(modes: Iterable[Hashable | None]) -> dict:
    """p̂(m) = count(m) / Σ_m' count(m'), over valid (non-None) modes only; {} if none is valid."""
    histogram = mode_histogram(modes)
    total = sum(histogram.values())
    return {mode: count / total for mode, count in histogram.items()}


def kl_divergence(p: Mapping[Hashable, float], q: Mapping[Hashable, float]) -> float:
    """KL(p ‖ q) = Σ_{m : p(m) > 0} p(m) · log(p(m) / q(m)), in nats, over the union of supports.

    +inf if p puts mass on a mode where q has none. NaN if p or q is empty.
    """
    if not p or not q:
        return NAN
    kl = 0.0
    for mode, p_m in p.items():
        if p_m <= 0:
            continue
        q_m = q.get(mode, 0.0)
        if q_m <= 0:
            return math.inf
        kl += p_m * math.log(p_m / q_m)
    return kl


def total_variation(p: Mapping[Hashable, float], q: Mapping[Hashable, float]) -> float:
    """TV(p, q) = ½ Σ_m |p(m) − q(m)| over the union of supports, in [0, 1].

    NaN if p or q is empty.
    """
    if not p or not q:
        return NAN
    support = set(p) | set(q)
    return 0.5 * sum(abs(p.get(m, 0.0) - q.get(m, 0.0)) for m in support)


def mode_coverage(histogram: Mapping[Hashable, int], modes_all: Iterable[Hashable]) -> float:
    """Fraction of the listed modes seen at least once:

        coverage = |{m ∈ modes_all : hist(m) ≥ 1}| / |modes_all|.

    NaN if `modes_all` is empty.
    """
    modes_all = set(modes_all)
    if not modes_all:
        return NAN
    return sum(1 for mode in modes_all if histogram.get(mode, 0) >= 1) / len(modes_all)


def mode_entropy(histogram: Mapping[Hashable, int]) -> float:
    """H(p̂) = −Σ_m p̂(m) log p̂(m) in nats, p̂ the normalised histogram; log k for k equal counts.

    NaN for an empty histogram (no valid sample).
    """
    total = sum(histogram.values())
    if total <= 0:
        return NAN
    return -sum(c / total * math.log(c / total) for c in histogram.values() if c > 0)


def plug_in_kl_expected(k: int, n: int) -> float:
    """Expected plug-in KL of a *perfect* sampler: E[KL(p̂ ‖ p)] ≈ (k − 1) / (2n) nats.

    p̂ is the empirical distribution of n samples from p itself over k modes (2n·KL(p̂‖p) is
    asymptotically χ² with k − 1 degrees of freedom). This is the floor a sampled KL cannot beat:
    for k = 101 modes and n = 2000 samples it is 0.025 nats. Report it beside sampled KLs.
    """
    return (k - 1) / (2 * n)


# ---------------------------------------------------------------- scores


def count_above(texts: Sequence[str], scores: Sequence[float], threshold: float) -> int:
    """Number of DISTINCT texts with score ≥ threshold: |{t_i : s_i ≥ threshold}|.

    A text counts once, if any of its occurrences reaches the threshold.
    """
    if len(texts) != len(scores):
        raise ValueError(f"count_above got {len(texts)} texts but {len(scores)} scores.")
    return len({text for text, score in zip(texts, scores) if score >= threshold})


def count_above_by_meaning(texts: Sequence[str], scores: Sequence[float], threshold: float,
                           embed_fn: Callable[[list[str]], torch.Tensor], same_meaning: float = 0.9) -> int:
    """Distinct texts with score ≥ threshold, near-paraphrases counted once.

    The distinct high-scoring texts are taken in descending score (ties in text order); a text counts
    when the cosine of its embedding to that of every text counted before it is below `same_meaning`:

        counted = greedy packing of {t : s(t) ≥ threshold} with cos(e_i, e_j) < same_meaning between any two

    So "a red apple fell." and "A red apple fell!" count once, where `count_above` counts two. With
    same_meaning > 1 nothing merges and the count is `count_above`'s.
    """
    if len(texts) != len(scores):
        raise ValueError(f"count_above_by_meaning got {len(texts)} texts but {len(scores)} scores.")
    if not 0.0 < same_meaning:
        raise ValueError(f"count_above_by_meaning needs same_meaning > 0, got {same_meaning}.")
    best: dict[str, float] = {}
    for text, score in zip(texts, scores):
        if score >= threshold:
            best[text] = max(score, best.get(text, score))
    if not best:
        return 0
    order = sorted(best, key=lambda text: (-best[text], text))
    unit = F.normalize(embed_fn(order).float(), dim=-1)  # [N, D]
    close = (unit @ unit.T) >= same_meaning  # [N, N]
    covered = torch.zeros(len(order), dtype=torch.bool)
    counted = 0
    for i in range(len(order)):
        if not covered[i]:
            counted += 1
            covered |= close[i]
    return counted


def score_summary(scores: Iterable[float]) -> dict[str, float]:
    """mean, median, max, min, std (population) of the valid scores, and `violation_fraction`.

    A score of −inf marks a hard-constraint violation: it is left out of every statistic (so the
    summary stays finite and JSON-loggable) and counted instead in

        violation_fraction = |{s_i = −inf}| / N.

    Statistics are NaN when no score is valid; violation_fraction is NaN for no scores at all.
    """
    scores = list(scores)
    valid = [s for s in scores if s != -math.inf]
    violation_fraction = (len(scores) - len(valid)) / len(scores) if scores else NAN
    if not valid:
        return dict(mean=NAN, median=NAN, max=NAN, min=NAN, std=NAN,
                    violation_fraction=violation_fraction)
    return dict(
        mean=statistics.fmean(valid),
        median=statistics.median(valid),
        max=max(valid),
        min=min(valid),
        std=statistics.pstdev(valid),
        violation_fraction=violation_fraction,
    )
