"""The quality section's training: one (task, method) row trained and evaluated (our Trainer for
an objective of configs/objective, TRL's GRPOTrainer for grpo and its variants, nothing for base),
every row in turn, and the base model under other decodings (temperatures, best of n).

RLOO and GRPO train on-policy (`exploration=on_policy`, whatever the task's experiment says): RLOO's
loss is unbiased only for samples from the policy itself (no tempering, no epsilon, no replay)."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gf_odg.bench.common import CONFIG_DIR, Context, compose, our_trainer
from gf_odg.bench.quality_eval import CURVE_KEYS, curve_point, evaluate_policy, grpo_curve_callback, unmasked_task

TASKS = {
    # task -> (Hydra overrides for every method, threshold of a "high-reward" completion)
    # rng: every valid integer scores log(1/101), so the high-reward completions are the valid ones.
    "rng": (["experiment=rng_tb"], math.log(1 / 101) - 1e-6),
    # keywords: 4 x fraction of the concepts + length band + 0.5 x fluency; 2.0 needs, e.g., all four
    # concepts at a fluency above -4 nats per token, or three at one above -2.
    "keywords": (["experiment=keywords"], 2.0),
    # sentiment: 3 x VADER compound; 1.5 is a compound of 0.5, clearly positive (VADER calls >= 0.05 positive).
    "sentiment": (["experiment=sentiment"], 1.5),
}
METHODS = ("base", "tb", "vargrad", "rloo", "grpo")
OURS = tuple(sorted(path.stem for path in (CONFIG_DIR / "objective").glob("*.yaml")))  # our Trainer, by objective
# TRL GRPO runs: beta = 0 (no KL), beta > 0 (KL to the base model), an entropy bonus (beta = 0); the
# coefficients come from Settings. grpo_entropy needs a TRL whose GRPOConfig has `entropy_coef`.
TRL_METHODS = ("grpo", "grpo_kl", "grpo_entropy")
ON_POLICY = ("rloo",)  # objectives whose loss assumes samples from the policy itself


@dataclass(frozen=True)
class Settings:
    """The quality section's flags, checked."""

    tasks: tuple[str, ...]
    steps: dict[str, int]     # task (or task.method) -> training steps
    n_eval: dict[str, int]    # task -> evaluation samples
    methods: tuple[str, ...]
    extra: tuple[str, ...] = ()   # --quality-overrides (+ --quick's batch)
    budget: str = "steps"
    curve_every: int = 0
    curve_methods: tuple[str, ...] = ("tb", "vargrad", "rloo", "grpo")
    curve_at: tuple[int, ...] = ()
    jobs: int = 1
    grpo_kl_beta: float = 0.04          # grpo_kl's KL coefficient (DeepSeekMath's GRPO value)
    grpo_entropy_coef: float = 0.01     # grpo_entropy's entropy bonus
    thresholds: dict[str, float] = field(default_factory=dict)  # task -> its own threshold (default: TASKS')

    def threshold(self, task: str) -> float:
        """The score of a high-reward completion on `task`."""
        return self.thresholds.get(task, TASKS[task][1])

    def at_step(self, step: int) -> bool:
        return bool(self.curve_every and step % self.curve_every == 0) or step in self.curve_at


def quality_rows(ctx: Context, s: Settings) -> list[dict]:
    """Every (task, method) row in turn, in this process; budget "time": GRPO's seconds first."""
    rows = []
    for task_name in s.tasks:
        budget_s = None
        for method in s.methods:
            rows.append(quality_row(ctx, s, task_name, method, budget_s))
            if method == "grpo" and s.budget == "time":
                budget_s = rows[-1]["train_step_s_total"]
    return rows


def method_overrides(task_name: str, method: str, s: Settings) -> list[str]:
    """The Hydra overrides of one (task, method): the task's experiment, the objective, the user's
    extras; RLOO (and GRPO, which shares its config) on-policy and without p_ref in its reward."""
    objective = "rloo" if method in TRL_METHODS else "tb" if method == "base" else method
    overrides = [*TASKS[task_name][0], f"objective={objective}", *s.extra]
    if objective in ON_POLICY:
        overrides += ["objective.ref_weight=0", "exploration=on_policy"]
    return overrides


def trl_extra(method: str, s: Settings) -> dict:
    """The GRPOConfig fields a TRL method sets beyond gf_odg.baselines.grpo.grpo_args's."""
    return {"grpo": {}, "grpo_kl": {"beta": s.grpo_kl_beta},
            "grpo_entropy": {"entropy_coef": s.grpo_entropy_coef}}[method]


