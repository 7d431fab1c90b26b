"""quality: on rng and keywords, the base model, our tb / vargrad / rloo and TRL GRPO trained for the
same number of steps (or the same seconds) on the same prompts and batch, evaluated by
gf_odg.evaluation.core on the same samples: score, validity, distinct high-reward completions,
semantic diversity, KL to the target (rng: sampled and exact), seconds per step. GRPO's LoRA is
evaluated in memory by the same code (gf_odg/baselines/grpo.py says how GRPO is set up).

RLOO and GRPO train on-policy (`exploration=on_policy`, whatever the task's experiment says): RLOO's
loss is unbiased only for samples from the policy itself (no tempering, no epsilon, no replay).
With --quality-curve / --quality-curve-at each trained method is also evaluated along the way, and
each of ours is compared with GRPO at the same mean score (gf_odg.bench.quality_match)."""

from __future__ import annotations

from gf_odg.bench.common import Context
from gf_odg.bench.quality_match import matched_score
from gf_odg.bench.quality_report import plot, quality_table  # noqa: F401 (plot: the section's figure)
from gf_odg.bench.quality_train import METHODS, TASKS, Settings, method_overrides, quality_rows  # noqa: F401
from gf_odg.errors import ConfigError

DEFAULT_TASKS, DEFAULT_STEPS, DEFAULT_EVAL = "rng,keywords", "rng=100,keywords=20", "rng=512,keywords=128"
markdown = quality_table


def add_arguments(group) -> None:
    group.add_argument("--quality-tasks", default=DEFAULT_TASKS, help=f"tasks ({', '.join(TASKS)})")
    group.add_argument("--quality-steps", default=DEFAULT_STEPS,
                       help="training steps per task; TASK.METHOD=N gives one method its own (keywords.grpo=14)")
    group.add_argument("--quality-eval", default=DEFAULT_EVAL, help="evaluation samples per task")
    group.add_argument("--quality-methods", default=",".join(METHODS), help=f"methods ({', '.join(METHODS)})")
    group.add_argument("--quality-overrides", default="", help="space-separated Hydra overrides for the quality runs")
    group.add_argument("--quality-budget", default="steps", choices=("steps", "time"),
                       help="steps: the same steps for every method; time: GRPO's training seconds for every method")
    group.add_argument("--quality-curve", type=int, default=0,
                       help="also evaluate every N steps (the training path; matched-score comparison with GRPO)")
    group.add_argument("--quality-curve-at", default="",
                       help="also evaluate at exactly these steps (6,8,10,12), with or without --quality-curve")
    group.add_argument("--quality-curve-methods", default="tb,vargrad,rloo,grpo",
                       help="the trained methods that --quality-curve evaluates along the way")
    group.add_argument("--quality-jobs", type=int, default=1,
                       help="train and evaluate up to N methods at once, each in its own process (--threads each)")


def _per_task(text: str, flag: str, methods: bool = False) -> dict[str, int]:
    """'rng=100,keywords=20' (and, with methods, 'keywords.grpo=14': that method's own count)."""
    known = set(TASKS) | ({f"{t}.{m}" for t in TASKS for m in METHODS} if methods else set())
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in known or not value.isdigit() or int(value) <= 0:
            raise ConfigError(f"{flag}: {item!r} is not TASK=N with N > 0" + (" (or TASK.METHOD=N)" if methods else "")
                              + f"; tasks: {', '.join(TASKS)}")
        out[key] = int(value)
    return out


def settings(options, quick: bool = False) -> Settings:
    """The quality flags, checked before any model loads; --quick: 2 steps and 16 samples unless given."""
    tasks = tuple(options.quality_tasks.split(","))
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ConfigError(f"--quality-tasks: unknown {', '.join(sorted(unknown))}; known: {', '.join(TASKS)}")
    steps_text = ",".join(f"{t}=2" for t in TASKS) if quick and options.quality_steps == DEFAULT_STEPS \
        else options.quality_steps
    eval_text = ",".join(f"{t}=16" for t in TASKS) if quick and options.quality_eval == DEFAULT_EVAL \
        else options.quality_eval
    steps = _per_task(steps_text, "--quality-steps", methods=True)
    n_eval = _per_task(eval_text, "--quality-eval")
    for flag, counts in (("--quality-steps", steps), ("--quality-eval", n_eval)):
        missing = [t for t in tasks if t not in counts]
        if missing:
            raise ConfigError(f"{flag} gives no count for {', '.join(missing)}: add {missing[0]}=N")
    methods = tuple(options.quality_methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ConfigError(f"--quality-methods: unknown {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")
    curve_at = options.quality_curve_at.split(",") if options.quality_curve_at else []
    if not all(x.isdigit() and int(x) > 0 for x in curve_at):
        raise ConfigError(f"--quality-curve-at: {options.quality_curve_at!r} is not a comma-separated list of "
                          "steps > 0")
    if options.quality_jobs < 1:
        raise ConfigError(f"--quality-jobs must be >= 1, got {options.quality_jobs}")
    if options.quality_budget == "time":
        if options.quality_jobs > 1:
            raise ConfigError("--quality-jobs > 1 needs --quality-budget steps "
                              "(a time budget comes from GRPO's run first)")
        if "grpo" not in methods:
            raise ConfigError("--quality-budget time takes its budget from GRPO's run: add grpo to --quality-methods")
        methods = ("grpo", *[m for m in methods if m != "grpo"])  # GRPO first: its seconds are the budget
    extra = options.quality_overrides.split()
    if quick:
        extra += ["trainer.samples_per_prompt=4", "trainer.prompts_per_step=1"]
    return Settings(tasks, steps, n_eval, methods, tuple(extra), options.quality_budget, options.quality_curve,
                    tuple(options.quality_curve_methods.split(",")), tuple(int(x) for x in curve_at),
                    options.quality_jobs)


def check(options) -> None:
    settings(options, options.quick)


def run(ctx: Context) -> list[dict]:
    s = settings(ctx.options, ctx.quick)
    if s.jobs > 1:
        from gf_odg.bench.quality_jobs import rows_in_processes

        rows = rows_in_processes(ctx, s)
    else:
        rows = quality_rows(ctx, s)
    matched_score(rows)
    return rows
