"""The report: benchmark.json (every figure), benchmark.md (each section's lines) and its figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gf_odg.io.tracking import jsonable


def num(value, fmt: str = ".3f") -> str:
    """A table cell: '-' for None, 'nan'/'inf' as written, floats formatted, anything else as str."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, fmt) if math.isfinite(value) else str(value)
    return str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, then a blank line."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def generic_markdown(result) -> list[str]:
    """A section without its own `markdown`: its rows (a dict, or a list of dicts) as one table."""
    if isinstance(result, str):  # a section that writes its own markdown
        return [result, ""]
    rows = [result] if isinstance(result, dict) else list(result or [])
    if not rows or not all(isinstance(r, dict) for r in rows):
        return [f"{json.dumps(jsonable(result))}", ""]
    header = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    return table(header, [[num(r.get(k)) for k in header] for r in rows])


def markdown(report: dict, modules: dict[str, object]) -> str:
    """benchmark.md: the machine line (and the commit and command, where the report has them), then
    each section that ran, in `modules`' order."""
    lines = [f"Machine: {report['machine']}; model: {report['model']}; {report['date']}", ""]
    if report.get("command"):
        lines += [f"Commit `{report.get('commit', 'unknown')}`; command: `{report['command']}`", ""]
    for name, module in modules.items():
        if report.get(name) is not None:
            render = getattr(module, "markdown", generic_markdown)
            lines += list(render(report[name]))
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path, modules: dict[str, object]) -> str:
    """benchmark.json, benchmark.md and each section's figures into `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report, modules)
    _atomic_write(out / "benchmark.json", json.dumps(jsonable(report), indent=2))
    _atomic_write(out / "benchmark.md", text)
    for name, module in modules.items():
        if report.get(name) is not None and hasattr(module, "plot"):
            module.plot(report[name], out, report["machine"])
    return text


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, title: str, path: Path) -> list[Path]:
    """The report's figure finished the one way: the run's title above, tight layout, 120 dpi, closed."""
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return [path]