def quality_row(ctx: Context, s: Settings, task_name: str, method: str, budget_s: float | None) -> dict:
    """Train one method (an objective: our Trainer; grpo and its variants: TRL; base: nothing) and
    evaluate it."""
    threshold, n = s.threshold(task_name), s.n_eval[task_name]
    base_overrides = method_overrides(task_name, method, s)
    n_steps = s.steps.get(f"{task_name}.{method}", s.steps[task_name])
    row: dict = {"task": task_name, "method": method, "eval_samples": n, "threshold": threshold, "budget": s.budget}
    if s.budget == "time" and method in OURS:
        row["probe_step_s"] = probe_step_s(ctx, base_overrides)
        row["budget_s"] = budget_s
        n_steps = max(1, int(budget_s // row["probe_step_s"]))
        print(f"  quality {task_name} {method}: {row['probe_step_s']:.2f} s/step probed -> {n_steps} steps "
              f"in {budget_s:.0f} s", flush=True)
    row["steps"] = n_steps if method != "base" else 0
    overrides = [*base_overrides, f"trainer.max_steps={n_steps}"]
    label = f"{task_name}-{method}"  # the samples files: <label>-step<N>.jsonl
    every = method in s.curve_methods and bool(s.curve_every or s.curve_at)
    evaluate = _Evaluation(ctx, n, threshold, label)
    with tempfile.TemporaryDirectory(prefix=f"gfodg-quality-{task_name}-{method}-") as tmpdir:
        t_start = time.perf_counter()
        if method in OURS:
            cfg, model, tok, task, times, curve, curve_s = _train_ours(ctx, s, overrides, Path(tmpdir), every,
                                                                       evaluate, row)
        else:
            cfg, model, tok, task, times, curve, curve_s = _train_baseline(ctx, s, overrides, Path(tmpdir), method,
                                                                           every, evaluate, row)
        row["train_s"] = time.perf_counter() - t_start
        row["train_step_s_total"] = sum(times)
        row["step_s"] = statistics.median(times) if times else None
        row["step_s_mean"] = statistics.fmean(times) if times else None
        row["K"], row["prompts_per_step"] = cfg.trainer.samples_per_prompt, cfg.trainer.prompts_per_step
        e = cfg.exploration  # what the row trained under (GRPO samples through TRL: its config's, unused)
        row["exploration"] = {"p_temper": e.p_temper, "epsilon": e.epsilon, "replay": bool(e.replay.enabled)}
        t0 = time.perf_counter()
        row["eval"] = evaluate.final(model, tok, task, row["steps"])
        if every and method != "base":
            row["curve"] = [*curve, {"step": row["steps"], **{k: row["eval"].get(k) for k in CURVE_KEYS}}]
            row["curve_eval_s"] = curve_s
        if task_name == "rng":  # the same policy without the mask: what it writes on its own
            free = evaluate.unlabelled(model, tok, unmasked_task(cfg, tok))
            row["eval_unmasked"] = {k: free.get(k) for k in ("valid_fraction", "distinct", "kl_to_target",
                                                             "n_above_threshold", "score_mean")}
        row["eval_s"] = time.perf_counter() - t0
        del model
    e = row["eval"]
    print(f"  quality {task_name} {method}: {row['steps']} steps, score {e.get('score_mean', math.nan):.3f}, "
          f"valid {e.get('valid_fraction', math.nan):.3f}, distinct high-reward {e.get('n_above_threshold')}, "
          f"semantic diversity {e.get('semantic_diversity', math.nan):.3f}, exact KL {e.get('exact_kl', '-')}, "
          f"{row['step_s'] or 0:.2f} s/step", flush=True)
    return row


class _Evaluation:
    """One row's evaluation settings: samples count, threshold, seed, batch size, where samples go."""

    def __init__(self, ctx: Context, n: int, threshold: float, label: str):
        self.n, self.threshold, self.label, self.samples_dir = n, threshold, label, ctx.samples_dir
        self.seed, self.batch_size = 1000, 64  # set from the row's config once it is composed

    def curve(self, model, tok, task, step: int) -> dict:
        return curve_point(model, tok, task, self.n, self.threshold, self.seed, self.batch_size, step,
                           self.samples_dir, self.label)

    def final(self, model, tok, task, step: int) -> dict:
        return evaluate_policy(model, tok, task, self.n, self.threshold, self.seed, self.batch_size,
                               self.samples_dir, f"{self.label}-step{step:04d}")

    def decoded(self, model, tok, task, decoding) -> dict:
        return evaluate_policy(model, tok, task, self.n, self.threshold, self.seed, self.batch_size,
                               self.samples_dir, f"{self.label}-{decoding.name}", decoding)

    def unlabelled(self, model, tok, task) -> dict:
        return evaluate_policy(model, tok, task, self.n, self.threshold, self.seed, self.batch_size)

    def grpo_callback(self, tok, task, at_step, points: list[dict]):
        return grpo_curve_callback(tok, task, self.n, self.threshold, self.seed, self.batch_size, at_step, points,
                                   self.samples_dir, self.label)


def _train_ours(ctx, s: Settings, overrides, tmp: Path, every: bool, evaluate: _Evaluation, row: dict):
    trainer = our_trainer(ctx, overrides, tmp, "benchmark-quality")
    cfg = trainer.cfg
    evaluate.seed, evaluate.batch_size = cfg.seed + 1000, cfg.task.evaluation.batch_size
    times, valid, curve, curve_s = [], [], [], 0.0
    while trainer.global_step < cfg.trainer.max_steps:
        t0 = time.perf_counter()
        metrics = trainer.step()
        times.append(time.perf_counter() - t0)
        valid.append(metrics["reward/valid_fraction"])
        if every and s.at_step(trainer.global_step) and trainer.global_step < cfg.trainer.max_steps:
            t0 = time.perf_counter()
            curve.append(evaluate.curve(trainer.model, trainer.tokenizer, trainer.task, trainer.global_step))
            curve_s += time.perf_counter() - t0
    row["train_valid_fraction"] = statistics.fmean(valid[-10:])
    row["sampled_with_constraint_mask"] = True
    return cfg, trainer.model, trainer.tokenizer, trainer.task, times, curve, curve_s


def _train_baseline(ctx, s: Settings, overrides, tmp: Path, method: str, every: bool, evaluate: _Evaluation,
                    row: dict):
    """base: the untrained policy; grpo and its variants: TRL's GRPOTrainer on the same model load,
    LoRA and reward (sampling without our mask)."""
    from gf_odg.baselines.grpo import build_grpo_trainer, grpo_args
    from gf_odg.training.trainer import build_policy_and_task, seed_everything

    cfg = compose([f"model={ctx.model}", *ctx.overrides, f"trainer.device={ctx.device}", *overrides])
    evaluate.seed, evaluate.batch_size = cfg.seed + 1000, cfg.task.evaluation.batch_size
    seed_everything(cfg.seed)
    _, model, tok, _, task = build_policy_and_task(cfg, ctx.device)
    times, curve = [], []
    if method in TRL_METHODS:
        t = cfg.trainer
        args = grpo_args(tmp / "trl", k=t.samples_per_prompt, prompts_per_step=t.prompts_per_step,
                         max_new_tokens=task.constraints.max_new_tokens, max_steps=t.max_steps, lr=t.lr,
                         warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule, min_lr_ratio=t.min_lr_ratio,
                         grad_clip=t.grad_clip, seed=cfg.seed, device=ctx.device, **trl_extra(method, s))
        trainer, trl_reward, timer, info = build_grpo_trainer(model, tok, task, args, cfg.objective.log_reward_min)
        if every:  # after the timer: evaluation time is not step time
            trainer.add_callback(evaluate.grpo_callback(tok, task, s.at_step, curve))
        trainer.train()
        times = timer.times
        row.update(info)
        last = [score for call in trl_reward.calls[-10:] for score in call["scores"]]
        row["train_valid_fraction"] = statistics.fmean(math.isfinite(score) for score in last)
        row["sampled_with_constraint_mask"] = False
        model = trainer.model
        del trainer
    return cfg, model, tok, task, times, curve, 0.0


def base_decodings(ctx: Context, s: Settings, task_name: str, decodings) -> list[dict]:
    """The base model (fresh LoRA, as every trained method starts) under each decoding of `decodings`
    (gf_odg.evaluation.sampling.Decoding), from one load, evaluated as the rows are: the same samples
    count, seed and threshold; the samples as <task>-base-<decoding>.jsonl."""
    from gf_odg.training.trainer import build_policy_and_task, seed_everything

    cfg = compose([f"model={ctx.model}", *ctx.overrides, f"trainer.device={ctx.device}",
                   *method_overrides(task_name, "base", s)])
    evaluate = _Evaluation(ctx, s.n_eval[task_name], s.threshold(task_name), f"{task_name}-base")
    evaluate.seed, evaluate.batch_size = cfg.seed + 1000, cfg.task.evaluation.batch_size
    seed_everything(cfg.seed)
    _, model, tok, _, task = build_policy_and_task(cfg, ctx.device)
    return [evaluate.decoded(model, tok, task, decoding) for decoding in decodings]


def probe_step_s(ctx: Context, overrides: list[str], steps: int = 3) -> float:
    """Median seconds of one of our steps after a warm-up step (a throwaway trainer)."""
    from gf_odg.bench.common import time_steps

    with tempfile.TemporaryDirectory(prefix="gfodg-probe-") as tmpdir:
        trainer = our_trainer(ctx, [*overrides, f"trainer.max_steps={steps + 1}"], Path(tmpdir), "benchmark-probe")
        step_s, _, _ = time_steps(trainer, steps)
        trainer.close()
    return step_s
