"""The quality section's matched-score comparison: each of our methods against GRPO's training path
at the same mean score."""

from __future__ import annotations

import math

from gf_odg.bench.quality_eval import CURVE_KEYS

MEANING = "n_above_threshold_by_meaning"


def by_meaning(ours, theirs) -> dict:
    """GRPO's by-meaning count and our ratio to it; nothing where either side lacks the count (a report
    from before the metric existed)."""
    if ours is None or theirs is None:
        return {}
    return {"grpo_n_above_threshold_by_meaning": theirs, "ratio_by_meaning": ours / theirs if theirs else math.inf}


def matched_score(rows: list[dict]) -> None:
    """For each of our trained methods, GRPO's distinct high-reward count at the same mean score,
    read off GRPO's training path (the base model as step 0, its curve points, its final policy) by
    linear interpolation in the score between two consecutive points that bracket ours. Every
    crossing is kept in row["matched_all"] (a path that rises and then falls, as GRPO's does once it
    collapses, crosses a score twice); row["matched"] is the first. Where our score lies above GRPO's
    whole path, row["above_grpo_path"] holds GRPO's best-scoring point (the nearest in score; its
    distinct high-reward count there), with our score higher: the comparison the matched one would
    have been, had GRPO got that far. Where ours lies below the whole path, nothing."""
    for task in dict.fromkeys(r["task"] for r in rows):
        grpo = next((r for r in rows if r["task"] == task and r["method"] == "grpo" and r.get("curve")), None)
        if grpo is None:
            continue
        base = next((r for r in rows if r["task"] == task and r["method"] == "base"), None)
        path = ([{"step": 0, **{k: base["eval"].get(k) for k in CURVE_KEYS}}] if base else []) + grpo["curve"]
        scores = [p["score_mean"] for p in path]
        if max(scores) - min(scores) < 1e-6:  # no score signal to match on (rng: every valid integer scores alike)
            continue
        for r in rows:
            if r["task"] == task and r["method"] not in ("grpo", "base"):
                _match_row(r, path, scores)


def _match_row(r: dict, path: list[dict], scores: list[float]) -> None:
    score, ours = r["eval"].get("score_mean"), r["eval"].get("n_above_threshold")
    ours_meaning = r["eval"].get(MEANING)
    crossings = []
    for a, b in zip(path, path[1:]):
        lo, hi = sorted((a["score_mean"], b["score_mean"]))
        if lo <= score <= hi:
            w = 0.0 if hi == lo else (score - a["score_mean"]) / (b["score_mean"] - a["score_mean"])
            theirs = a["n_above_threshold"] + w * (b["n_above_threshold"] - a["n_above_threshold"])
            sem = a["semantic_diversity"] + w * (b["semantic_diversity"] - a["semantic_diversity"])
            meaning = (None if a.get(MEANING) is None or b.get(MEANING) is None
                       else a[MEANING] + w * (b[MEANING] - a[MEANING]))
            crossings.append({"score": score, "grpo_steps": [a["step"], b["step"]],
                              "grpo_n_above_threshold": theirs, "grpo_semantic_diversity": sem,
                              "ratio": ours / theirs if theirs else math.inf, **by_meaning(ours_meaning, meaning)})
    if crossings:
        r["matched"], r["matched_all"] = crossings[0], crossings
    elif score > max(scores):
        best = max(path, key=lambda p: p["score_mean"])
        theirs = best["n_above_threshold"]
        r["above_grpo_path"] = {"score": score, "grpo_score": best["score_mean"], "grpo_step": best["step"],
                                "grpo_n_above_threshold": theirs, "grpo_semantic_diversity": best["semantic_diversity"],
                                "ratio": ours / theirs if theirs else math.inf,
                                **by_meaning(ours_meaning, best.get(MEANING))}
