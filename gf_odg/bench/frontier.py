"""frontier: the reward-diversity frontier on an open-ended text task (keywords, sentiment): our
objectives, TRL GRPO (beta = 0, with its KL, with an entropy bonus), the base model at several
temperatures and best of n, over several seeds; every method's mean score against its distinct
high-reward completions counted by meaning, compared at GRPO's mean scores.

Built on the quality section: each trained method is a quality row (gf_odg.bench.quality_train:
the same model load, LoRA, prompts, batch and reward; RLOO and GRPO on-policy) evaluated every
--frontier-every steps along its training path by gf_odg.bench.quality_eval, with the same samples
count and evaluation seed for every method of a seed. The base model at temperature 1 is step 0 of
every trained path (a fresh LoRA is the base model) and n = 1 of best of n. Each point: mean score,
distinct completions above the threshold counted by meaning (MiniLM cosine >= 0.9 counted once),
semantic diversity, fluency (mean per-token log p_ref). The matched-score table and the summary over
seeds are gf_odg.bench.frontier_report's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gf_odg.bench.common import Context, compose
from gf_odg.bench.frontier_report import markdown, plot  # noqa: F401 (the section's report and figure)
from gf_odg.bench.frontier_report import PATH_KEYS, REFERENCE, matched_levels, summary
from gf_odg.bench.quality_train import OURS, TASKS, TRL_METHODS, Settings, base_decodings, method_overrides, quality_row
from gf_odg.errors import ConfigError

TEXT_TASKS = ("keywords", "sentiment")  # rng's valid integers all score alike: no score axis
DECODED = ("base", "best_of_n")         # the base model under a decoding: temperatures, best of n
DEFAULT_METHODS = "vargrad,rloo,grpo,grpo_kl,grpo_entropy,base,best_of_n"
# flag -> (full value, --quick value); a flag left unset takes one of these
SIZES = {"steps": (20, 2), "every": (2, 1), "eval": (256, 16), "temperatures": ("0.5,0.7,1.0,1.3,1.6", "0.7"),
         "best_of": ("2,4,8,16", "2")}


def add_arguments(group) -> None:
    group.add_argument("--frontier-task", default="keywords", help=f"the task ({', '.join(TEXT_TASKS)})")
    group.add_argument("--frontier-methods", default=DEFAULT_METHODS,
                       help=f"methods: an objective ({', '.join(OURS)}), {', '.join(TRL_METHODS)}, "
                            f"{', '.join(DECODED)}; grpo is required (its path gives the matched scores)")
    group.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated: every method runs once per seed")
    group.add_argument("--frontier-steps", type=int, default=None,
                       help=f"training steps of every trained method (default {SIZES['steps'][0]}; "
                            f"--quick {SIZES['steps'][1]})")
    group.add_argument("--frontier-every", type=int, default=None,
                       help=f"evaluate every N steps along the training path (default {SIZES['every'][0]}; "
                            f"--quick {SIZES['every'][1]})")
    group.add_argument("--frontier-eval", type=int, default=None,
                       help=f"samples per evaluation (default {SIZES['eval'][0]}; --quick {SIZES['eval'][1]})")
    group.add_argument("--frontier-temperatures", default=None,
                       help=f"the base model's temperatures (default {SIZES['temperatures'][0]}; "
                            f"--quick {SIZES['temperatures'][1]}); temperature 1 always")
    group.add_argument("--frontier-best-of", default=None,
                       help=f"best of n: the n (default {SIZES['best_of'][0]}; --quick {SIZES['best_of'][1]})")
    group.add_argument("--frontier-threshold", type=float, default=None,
                       help="score of a high-reward completion (default: the task's, "
                            + ", ".join(f"{t} {TASKS[t][1]}" for t in TEXT_TASKS) + ")")
    group.add_argument("--frontier-grpo-beta", type=float, default=Settings.grpo_kl_beta,
                       help=f"grpo_kl's KL coefficient (> 0; default {Settings.grpo_kl_beta}, "
                            "DeepSeekMath's GRPO value)")
    group.add_argument("--frontier-grpo-entropy", type=float, default=Settings.grpo_entropy_coef,
                       help=f"grpo_entropy's entropy bonus coefficient (> 0; default {Settings.grpo_entropy_coef})")
    group.add_argument("--frontier-overrides", default="", help="space-separated Hydra overrides for every method")
    group.add_argument("--frontier-jobs", type=int, default=1,
                       help="train up to N methods of a seed at once, each in its own process (--threads each)")


@dataclass(frozen=True)
class Frontier:
    """The frontier flags, checked."""

    task: str
    methods: tuple[str, ...]      # in the order they run; grpo_entropy dropped where TRL lacks it
    seeds: tuple[int, ...]
    steps: int
    every: int
    n_eval: int
    temperatures: tuple[float, ...]
    best_of: tuple[int, ...]
    threshold: float
    grpo_kl_beta: float
    grpo_entropy_coef: float
    extra: tuple[str, ...]
    jobs: int
    skipped: tuple[str, ...] = ()  # "method: why"

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m not in DECODED)

    def quality(self, seed: int) -> Settings:
        """The quality section's settings of one seed: every trained method evaluated every `every` steps."""
        return Settings(tasks=(self.task,), steps={self.task: self.steps}, n_eval={self.task: self.n_eval},
                        methods=self.trained, extra=(*self.extra, f"seed={seed}"), curve_every=self.every,
                        curve_methods=self.trained, jobs=self.jobs, grpo_kl_beta=self.grpo_kl_beta,
                        grpo_entropy_coef=self.grpo_entropy_coef, thresholds={self.task: self.threshold})


