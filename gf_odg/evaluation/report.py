"""What an evaluation leaves for a person to read: every sample as JSON lines, PNG plots, and a few
completions for the console.

    save_evaluation(run_dir, tag, ...)   samples_<tag>.jsonl and plots/<name>_<tag>.png (training's
                                         before/after evaluations)
    write_samples / make_plots           the same parts, for scripts/evaluate.py's several decodings
    format_samples(rows, k)              the most frequent and a random few completions, with scores
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Sequence

from gf_odg.evaluation.exact import STARVED_RATIO, ExactDistribution
from gf_odg.evaluation.measure import mode_targets

# Reward-vs-diversity plot: the first of these that some decoding reports as a positive number.
DIVERSITY_AXES = ("semantic_diversity", "distinct_2", "mode_entropy", "unique_fraction")
EXACT_PLOTTED_PROMPTS = 4  # one exact-distribution plot per prompt, for the first few prompts


def write_samples(path: Path, rows: Sequence[dict]) -> Path:
    """One JSON object per line, whole or not at all (written beside, then moved over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _scores(rows: Sequence[dict]) -> list[float]:
    return [-math.inf if row["score"] is None else float(row["score"]) for row in rows]


def make_plots(task, results: Mapping[str, tuple[dict, Sequence[dict]]], folder: Path, beta: float = 1.0,
               exact: Sequence[ExactDistribution] = (), suffix: str = "") -> list[Path]:
    """scores, modes (where the reward lists modes), reward_vs_diversity (two or more decodings) and
    exact_distribution (each of the first prompts, on an enumerable task) as <name><suffix>.png.
    `results`: decoding name -> (metrics, sample rows), the policy first."""
    from gf_odg.evaluation import plots

    folder = Path(folder)
    made = [plots.score_histogram({name: _scores(rows) for name, (_, rows) in results.items()},
                                  folder / f"scores{suffix}.png", title=f"Scores on {task.name}")]
    targets = mode_targets(task, beta)
    if targets:
        modes = list(dict.fromkeys(m for target in targets.values() for m in target))  # every prompt's modes
        pooled = {m: sum(t.get(m, 0.0) for t in targets.values()) / len(targets) for m in modes}  # [modes]
        counts = {name: Counter(row["mode"] for row in rows if row["mode"] is not None)
                  for name, (_, rows) in results.items()}
        made.append(plots.mode_histogram(counts, pooled, folder / f"modes{suffix}.png",
                                         title=f"Modes on {task.name} (valid samples) against the target"))
    metrics_by_name = {name: result for name, (result, _) in results.items()}
    for axis in DIVERSITY_AXES if len(results) > 1 else ():
        values = [result.get(axis) for result in metrics_by_name.values()]
        if any(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
            made.append(plots.reward_vs_diversity(metrics_by_name, folder / f"reward_vs_diversity{suffix}.png", axis))
            break
    for distribution in list(exact)[:EXACT_PLOTTED_PROMPTS]:
        name = "exact_distribution" if len(exact) == 1 else f"exact_distribution_prompt{distribution.prompt_index}"
        made.append(_exact_plot(task, distribution, folder / f"{name}{suffix}.png"))
    return made


def _exact_plot(task, distribution: ExactDistribution, path: Path) -> Path:
    from gf_odg.evaluation import plots

    support = distribution.valid.nonzero().flatten().tolist()
    policy, target = distribution.log_policy.exp(), distribution.log_target.exp()
    figures = distribution.figures()
    prompt = "" if len(task.records) == 1 else f", prompt {distribution.prompt_index}"
    return plots.exact_distribution(
        [distribution.texts[i] for i in support], policy[support].tolist(), target[support].tolist(), path,
        invalid_mass=1.0 - figures["exact_valid_mass"], starved_ratio=STARVED_RATIO,
        title=f"Exact distribution on {task.name}{prompt}: KL {figures['exact_kl']:.3g}, reverse KL "
              f"{figures['exact_reverse_kl']:.3g}, TV {figures['exact_tv']:.3g}")


def save_evaluation(run_dir: Path, tag: str, result: dict, rows: Sequence[dict], task,
                    exact: Sequence[ExactDistribution] = (), beta: float = 1.0, plots: bool = True) -> list[Path]:
    """Every sample to run_dir/samples_<tag>.jsonl, every enumerated completion's exact policy and
    target probability to run_dir/exact_<tag>.jsonl (enumerable tasks), and (with `plots`) the PNG plots scripts/evaluate.py
    makes to run_dir/plots/<name>_<tag>.png, with the exact distribution against its target where
    the task is enumerable -> the files written."""
    run_dir = Path(run_dir)
    written = [write_samples(run_dir / f"samples_{tag}.jsonl", rows)]
    if exact:
        written.append(write_samples(run_dir / f"exact_{tag}.jsonl", exact_rows(exact)))
    if plots:
        written += make_plots(task, {tag: (result, rows)}, run_dir / "plots", beta, exact, suffix=f"_{tag}")
    return written


def exact_rows(distributions: Sequence[ExactDistribution]) -> list[dict]:
    """One row per prompt and enumerated completion: its exact policy and target probabilities, and
    whether it is valid (a finite score) and starved; what exact_<tag>.jsonl holds."""
    rows = []
    for d in distributions:
        policy, target = d.log_policy.exp().tolist(), d.log_target.exp().tolist()
        for text, p, t, valid in zip(d.texts, policy, target, d.valid.tolist()):
            rows.append({"prompt": d.prompt_index, "completion": text, "policy": p, "target": t, "valid": valid,
                         "starved": bool(valid and t > 0 and p < STARVED_RATIO * t)})
    return rows


def _show(text: str, width: int = 60) -> str:
    shown = json.dumps(text, ensure_ascii=False)  # quotes, and newlines as \n: one line per completion
    return shown if len(shown) <= width else shown[: width - 4] + '..."'


def _score(value: Optional[float]) -> str:
    return "-inf (invalid)" if value is None else f"{value:.4g}"


def format_samples(rows: Sequence[dict], k: int = 5, seed: int = 0, title: str = "samples") -> str:
    """A short printable block: the `k` most frequent completions with their counts and a random `k`
    (drawn with `seed`), each with its score; with several prompts, each line names its prompt."""
    if not rows:
        return f"{title}: none"
    several = len({row["prompt"] for row in rows}) > 1
    key = (lambda row: (row["prompt"], row["completion"])) if several else (lambda row: row["completion"])
    counts = Counter(key(row) for row in rows)
    first = {}
    for row in rows:
        first.setdefault(key(row), row)
    invalid = sum(row["score"] is None for row in rows)
    lines = [f"{title} ({len(rows)} drawn, {len(counts)} distinct, {invalid} invalid):", "  most frequent:"]

    def line(row, count: str) -> str:
        where = f"[{_show(row['prompt'], 24)}] " if several else ""
        return f"  {count:>6}  {where}{_show(row['completion']):<40} score {_score(row['score'])}"

    for item, count in counts.most_common(k):
        lines.append(line(first[item], f"{count}x"))
    lines.append("  random:")
    for row in random.Random(seed).sample(list(rows), min(k, len(rows))):
        lines.append(line(row, ""))
    return "\n".join(lines)
