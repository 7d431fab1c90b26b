"""How many distinct high-reward completions did a run find? Reads what train.py wrote; loads no model.

    uv run python -m gf_odg.bench.sparse_report outputs/sparse/<run> [<run> ...] [--threshold T] [--json out.json]
    uv run python scripts/sparse_report.py ...        (the same: a shim)

For each run dir (Hydra's run dir of `train.py`):

  during training  the batches logged as W&B tables (`wandb/offline-run-*/files/media/table/samples_*`,
                   one per `trainer.sample_table_every` steps; `experiment=sparse_rng` logs every step):
                   the fresh samples (replayed ones left out: they were found before), how many reach
                   the threshold, and the cumulative number of DISTINCT such completions (compared
                   after stripping surrounding whitespace, so "42" and "42\\n" are one integer on rng);
  at the end       eval.json's before/after evaluation (valid fraction, distinct modes, mean score);
  time             the training steps' time (sum of `time/step` in metrics.jsonl) and the run's wall
                   time from the config being written to eval.json being written (loading, both
                   evaluations and training; not the interpreter's start-up).

"High reward" is a finite score (no hard violation) unless --threshold is given (score >= T).
If a run logged only every n-th batch, the counts cover those batches only; the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Iterable, Optional

import yaml


def load_training_samples(run_dir: Path) -> list[dict]:
    """Every row of the run's per-step sample tables: {step, completion, score (None = violation), replayed}."""
    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/files/media/table/samples_*.table.json")):
        table = json.loads(path.read_text(encoding="utf-8"))
        columns = table["columns"]
        for values in table["data"]:
            rows.append(dict(zip(columns, values)))
    return sorted(rows, key=lambda r: r["step"])


def is_high(score, threshold: Optional[float]) -> bool:
    if score is None:
        return False
    score = float(score)
    if not math.isfinite(score):
        return False
    return threshold is None or score >= threshold


def discovery(rows: Iterable[dict], threshold: Optional[float], key: str = "strip",
              milestones: Iterable[int] = (10, 25, 50)) -> dict:
    """Counts over the fresh (not replayed) samples, in step order."""
    normalise = (lambda t: t.strip()) if key == "strip" else (lambda t: t)
    found: set[str] = set()
    steps = set()
    n_fresh = n_high = 0
    first_step = {int(m): None for m in milestones}
    curve = []  # (step, cumulative distinct) at each logged step
    by_step: dict[int, list[dict]] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), []).append(row)
    for step in sorted(by_step):
        steps.add(step)
        for row in by_step[step]:
            if row.get("replayed"):
                continue
            n_fresh += 1
            if is_high(row["score"], threshold):
                n_high += 1
                found.add(normalise(str(row["completion"])))
        for m in first_step:
            if first_step[m] is None and len(found) >= m:
                first_step[m] = step
        curve.append((step, len(found)))
    return {
        "logged_steps": len(steps),
        "fresh_samples": n_fresh,
        "high_samples": n_high,
        "high_fraction": n_high / n_fresh if n_fresh else math.nan,
        "distinct_high": len(found),
        "first_step_reaching": first_step,
        "curve": curve,
        "found": sorted(found),
    }


def run_summary(run_dir: Path, threshold: Optional[float] = None, key: str = "strip",
                milestones: Iterable[int] = (10, 25, 50)) -> dict:
    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    trainer = cfg.get("trainer", {})
    out = {
        "run_dir": str(run_dir),
        "exploration": cfg.get("exploration", {}).get("name"),
        "replay": bool(cfg.get("exploration", {}).get("replay", {}).get("enabled")),
        "p_temper": cfg.get("exploration", {}).get("p_temper"),
        "epsilon": cfg.get("exploration", {}).get("epsilon"),
        "seed": cfg.get("seed"),
        "max_steps": trainer.get("max_steps"),
        "samples_per_prompt": trainer.get("samples_per_prompt"),
        "sample_table_every": trainer.get("sample_table_every"),
    }
    rows = load_training_samples(run_dir)
    out["training"] = discovery(rows, threshold, key, milestones)
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        steps = [r for r in records if "time/step" in r]
        out["train_time_s"] = sum(float(r["time/step"]) for r in steps)
        tail = steps[-10:]
        if tail:
            out["last10_valid_fraction"] = statistics.fmean(float(r["reward/valid_fraction"]) for r in tail)
            if "log_z" in tail[-1]:
                out["final_log_z"] = float(tail[-1]["log_z"])
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():
        result = json.loads(eval_file.read_text())
        for tag in ("before", "after"):
            block = result.get(tag) or {}
            out[tag] = {k: block.get(k) for k in ("valid_fraction", "distinct", "score_mean", "unique_fraction",
                                                  "kl_to_target", "tv_to_target", "n_samples") if k in block}
        if config_file.is_file():
            out["run_wall_s"] = eval_file.stat().st_mtime - config_file.stat().st_mtime
    complete = out["max_steps"] is not None and out["training"]["logged_steps"] >= out["max_steps"]
    out["training_counts_complete"] = complete
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _minutes(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def markdown(summaries: list[dict]) -> str:
    milestones = " / ".join(str(m) for m in (summaries[0]["training"]["first_step_reaching"] if summaries else ()))
    head = ("| run | exploration | seed | steps | fresh samples valid (train) | distinct found in training | "
            f"step reaching {milestones} | valid after (eval) | distinct after (eval) | KL to target after | "
            "wall time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        t = s["training"]
        reach = " / ".join(_fmt(v) for v in t["first_step_reaching"].values())
        name = s["exploration"] or "?"
        if s.get("replay") and name != "replay":
            name += " + replay"
        after = s.get("after", {})
        lines.append(f"| {Path(s['run_dir']).name} | {name} | {_fmt(s['seed'])} | {_fmt(s['max_steps'])} | "
                     f"{_fmt(t['high_fraction'])} "
                     f"({t['high_samples']}/{t['fresh_samples']}) | {t['distinct_high']} | {reach} | "
                     f"{_fmt(after.get('valid_fraction'))} | {_fmt(after.get('distinct'))} | "
                     f"{_fmt(after.get('kl_to_target'), 2)} | "
                     f"{_minutes(s.get('run_wall_s'))} |")
    before = next((s["before"] for s in summaries if s.get("before")), None)
    if before:
        lines.append(f"\nBase model (the runs' `eval_before`): valid {_fmt(before.get('valid_fraction'))}, "
                     f"distinct {_fmt(before.get('distinct'))} over {_fmt(before.get('n_samples'))} samples.")
    partial = [s["run_dir"] for s in summaries if not s["training_counts_complete"]]
    if partial:
        lines.append(f"\nNot every step's batch was logged in {', '.join(partial)}: "
                     "training counts cover the logged ones.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run dirs")
    parser.add_argument("--threshold", type=float, default=None,
                        help="score a completion must reach (default: any finite score, i.e. valid)")
    parser.add_argument("--key", choices=("strip", "exact"), default="strip",
                        help="how completions are compared for distinctness")
    parser.add_argument("--milestones", default="10,25,50", help="report the step each count is first reached")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    milestones = [int(m) for m in args.milestones.split(",") if m]
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        print(f"error: not a run dir: {', '.join(missing)}", file=sys.stderr)
        return 2
    summaries = [run_summary(r, args.threshold, args.key, milestones) for r in args.runs]
    print(markdown(summaries))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(summaries, indent=2, default=str))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