def _numbers(text: str, flag: str, kind, low, what: str) -> tuple:
    """'0.7,1.3' -> (0.7, 1.3): distinct numbers of `kind`, each >= low (> low for floats)."""
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        values = ()
    ok = values and len(set(values)) == len(values) and all(v > low if kind is float else v >= low for v in values)
    if not ok:
        raise ConfigError(f"{flag}: {text!r} is not a comma-separated list of distinct {what}")
    return values


def settings(options, quick: bool = False) -> Frontier:
    """The frontier flags, checked before any model loads or any file is written."""
    task = options.frontier_task
    if task not in TEXT_TASKS:
        raise ConfigError(f"--frontier-task: unknown {task!r}; known: {', '.join(TEXT_TASKS)}")
    methods = tuple(dict.fromkeys(filter(None, options.frontier_methods.split(","))))
    known = (*OURS, *TRL_METHODS, *DECODED)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--frontier-methods: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if REFERENCE not in methods:
        raise ConfigError(f"--frontier-methods: add {REFERENCE} (its training path gives the scores the others "
                          "are compared at)")
    seeds = _numbers(options.seeds, "--seeds", int, 0, "integers >= 0 (e.g. 0,1,2)")
    size = {key: full_quick[1] if quick else full_quick[0] for key, full_quick in SIZES.items()}
    counts = {}
    for key in ("steps", "every", "eval"):
        value = getattr(options, f"frontier_{key}")
        counts[key] = size[key] if value is None else value
        if counts[key] < 1:
            raise ConfigError(f"--frontier-{key} must be >= 1, got {counts[key]}")
    temperatures = _numbers(options.frontier_temperatures or size["temperatures"], "--frontier-temperatures",
                            float, 0.0, "temperatures > 0 (e.g. 0.7,1.3)")
    best_of = _numbers(options.frontier_best_of or size["best_of"], "--frontier-best-of", int, 2,
                       "integers >= 2 (e.g. 2,4,8)")
    for flag, value in (("--frontier-grpo-beta", options.frontier_grpo_beta),
                        ("--frontier-grpo-entropy", options.frontier_grpo_entropy)):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    if options.frontier_jobs < 1:
        raise ConfigError(f"--frontier-jobs must be >= 1, got {options.frontier_jobs}")
    skipped = ()
    if "grpo_entropy" in methods:
        from gf_odg.baselines.grpo import grpo_config_has

        if not grpo_config_has("entropy_coef"):
            from importlib.metadata import version

            methods = tuple(m for m in methods if m != "grpo_entropy")
            skipped = (f"grpo_entropy: TRL {version('trl')}'s GRPOConfig has no entropy_coef",)
    extra = tuple(options.frontier_overrides.split())
    if quick:
        extra += ("trainer.samples_per_prompt=4", "trainer.prompts_per_step=1", "task.max_new_tokens=8")
    threshold = TASKS[task][1] if options.frontier_threshold is None else options.frontier_threshold
    return Frontier(task, methods, seeds, counts["steps"], counts["every"], counts["eval"],
                    tuple(sorted({1.0, *temperatures})), tuple(sorted(best_of)), threshold, options.frontier_grpo_beta,
                    options.frontier_grpo_entropy, extra, options.frontier_jobs, skipped)


