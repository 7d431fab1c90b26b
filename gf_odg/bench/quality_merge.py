"""--quality-from A/benchmark.json B/benchmark.json: no training, the quality rows of earlier runs in
one report, matched against the one GRPO path among them (a variant measured later against a GRPO run
measured once). Rows of one task must share the evaluation (samples count, threshold)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from gf_odg.bench import quality
from gf_odg.bench.quality_match import matched_score
from gf_odg.bench.report import write
from gf_odg.errors import ConfigError


def _read(path: str) -> dict:
    try:  # "nan"/"inf" strings (jsonable's convention) back to floats
        return json.loads(Path(path).read_text(), object_hook=lambda d: {
            k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in d.items()})
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--quality-from: cannot read {path}: {err}") from None


def merged_report(paths: list[str]) -> dict:
    rows, machines, models = [], [], []
    for path in paths:
        report = _read(path)
        if not report.get("quality"):
            raise ConfigError(f"--quality-from: {path} has no quality section (run the quality section)")
        for r in report["quality"]:
            for key in ("matched", "matched_all", "above_grpo_path"):
                r.pop(key, None)
            r["source"] = str(path)
            r["quality_overrides"] = report.get("quality_overrides", [])
            rows.append(r)
        machines.append(report["machine"])
        models.append(report.get("model", "?"))
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        evals = {(r["eval_samples"], r["threshold"]) for r in mine}
        if len(evals) > 1:
            raise ConfigError(f"--quality-from: {task} rows were evaluated differently (samples, threshold): "
                              f"{sorted(evals)}; merge only runs with the same --quality-eval")
        if sum(r["method"] == "grpo" for r in mine) > 1:
            raise ConfigError(f"--quality-from: more than one GRPO run for {task}; give one (its path is what "
                              "the others are matched against)")
        _name_repeats(mine)
    matched_score(rows)
    return {"machine": " | ".join(dict.fromkeys(machines)), "model": ", ".join(dict.fromkeys(models)),
            "date": datetime.now().isoformat(timespec="seconds"), "quality": rows, "quality_from": list(paths)}


def _name_repeats(mine: list[dict]) -> None:
    """A method present in two runs is named by the overrides that differ (or its file)."""
    common = set.intersection(*(set(r["quality_overrides"]) for r in mine))
    twice = {r["method"] for r in mine if sum(o["method"] == r["method"] for o in mine) > 1}
    for r in mine:
        if r["method"] in twice:
            own = [o for o in r["quality_overrides"] if o not in common]
            r["method"] = f"{r['method']} ({' '.join(own) or r['source']})"


def merge(paths: list[str], out: Path) -> str:
    """Write the merged report into `out`; returns its markdown."""
    report = merged_report(paths)
    text = write(report, out, {"quality": quality})
    text += "\nRows from: " + "; ".join(f"{r['method']} <- {r['source']} "
                                        f"({' '.join(r['quality_overrides']) or 'no overrides'})"
                                        for r in report["quality"]) + "\n"
    (out / "benchmark.md").write_text(text)
    return text
