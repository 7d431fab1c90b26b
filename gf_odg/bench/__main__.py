"""uv run python -m gf_odg.bench [SECTION ...] [options]: run benchmark sections, write the report.

    uv run python -m gf_odg.bench                                     # prefill memory overhead, embedded SmolLM2, CPU
    uv run python -m gf_odg.bench prefill --ks 16,32 --repeats 3
    uv run python -m gf_odg.bench prefill memory overhead --model tiny-random --quick   # seconds
    uv run python -m gf_odg.bench trl_step --ks 16,32
    uv run python -m gf_odg.bench quality --quality-tasks rng --quality-steps rng=100
    uv run python -m gf_odg.bench quality --quality-tasks keywords --quality-budget time --quality-curve 2
    uv run python -m gf_odg.bench --quality-from outputs/benchmark/A/benchmark.json outputs/benchmark/B/benchmark.json
    uv run python -m gf_odg.bench frontier --frontier-task keywords --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import shutil
import sys
from datetime import datetime
from pathlib import Path

import torch

from gf_odg.bench import DEFAULT_SECTIONS, SECTIONS, available_sections, load_section
from gf_odg.bench.common import Context, commit, guarded, machine
from gf_odg.errors import ConfigError
from gf_odg.startup import ROOT

SAMPLED = ("quality", "frontier")  # sections whose evaluations keep their completions (quality_samples/)


def _section_help() -> str:
    """Each section's name and the first paragraph of its module docstring."""
    import textwrap

    lines = []
    for name, path in SECTIONS.items():
        if name in available_sections():
            doc = " ".join((importlib.import_module(path).__doc__ or "").strip().split("\n\n")[0].split())
            doc = doc.removeprefix(f"{name}:").strip()
        else:
            doc = f"(its module {path} is not in this checkout)"
        lines.append(textwrap.fill(doc, 100, initial_indent=f"  {name}: ", subsequent_indent="      "))
    return "sections (default: " + " ".join(DEFAULT_SECTIONS) + "):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gf_odg.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks, each against a baseline measured in the same run (figures are ratios). "
                    "Writes benchmark.md, benchmark.json and benchmark*.png to --out.",
        epilog=_section_help())
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"sections to run: {', '.join(SECTIONS)}")
    parser.add_argument("--sections", dest="sections_csv", default=None, metavar="A,B",
                        help="the same as positional sections, comma-separated (the old scripts/benchmark.py flag)")
    parser.add_argument("--model", default="smollm2-135m", help="a configs/model/*.yaml name (tiny-random: seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ks", default="16,32", help="completions per prompt, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (each child process too)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repeat (K=4; memory 4096x2x8; quality: 2 steps, 16 samples, K=4; "
                             "frontier: the same, 8 new tokens, a point every step)")
    parser.add_argument("--out", default=None, help="report folder (default outputs/benchmark/<date>_<time>)")
    parser.add_argument("--overrides", default="", help="space-separated Hydra overrides for every model loaded")
    parser.add_argument("--scale-steps", type=int, default=5, help="timed steps per variant (scale, sharding)")
    parser.add_argument("--quality-from", nargs="+", default=None, metavar="BENCHMARK_JSON",
                        help="no training: the quality rows of these earlier benchmark.json files in one table, "
                             "matched-score comparison recomputed (e.g. a new variant against a GRPO path run before)")
    for name, path in available_sections().items():
        module = importlib.import_module(path)
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser.add_argument_group(f"section {name}"))
    return parser


def chosen_sections(args) -> list[str]:
    names = list(args.sections) + (args.sections_csv.split(",") if args.sections_csv else [])
    names = list(dict.fromkeys(n for n in names if n)) or list(DEFAULT_SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown benchmark section {', '.join(unknown)}; choose from: {', '.join(SECTIONS)}")
    return [n for n in SECTIONS if n in names]  # the registry's order


def make_context(args, out: Path) -> Context:
    text = "4" if args.quick else args.ks
    if not all(k.strip().isdigit() and int(k) > 0 for k in text.split(",")):
        raise ConfigError(f"--ks: {args.ks!r} is not a comma-separated list of positive integers (e.g. 16,32)")
    ks = tuple(int(k) for k in text.split(","))
    return Context(model=args.model, device=torch.device(args.device), ks=ks, repeats=1 if args.quick else args.repeats,
                   threads=args.threads, overrides=tuple(args.overrides.split()), out=out, quick=args.quick,
                   options=args)


def run(args, argv: list[str]) -> None:
    out = Path(args.out or ROOT / "outputs" / "benchmark" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if args.quality_from:
        from gf_odg.bench.quality_merge import merge

        print(merge(args.quality_from, out))
        print(f"written to {out}")
        return
    names = chosen_sections(args)
    modules = {name: load_section(name) for name in names}
    for module in modules.values():  # every flag checked before any model loads
        if hasattr(module, "check"):
            module.check(args)
    ctx = make_context(args, out)  # before any model loads: --ks checked
    if set(SAMPLED) & set(names):  # a run that fails leaves its samples under this name, not as finished results
        samples = out / "quality_samples.partial"
        shutil.rmtree(samples, ignore_errors=True)
        ctx = dataclasses.replace(ctx, samples_dir=samples)
    report = {"machine": machine(), "model": args.model, "date": datetime.now().isoformat(timespec="seconds"),
              "commit": commit(), "command": shlex.join(["uv", "run", "python", "-m", "gf_odg.bench", *argv]),
              "sections": names}
    print(f"benchmark on {report['machine']}", flush=True)
    for name, module in modules.items():
        report[name] = module.run(ctx)
    if "quality" in names:
        report["quality_overrides"] = list(modules["quality"].settings(args, args.quick).extra)
        report["quality_budget"] = args.quality_budget
    if ctx.samples_dir is not None and ctx.samples_dir.is_dir():
        report["quality_samples"] = "quality_samples/"
        shutil.rmtree(out / "quality_samples", ignore_errors=True)
        ctx.samples_dir.rename(out / "quality_samples")
    from gf_odg.bench.report import write

    print(write(report, out, modules))
    print(f"written to {out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return guarded(lambda: run(args, argv), args.threads)


if __name__ == "__main__":
    sys.exit(main())
