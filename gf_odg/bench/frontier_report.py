"""The frontier section's comparison, tables and figure: each method's path (its points in training
order, by temperature, by n) read at the mean scores of GRPO's training path, seed by seed, and the
spread of the figures over seeds."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from gf_odg.bench.quality_match import MEANING
from gf_odg.bench.quality_train import OURS
from gf_odg.bench.report import num, pyplot, save_figure, table

REFERENCE = "grpo"  # TRL GRPO with beta = 0: the path whose mean scores the others are read at
PATH_KEYS = ("score_mean", MEANING, "n_above_threshold", "semantic_diversity", "fluency", "valid_fraction",
             "unique_fraction")
MATCHED_KEYS = (MEANING, "semantic_diversity", "fluency")
FINAL_KEYS = ("score_mean", MEANING, "semantic_diversity", "fluency")


def path(points: list[dict], method: str, seed: int) -> list[dict]:
    """One method's points of one seed in path order: by step, temperature or n."""
    return sorted((p for p in points if p["method"] == method and p["seed"] == seed), key=lambda p: p["at"])


def at_score(line: list[dict], score: float, key: str) -> float | None:
    """`key` where the path crosses `score`, linear in the score between the two points that bracket
    it; the highest value where it crosses more than once (the frontier is the upper envelope);
    None where the path never reaches the score."""
    values = [p[key] for p in line[:1] if len(line) == 1 and p["score_mean"] == score]
    for a, b in zip(line, line[1:]):
        lo, hi = sorted((a["score_mean"], b["score_mean"]))
        if lo <= score <= hi and a[key] is not None and b[key] is not None:
            w = 0.0 if hi == lo else (score - a["score_mean"]) / (b["score_mean"] - a["score_mean"])
            values.append(a[key] + w * (b[key] - a[key]))
    return max(values) if values else None


def matched_levels(result: dict) -> list[dict]:
    """One level per point of GRPO's path after step 0 (the base model, where every trained path
    starts), per seed: each method's MATCHED_KEYS at GRPO's mean score there, and its by-meaning
    count over GRPO's (None where its path does not reach the score or GRPO's count is 0)."""
    levels = []
    for seed in result["seeds"]:
        lines = {m: path(result["points"], m, seed) for m in result["methods"]}
        for point in lines[REFERENCE][1:]:
            score = point["score_mean"]
            values = {m: {key: at_score(line, score, key) for key in MATCHED_KEYS} for m, line in lines.items()}
            grpo = values[REFERENCE][MEANING]
            ratio = {m: v[MEANING] / grpo if v[MEANING] is not None and grpo else None
                     for m, v in values.items() if m != REFERENCE}
            levels.append({"seed": seed, "grpo_step": point["at"], "score": score, "values": values, "ratio": ratio})
    return levels


