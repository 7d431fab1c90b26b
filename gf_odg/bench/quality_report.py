"""The quality section's tables and figure."""

from __future__ import annotations

import math
from pathlib import Path

from gf_odg.bench.quality_match import MEANING
from gf_odg.bench.report import num, pyplot, save_figure


def _meaning_cells(row: dict, match: dict) -> str:
    """'ours / GRPO | ratio' of the by-meaning count, or '- | -' where a report has none."""
    if "ratio_by_meaning" not in match:
        return "- | -"
    return (f"{row['eval'][MEANING]} / {num(match['grpo_n_above_threshold_by_meaning'], '.1f')} | "
            f"{match['ratio_by_meaning']:.2f}x")


def quality_table(rows: list[dict]) -> list[str]:
    budget = ("the same training seconds (GRPO's; steps differ)" if rows and rows[0].get("budget") == "time"
              else "the same number of steps")
    lines = [f"Quality after {budget} on the same prompts and batch; evaluated by gf_odg.evaluation.core under the "
             "task's constraint mask (same samples count and seed for every method):", "",
             "| task | method | steps | K x prompts | score mean | valid | distinct high-reward | by meaning | "
             "unique fraction | semantic diversity | KL to target, sampled | KL, exact | train valid (last 10 steps) | "
             "s / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["eval"]
        lines.append(f"| {r['task']} | {r['method']} | {r['steps']} | {r['K']} x {r['prompts_per_step']} | "
                     f"{num(e.get('score_mean'))} | {num(e.get('valid_fraction'))} | "
                     f"{num(e.get('n_above_threshold'))} | "
                     f"{num(e.get(MEANING))} | {num(e.get('unique_fraction'))} | {num(e.get('semantic_diversity'))} | "
                     f"{num(e.get('kl_to_target'))} | {num(e.get('exact_kl'))} | "
                     f"{num(r.get('train_valid_fraction'))} | "
                     f"{num(r.get('step_s'), '.2f')} |")
    unmasked = [r for r in rows if r.get("eval_unmasked")]
    if unmasked:
        lines += ["", "The same policies sampled without the constraint mask (free tokens, same length limit):", "",
                  "| task | method | valid | distinct valid | KL to target, sampled |", "|---|---|---|---|---|"]
        for r in unmasked:
            u = r["eval_unmasked"]
            lines.append(f"| {r['task']} | {r['method']} | {num(u.get('valid_fraction'))} | {num(u.get('distinct'))} | "
                         f"{num(u.get('kl_to_target'))} |")
    return lines + _matched_lines(rows) + _above_lines(rows) + [""]


def _matched_lines(rows: list[dict]) -> list[str]:
    matched = [r for r in rows if r.get("matched")]
    if not matched:
        return []
    lines = ["", "At matched mean score: GRPO's distinct high-reward completions and semantic diversity where "
             "its training path (base model, every curve point, final) crosses our final mean score, one line per "
             "crossing (linear in the score between the two GRPO points that bracket it):", "",
             "| task | method | score mean | distinct high-reward, ours / GRPO | ratio | by meaning, ours / GRPO | "
             "ratio | semantic diversity, ours / GRPO | GRPO between steps |", "|---|---|---|---|---|---|---|---|---|"]
    for r, m in ((r, m) for r in matched for m in r.get("matched_all", [r["matched"]])):
        lines.append(f"| {r['task']} | {r['method']} | {m['score']:.3f} | {r['eval']['n_above_threshold']} / "
                     f"{m['grpo_n_above_threshold']:.1f} | {m['ratio']:.2f}x | {_meaning_cells(r, m)} | "
                     f"{num(r['eval'].get('semantic_diversity'))} / {m['grpo_semantic_diversity']:.3f} | "
                     f"{m['grpo_steps'][0]}-{m['grpo_steps'][1]} |")
    return lines


def _above_lines(rows: list[dict]) -> list[str]:
    above = [r for r in rows if r.get("above_grpo_path")]
    if not above:
        return []
    lines = ["", "Our mean score above every point of GRPO's training path: against GRPO's best-scoring point "
             "(the nearest in score, ours higher):", "",
             "| task | method | score mean, ours / GRPO | distinct high-reward, ours / GRPO | ratio | "
             "by meaning, ours / GRPO | ratio | semantic diversity, ours / GRPO | GRPO step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in above:
        m = r["above_grpo_path"]
        lines.append(f"| {r['task']} | {r['method']} | {m['score']:.3f} / {m['grpo_score']:.3f} | "
                     f"{r['eval']['n_above_threshold']} / {m['grpo_n_above_threshold']} | {m['ratio']:.2f}x | "
                     f"{_meaning_cells(r, m)} | {num(r['eval'].get('semantic_diversity'))} / "
                     f"{num(m['grpo_semantic_diversity'])} | {m['grpo_step']} |")
    return lines


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    """benchmark_quality.png: per task, each method's final (score, distinct high-reward) and its path."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            e = r["eval"]
            y = e.get("n_above_threshold") or 0
            if r.get("curve"):  # the training path, final point last
                ax.plot([p["score_mean"] for p in r["curve"]], [p["n_above_threshold"] or 0 for p in r["curve"]],
                        marker=".", lw=1, alpha=0.6)
            ax.scatter([e.get("score_mean", math.nan)], [y], s=40)
            ax.annotate(r["method"], (e.get("score_mean", math.nan), y), fontsize=8, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("score mean")
        ax.set_ylabel("distinct high-reward completions")
        ax.set_title(f"{task} ({rows[0]['eval_samples'] if len(tasks) == 1 else 'same'} samples each)", fontsize=9)
    return save_figure(fig, title, out / "benchmark_quality.png")