def check(options) -> None:
    """The flags, and each objective's config composed and validated as a run would (a mistyped
    --frontier-overrides, subtb on a reward without prefix scores), before anything is written."""
    from gf_odg.config.validation import validate
    from gf_odg.data.tasks import build_reward
    from gf_odg.objectives import objective_class

    f = settings(options, options.quick)
    s = f.quality(f.seeds[0])
    for objective in dict.fromkeys("tb" if m in DECODED else "rloo" if m in TRL_METHODS else m for m in f.methods):
        cfg = compose([f"model={options.model}", *options.overrides.split(), *method_overrides(f.task, objective, s)])
        validate(cfg)
        if objective_class(objective).needs_prefix_scores and not hasattr(build_reward(cfg.task.reward),
                                                                          "score_prefixes"):
            raise ConfigError(f"--frontier-methods: {objective} needs a reward that scores every prefix; "
                              f"{f.task}'s has none")


def run(ctx: Context) -> dict:
    from gf_odg.evaluation.sampling import Decoding

    f = settings(ctx.options, ctx.quick)
    points, runs = [], []
    decodings = [Decoding(f"temperature_{t:g}", temperature=t) for t in f.temperatures]
    decodings += [Decoding(f"best_of_{n}", best_of=n) for n in f.best_of]
    for seed in f.seeds:
        print(f"  frontier {f.task} seed {seed}", flush=True)
        sctx = dataclasses.replace(ctx, samples_dir=ctx.samples_dir / f"seed{seed}" if ctx.samples_dir else None)
        s = f.quality(seed)
        decoded = dict(zip((d.name for d in decodings), base_decodings(sctx, s, f.task, decodings)))
        start = decoded["temperature_1"]  # step 0 of every trained path
        points += _decoded_points(f, seed, decoded, start)
        if s.jobs > 1:
            from gf_odg.bench.quality_jobs import rows_in_processes

            rows = rows_in_processes(sctx, s)
        else:
            rows = [quality_row(sctx, s, f.task, method, None) for method in s.methods]
        for row in rows:
            points += [_point(row["method"], seed, "step", 0, start),
                       *(_point(row["method"], seed, "step", p["step"], p) for p in row["curve"])]
            runs.append({"method": row["method"], "seed": seed, "steps": row["steps"], "train_s": row["train_s"],
                         "step_s": row["step_s"], "K": row["K"], "prompts_per_step": row["prompts_per_step"],
                         **{k: v for k, v in row.items() if k.startswith("trl_")}})
    result = {"task": f.task, "threshold": f.threshold, "eval_samples": f.n_eval, "seeds": list(f.seeds),
              "methods": list(f.methods), "skipped": list(f.skipped), "steps": f.steps, "every": f.every,
              "temperatures": list(f.temperatures), "best_of": list(f.best_of), "grpo_kl_beta": f.grpo_kl_beta,
              "grpo_entropy_coef": f.grpo_entropy_coef, "overrides": list(f.extra), "runs": runs, "points": points}
    result["matched"] = matched_levels(result)
    result["summary"] = summary(result)
    return result


def _point(method: str, seed: int, axis: str, at, evaluation: dict) -> dict:
    """One evaluation point: where on its path (axis: step, temperature, best_of) and the path keys."""
    return {"method": method, "seed": seed, "axis": axis, "at": at, **{k: evaluation.get(k) for k in PATH_KEYS}}


def _decoded_points(f: Frontier, seed: int, decoded: dict[str, dict], start: dict) -> list[dict]:
    """The base model's line (one point per temperature) and best of n's (n = 1: temperature 1)."""
    points = []
    if "base" in f.methods:
        points += [_point("base", seed, "temperature", t, decoded[f"temperature_{t:g}"]) for t in f.temperatures]
    if "best_of_n" in f.methods:
        points += [_point("best_of_n", seed, "best_of", 1, start),
                   *(_point("best_of_n", seed, "best_of", n, decoded[f"best_of_{n}"]) for n in f.best_of)]
    return points
