"""Benchmarks, each against a baseline measured in the same process and run: figures are ratios
(ours / baseline), never absolute claims. Run as

    uv run python -m gf_odg.bench [SECTION ...] [options]      # default sections: prefill memory overhead
    uv run python -m gf_odg.bench --help                        # every option
    uv run python -m gf_odg.bench prefill memory overhead --model tiny-random --quick   # seconds

Writes benchmark.md, benchmark.json and benchmark*.png to --out (default outputs/benchmark/<time>).
`scripts/benchmark.py` is a shim over `gf_odg.bench.__main__.main` (its old `--sections a,b` still works).

A section is a module named in SECTIONS (imported only when chosen). Its interface:

    run(ctx: gf_odg.bench.common.Context) -> dict | list[dict] | str     required
        Measure and return JSON-able figures (or ready markdown); they go into benchmark.json as
        report[<name>]. Report a figure as a ratio to a baseline measured in the same run.
        ctx is frozen: model (a configs/model name), device (torch.device), ks (tuple of K), repeats,
        threads, overrides (Hydra overrides for every model loaded: pass them to
        gf_odg.bench.common.compose / load / our_trainer), out (the report folder), samples_dir,
        quick (smallest sizes), options (the argparse Namespace: every flag, the section's own too).
        Print one progress line per row with flush=True. Raise gf_odg.errors.GFODGError (one line,
        exit status 2) for a user's mistake. Import heavy libraries inside run: every section module
        present is imported to build --help.
    markdown(result) -> list[str]                                   optional
        The section's lines in benchmark.md; without it, gf_odg.bench.report.generic_markdown
        renders the rows (a dict, or a list of dicts) as a table, and a str as it is.
    plot(result, out: pathlib.Path, title: str) -> list[pathlib.Path]    optional
        Figures written into `out`.
    add_arguments(group: argparse._ArgumentGroup) -> None            optional
        The section's own flags (shown in --help under the section's name).
    check(options: argparse.Namespace) -> None                      optional
        Validate those flags; called for every chosen section before any section runs.

Adding a section is one line in SECTIONS and one module; nothing else changes.
"""

from __future__ import annotations

# name -> module path. Order is the order sections run and appear in the report.
SECTIONS: dict[str, str] = {
    "prefill": "gf_odg.bench.prefill",      # shared-prompt KV cache vs per-sample prefill
    "memory": "gf_odg.bench.memory",        # selective chunked log-softmax vs full float32 log_softmax
    "overhead": "gf_odg.bench.overhead",    # our step vs raw generate + forward/backward
    "first_run": "gf_odg.bench.first_run",  # the default run's step in bf16 vs fp32; exact eval tree vs forced
    "determinism": "gf_odg.bench.determinism",  # trainer.deterministic's kernels vs the default ones
    "scale": "gf_odg.bench.scale",          # 4-bit vs bf16: s/step, sampled tokens/s, peak memory
    "sharding": "gf_odg.bench.sharding",    # DDP vs FSDP launches
    "trl_step": "gf_odg.bench.trl_step",    # our step vs TRL GRPOTrainer's on the same batch
    "quality": "gf_odg.bench.quality",      # trained tb/vargrad/rloo vs base and TRL GRPO
    "frontier": "gf_odg.bench.frontier",    # score vs distinct-by-meaning paths over seeds, matched at GRPO's scores
    "gpu": "gf_odg.bench.gpu",              # GPU figures (its own module; may be absent in a checkout)
}
DEFAULT_SECTIONS = ("prefill", "memory", "overhead")


def load_section(name: str):
    """The module of section `name`; a clear error where the name is unknown or its module absent."""
    import importlib

    from gf_odg.errors import ConfigError

    if name not in SECTIONS:
        raise ConfigError(f"benchmark section {name!r} is unknown; choose from: {', '.join(SECTIONS)}")
    path = SECTIONS[name]
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name != path:  # the module exists but something it imports does not: a real bug, keep it
            raise
        raise ConfigError(f"benchmark section {name!r}: its module {path} is not in this checkout "
                          f"(gf_odg/bench/{path.rsplit('.', 1)[-1]}.py); choose another section") from None


def available_sections() -> dict[str, str]:
    """name -> module path of every section whose module is present in this checkout."""
    import importlib.util

    return {name: path for name, path in SECTIONS.items() if importlib.util.find_spec(path) is not None}
