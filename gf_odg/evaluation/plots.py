"""Evaluation plots as PNG files: score histograms, a mode histogram against the target, reward
against diversity across decodings (or policies), and an exact distribution against its target.

Pure functions of plain data (lists, dicts), one figure each, drawn with matplotlib's object API
(`Figure`, Agg canvas): no pyplot state, no display needed, safe in a headless run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    """Whole or not at all: drawn to a temporary file beside `path`, then moved over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    tmp.replace(path)
    return path


def score_histogram(scores: Mapping[str, Sequence[float]], path: Path, title: str = "Scores") -> Path:
    """One histogram per decoding over the valid (finite) scores, on shared bins; the legend counts
    each decoding's hard violations (score -inf), which no bin can show."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    finite = {name: [s for s in values if s is not None and math.isfinite(s)] for name, values in scores.items()}
    pooled = [s for values in finite.values() for s in values]
    if pooled:
        low, high = min(pooled), max(pooled)
        if high - low < 1e-9:  # one value (rng: every valid integer scores the same)
            low, high = low - 0.5, high + 0.5
        bins = [low + (high - low) * i / 30 for i in range(31)]
        for name, values in finite.items():
            invalid = len(scores[name]) - len(values)
            ax.hist(values, bins=bins, alpha=0.5, label=f"{name} ({invalid} invalid of {len(scores[name])})")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no valid sample", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("score")
    ax.set_ylabel("completions")
    ax.set_title(title)
    return _save(fig, path)


def mode_histogram(counts: Mapping[str, Mapping[str, int]], target: Mapping[str, float], path: Path,
                   title: str = "Modes against the target") -> Path:
    """Empirical mode frequencies (over valid samples) per decoding, against the target p*(m):
    the first decoding as bars, the others as lines, the target as a black step line. Modes are
    shown in the target's order."""
    modes = list(target)
    fig = Figure(figsize=(max(7, min(20, 0.12 * len(modes))), 4))
    ax = fig.subplots()
    xs = list(range(len(modes)))
    for number, (name, hist) in enumerate(counts.items()):
        total = sum(hist.get(m, 0) for m in modes) or 1
        freq = [hist.get(m, 0) / total for m in modes]
        if number == 0:
            ax.bar(xs, freq, width=1.0, alpha=0.5, label=name)
        else:
            ax.plot(xs, freq, linewidth=0.8, alpha=0.8, label=name)
    ax.step(xs, [target[m] for m in modes], where="mid", color="black", linewidth=1.2, label="target")
    step = max(1, len(modes) // 25)
    ax.set_xticks(xs[::step])
    ax.set_xticklabels(modes[::step], rotation=90, fontsize=7)
    ax.set_xlabel("mode")
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reward_vs_diversity(results: Mapping[str, Mapping[str, float]], path: Path, x_key: str,
                        y_keys: Sequence[str] = ("score_mean", "valid_fraction"),
                        title: Optional[str] = None) -> Path:
    """One labelled point per decoding or policy, diversity `x_key` against each of `y_keys` (one
    panel each; results: name -> metrics): the trade-off a GFlowNet should move up and to the right.
    The mean score counts valid completions only, hence validity beside it. Points with a missing
    or non-finite coordinate are left out."""
    fig = Figure(figsize=(5.5 * len(y_keys), 4.5))
    axes = fig.subplots(1, len(y_keys), squeeze=False)[0]
    for ax, y_key in zip(axes, y_keys):
        for name, result in results.items():
            x, y = result.get(x_key), result.get(y_key)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)):
                continue
            ax.scatter([x], [y], s=40)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"Reward against diversity ({x_key})")
    return _save(fig, path)


EXACT_MAX_SHOWN = 300  # completions on one axis; beyond, the ones the target weighs most


def exact_distribution(labels: Sequence[str], policy: Sequence[float], target: Sequence[float], path: Path,
                       invalid_mass: float = 0.0, starved_ratio: float = 0.5,
                       title: str = "Exact distribution against the target") -> Path:
    """The policy's exact probability of each completion of the support (bars) against the target
    p*(y) (black step line), in the given order; a completion under `starved_ratio` of its target
    mass is drawn red. A logarithmic axis where the target spans more than three orders of magnitude.
    More than EXACT_MAX_SHOWN completions: the ones with the largest target mass, in the given order."""
    shown = list(range(len(labels)))
    if len(shown) > EXACT_MAX_SHOWN:
        shown = sorted(sorted(shown, key=lambda i: -target[i])[:EXACT_MAX_SHOWN])
        title += f" ({EXACT_MAX_SHOWN} of {len(labels)} completions)"
    fig = Figure(figsize=(max(7, min(20, 0.12 * len(shown))), 4))
    ax = fig.subplots()
    xs = list(range(len(shown)))
    p, t = [policy[i] for i in shown], [target[i] for i in shown]
    starved = [q < starved_ratio * w for q, w in zip(p, t)]
    ax.bar(xs, p, width=1.0, alpha=0.6, color=["tab:red" if s else "tab:blue" for s in starved])
    ax.step(xs, t, where="mid", color="black", linewidth=1.2)
    handles = [Patch(color="tab:blue", alpha=0.6, label=f"policy (invalid mass {invalid_mass:.3g})"),
               Patch(color="tab:red", alpha=0.6, label=f"starved: < {starved_ratio:g} of its target ({sum(starved)})"),
               Line2D([], [], color="black", linewidth=1.2, label="target")]
    positive = [w for w in t if w > 0]
    if positive and max(positive) / min(positive) > 1e3:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(positive) / 10)
    step = max(1, len(shown) // 25)
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([labels[i] for i in shown][::step], rotation=90, fontsize=7)
    ax.set_xlabel("completion")
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=8)
    return _save(fig, path)