def spread(values: list) -> dict | None:
    """min, median, max, mean and sd (0 for one value) of the values that are defined (not None, not
    NaN); None if none are."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summary(result: dict) -> list[dict]:
    """Per method, over seeds: its final point (trained methods), and the median over GRPO's levels of
    its by-meaning ratio to GRPO."""
    rows = []
    for m in result["methods"]:
        row = {"method": m, "points_per_seed": sorted({len(path(result["points"], m, s)) for s in result["seeds"]})}
        if any(r["method"] == m for r in result["runs"]):
            finals = [path(result["points"], m, s)[-1] for s in result["seeds"]]
            row["final"] = {key: spread([p[key] for p in finals]) for key in FINAL_KEYS}
        if m != REFERENCE:
            per_seed, reached, levels = [], 0, 0
            for s in result["seeds"]:
                ratios = [lv["ratio"][m] for lv in result["matched"] if lv["seed"] == s]
                defined = [r for r in ratios if r is not None]
                per_seed.append(statistics.median(defined) if defined else None)
                reached, levels = reached + len(defined), levels + len(ratios)
            row["ratio_to_grpo"], row["levels_matched"] = spread(per_seed), [reached, levels]
        rows.append(row)
    return rows


def _range(s: dict | None, fmt: str = ".3f") -> str:
    """'min / median / max' (one value where there is one)."""
    if s is None:
        return "-"
    if s["n"] == 1:
        return num(s["median"], fmt)
    return " / ".join(num(s[k], fmt) for k in ("min", "median", "max"))


def markdown(result: dict) -> list[str]:
    methods, ours = result["methods"], [m for m in result["methods"] if m in OURS]
    runs = result["runs"]
    batch = sorted({f"{r['K']} x {r['prompts_per_step']}" for r in runs})
    how = {"base": f"base: temperatures {', '.join(f'{t:g}' for t in result['temperatures'])}",
           "best_of_n": f"best_of_n: n = 1, {', '.join(map(str, result['best_of']))} (each sample the best of n draws)",
           "grpo_kl": f"grpo_kl: beta {result['grpo_kl_beta']:g}",
           "grpo_entropy": f"grpo_entropy: entropy_coef {result['grpo_entropy_coef']:g} (beta 0)"}
    lines = [f"Reward-diversity frontier on {result['task']}: the same prompts, reward and evaluation "
             f"(gf_odg.evaluation.core under the task's constraint mask, {result['eval_samples']} samples per "
             f"point, the same seed for every method of a seed); seeds {', '.join(map(str, result['seeds']))}. "
             f"High reward: score >= {result['threshold']:g}; distinct by meaning: near-paraphrases (MiniLM "
             "cosine >= 0.9) counted once; fluency: mean per-token log p_ref (nats). Trained methods: "
             f"{result['steps']} steps of K x prompts {', '.join(batch) or '-'}, a point every {result['every']} "
             "steps, step 0 the base model" + "".join(f"; {how[m]}" for m in methods if m in how) + ".", ""]
    lines += [f"Not run: {s}." for s in result["skipped"]] + ([""] if result["skipped"] else [])
    lines += ["Over seeds (min / median / max): each trained method's final point, and every method's "
              "distinct-by-meaning count over GRPO's at GRPO's mean scores (the median over GRPO's points "
              "that its path reaches):", ""]
    lines += table(["method", "points per seed", "final score", "final distinct by meaning",
                    "final semantic diversity", "final fluency", "by meaning / GRPO's, matched score",
                    "GRPO points matched"],
                   [[r["method"], ",".join(map(str, r["points_per_seed"])),
                     *(_range(r.get("final", {}).get(k), ".1f" if k == MEANING else ".3f") for k in FINAL_KEYS),
                     _range(r.get("ratio_to_grpo"), ".2f"),
                     "-" if "levels_matched" not in r else "{} of {}".format(*r["levels_matched"])]
                    for r in result["summary"]])
    lines += ["At each point of GRPO's training path, seed by seed: every method's distinct high-reward "
              "completions by meaning at GRPO's mean score there (linear between the two points of its own "
              "path that bracket it, the highest where it crosses more than once; - where it never reaches "
              "it), and ours over GRPO's:", ""]
    lines += table(["seed", "GRPO step", "score mean", *methods, *(f"{m} / GRPO" for m in ours)],
                   [[lv["seed"], lv["grpo_step"], f"{lv['score']:.3f}",
                     *(num(lv["values"][m][MEANING], ".1f") for m in methods),
                     *(num(lv["ratio"][m], ".2f") for m in ours)] for lv in result["matched"]])
    lines += ["Fluency (mean per-token log p_ref) at the same scores:", ""]
    lines += table(["seed", "GRPO step", "score mean", *methods],
                   [[lv["seed"], lv["grpo_step"], f"{lv['score']:.3f}",
                     *(num(lv["values"][m]["fluency"], ".3f") for m in methods)] for lv in result["matched"]])
    lines.append("Every point (score, distinct high-reward, by meaning, semantic diversity, fluency, validity) "
                 "is in benchmark.json under frontier.points; the completions under quality_samples/seed<S>/.")
    return lines + [""]


def plot(result: dict, out: Path, title: str) -> list[Path]:
    """benchmark_frontier.png: mean score against distinct high-reward completions by meaning, one
    line per method (colour) and seed (line style)."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    styles = ("-", "--", ":", "-.")
    colours = {m: f"C{i % 10}" for i, m in enumerate(result["methods"])}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, seed in enumerate(result["seeds"]):
        for m in result["methods"]:
            line = path(result["points"], m, seed)
            ax.plot([p["score_mean"] for p in line], [p[MEANING] if p[MEANING] is not None else math.nan
                                                      for p in line],
                    color=colours[m], ls=styles[i % len(styles)], marker=".", lw=1.2, alpha=0.8)
    handles = [Line2D([], [], color=c, label=m) for m, c in colours.items()]
    handles += [Line2D([], [], color="grey", ls=styles[i % len(styles)], label=f"seed {s}")
                for i, s in enumerate(result["seeds"])]
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.set_xlabel("score mean")
    ax.set_ylabel(f"distinct completions scoring >= {result['threshold']:g}, by meaning")
    ax.set_title(f"{result['task']}: {result['eval_samples']} samples per point", fontsize=9)
    return save_figure(fig, title, out / "benchmark_frontier.png")
