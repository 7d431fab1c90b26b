"""Metrics against inputs whose answers are known by hand or in closed form."""

import math

import pytest
import torch

from gf_odg.evaluation.metrics import (
    count_above,
    count_above_by_meaning,
    distinct_n,
    empirical_distribution,
    kl_divergence,
    mode_coverage,
    mode_entropy,
    mode_histogram,
    plug_in_kl_expected,
    score_summary,
    self_bleu,
    semantic_diversity,
    total_variation,
    unique_fraction,
)


def test_unique_fraction():
    assert unique_fraction(["a", "b", "a", "c"]) == 0.75
    assert unique_fraction([]) == 0.0


def test_distinct_n_counted_by_hand():
    texts = ["The cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct / 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 distinct / 4; none crosses texts
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 4) == 0.0
    assert distinct_n([], 1) == 0.0


def test_self_bleu_identical_is_one_and_disjoint_near_zero():
    same = ["the quick brown fox jumps over the lazy dog"] * 5
    assert self_bleu(same) == pytest.approx(1.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert self_bleu(disjoint) < 0.01
    assert math.isnan(self_bleu(["only one"]))


def test_self_bleu_subsample_is_seeded():
    """Half the texts repeat one sentence, half are unrelated: a subsample's self-BLEU depends on how
    many repeats it drew, so the seed must pick the subsample (and only the seed)."""
    texts = ["the same sentence again and again"] * 15 + [f"{w} {w}{i} unrelated words {i}" for i, w in
                                                          enumerate("abcdefghijklmno")]
    seeded = {seed: self_bleu(texts, max_texts=10, seed=seed) for seed in range(8)}
    assert self_bleu(texts, max_texts=10, seed=3) == seeded[3]  # the same seed, the same subsample
    assert len(set(seeded.values())) > 1  # other seeds, other subsamples
    assert self_bleu(texts, max_texts=30, seed=3) == self_bleu(texts, max_texts=30, seed=4)  # no subsample: all
    assert min(seeded.values()) < self_bleu(texts, max_texts=30) < max(seeded.values())


def test_semantic_diversity_with_fixed_vectors():
    def identical(texts):
        return torch.tensor([[1.0, 2.0, 3.0]]).repeat(len(texts), 1)

    def orthogonal(texts):
        return torch.eye(len(texts))

    assert semantic_diversity(["a", "b", "c"], identical) == pytest.approx(0.0, abs=1e-6)
    assert semantic_diversity(["a", "b", "c"], orthogonal) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(semantic_diversity(["a"], orthogonal))


def test_histogram_and_empirical_distribution_skip_invalid():
    modes = [1, 2, 2, None, 3, None]
    assert mode_histogram(modes) == {1: 1, 2: 2, 3: 1}
    assert empirical_distribution(modes) == {1: 0.25, 2: 0.5, 3: 0.25}
    assert empirical_distribution([None]) == {}


def test_kl_known_values():
    p = {"a": 0.3, "b": 0.7}
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence({"a": 0.5, "b": 0.5}, {"a": 1.0}) == math.inf
    q = {"a": 0.6, "b": 0.4}
    closed_form = 0.3 * math.log(0.3 / 0.6) + 0.7 * math.log(0.7 / 0.4)
    assert kl_divergence(p, q) == pytest.approx(closed_form)
    # q may have support p lacks: it costs nothing
    assert kl_divergence({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(math.log(2))
    assert math.isnan(kl_divergence({}, q))


def test_total_variation_bounds_and_symmetry():
    p, q = {"a": 0.3, "b": 0.7}, {"a": 0.6, "c": 0.4}
    assert total_variation(p, p) == 0.0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    assert total_variation(p, q) == pytest.approx(total_variation(q, p))
    assert total_variation(p, q) == pytest.approx(0.5 * (0.3 + 0.7 + 0.4))


def test_coverage_and_entropy_of_uniform_histogram():
    k = 8
    histogram = mode_histogram(list(range(k)) * 5)
    assert mode_coverage(histogram, range(k)) == 1.0
    assert mode_coverage(histogram, range(2 * k)) == 0.5
    assert mode_entropy(histogram) == pytest.approx(math.log(k))
    assert mode_entropy(mode_histogram(["x"] * 3)) == 0.0
    assert math.isnan(mode_entropy(mode_histogram([None])))


def test_plug_in_kl_expected_matches_reported_bias():
    assert plug_in_kl_expected(101, 2000) == pytest.approx(0.025)


def test_count_above_counts_distinct_texts_only():
    texts = ["x", "x", "y", "z", "w"]
    scores = [1.0, 1.0, 0.9, 0.2, -math.inf]
    assert count_above(texts, scores, 0.5) == 2
    with pytest.raises(ValueError):
        count_above(texts, scores[:2], 0.5)


def test_count_above_by_meaning_merges_near_paraphrases_only():
    # Hand-placed unit vectors: "a red apple." and "A red apple!" at cosine 0.96, "a green pear." at 0.6 and
    # 0.58 to them, "rain" at 0.28 or less to all; "rain" scores below the threshold of 2.
    vectors = {"a red apple.": [1.0, 0.0, 0.0], "A red apple!": [0.96, 0.28, 0.0],
               "a green pear.": [0.6, 0.0, 0.8], "rain": [0.0, 1.0, 0.0]}
    seen: list[list[str]] = []

    def embed(texts):
        seen.append(list(texts))
        return torch.tensor([vectors[t] for t in texts])

    texts = ["a red apple.", "A red apple!", "a red apple.", "a green pear.", "rain"]
    scores = [2.0, 3.0, 2.0, 2.5, 1.0]
    assert count_above(texts, scores, 2.0) == 3
    assert count_above_by_meaning(texts, scores, 2.0, embed, same_meaning=0.9) == 2  # the two apples count once
    assert seen[-1] == ["A red apple!", "a green pear.", "a red apple."]  # distinct, by descending score
    assert count_above_by_meaning(texts, scores, 2.0, embed, same_meaning=0.99) == 3  # nothing that close
    assert count_above_by_meaning(texts, scores, 2.0, embed, same_meaning=0.5) == 1  # the pear too (0.58 to the first counted)
    assert count_above_by_meaning(texts, scores, 0.0, embed, same_meaning=0.9) == 3  # with "rain", far from all
    assert count_above_by_meaning(texts, scores, 5.0, embed) == 0
    # Greedy in score order: with the pear first, the apples (0.58-0.6 to it, 0.96 to each other) count once.
    assert count_above_by_meaning(["a green pear.", "a red apple.", "A red apple!"], [9.0, 1.0, 1.0], 0.0, embed,
                                  same_meaning=0.9) == 2
    with pytest.raises(ValueError):
        count_above_by_meaning(texts, scores[:2], 0.5, embed)


def test_score_summary_ignores_violations():
    summary = score_summary([1.0, 2.0, 3.0, -math.inf])
    assert summary["mean"] == 2.0
    assert summary["median"] == 2.0
    assert (summary["min"], summary["max"]) == (1.0, 3.0)
    assert summary["std"] == pytest.approx(math.sqrt(2 / 3))
    assert summary["violation_fraction"] == 0.25
    all_violations = score_summary([-math.inf, -math.inf])
    assert math.isnan(all_violations["mean"]) and all_violations["violation_fraction"] == 1.0
