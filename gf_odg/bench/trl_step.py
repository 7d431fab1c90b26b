"""trl_step: our training step (TB, on-policy) against one optimiser step of TRL's GRPOTrainer on the
same batch: the rng chat prompt, K = num_generations completions, the same max new tokens, model
load and LoRA, learning rate and clipping, no reference model on either side (TB with ref_weight = 0;
GRPO with beta = 0), both in this process, median after a warm-up step. Ours is timed under the rng
constraint mask and without it (TRL samples unmasked). Figures: ratio = ours / TRL."""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

from gf_odg.bench.common import Context, load, our_trainer, time_steps
from gf_odg.bench.report import table

OURS = (("masked", []), ("unmasked", ["task.constraints.allowed=null"]))


def run(ctx: Context) -> list[dict]:
    rows = []
    for k in ctx.ks:
        with tempfile.TemporaryDirectory(prefix="gfodg-trl-step-") as tmpdir:
            tmp = Path(tmpdir)
            row: dict = {"prompt": "rng (chat prompt)", "K": k, "objective": "tb", "repeats": ctx.repeats}
            common = [f"trainer.samples_per_prompt={k}", "exploration=on_policy", "objective=tb"]
            for tag, extra in OURS:
                trainer = our_trainer(ctx, common + extra, tmp / tag, "benchmark-trl")
                row["prompt_tokens"] = len(trainer.task.prompt_tokens[0])
                row["max_new_tokens"] = trainer.task.constraints.max_new_tokens
                lora = trainer.cfg.model.lora
                row["lora"] = {"r": lora.r, "alpha": lora.alpha, "targets": list(lora.target_modules),
                               "load_in_4bit": bool(trainer.cfg.model.quantization.load_in_4bit)}
                row[f"ours_{tag}_step_s"], row[f"ours_{tag}_length_mean"], _ = time_steps(trainer, ctx.repeats)
                trainer.close()
                del trainer
            row["trl_step_s"], row["trl_length_mean"], info = time_trl(ctx, k, tmp)
            row.update(info)
            row.update(ratios(row))
        rows.append(row)
        print(f"  trl_step K={k}: ours {row['ours_masked_step_s']:.3f}s masked / {row['ours_unmasked_step_s']:.3f}s "
              f"unmasked, TRL GRPO {row['trl_step_s']:.3f}s; ratio {row['ratio_masked']:.2f} / "
              f"{row['ratio_unmasked']:.2f}", flush=True)
    return rows


def ratios(row: dict) -> dict:
    """Ours over TRL's seconds per step, masked and unmasked."""
    return {f"ratio_{tag}": row[f"ours_{tag}_step_s"] / row["trl_step_s"] for tag, _ in OURS}


def time_trl(ctx: Context, k: int, tmp: Path, lora_fp32: bool = True) -> tuple[float, float, dict]:
    """Median seconds of one GRPOTrainer optimiser step (generate, reward, forward/backward,
    optimiser) after a warm-up step, on the rng chat prompt with K = num_generations; the mean
    completion length over the timed steps; what TRL was set up with."""
    from gf_odg.baselines.grpo import build_grpo_trainer, grpo_args
    from gf_odg.data.tasks import build_task

    cfg, model, tok = load(ctx, [f"trainer.device={ctx.device}"])
    task = build_task(cfg.task, tok, cfg.model.chat_template, cfg.paths.root)
    args = grpo_args(tmp / "trl", k=k, prompts_per_step=1, max_new_tokens=task.constraints.max_new_tokens,
                     max_steps=ctx.repeats + 1, lr=cfg.trainer.lr, grad_clip=cfg.trainer.grad_clip, seed=cfg.seed,
                     device=ctx.device)
    trainer, reward, timer, info = build_grpo_trainer(model, tok, task, args, cfg.objective.log_reward_min, lora_fp32)
    trainer.train()
    timed_calls = reward.calls[1:]  # after the warm-up step
    lengths = [n for call in timed_calls for n in (call["lengths"] or [])]
    info["trl_valid_fraction"] = (statistics.fmean(math.isfinite(s) for call in timed_calls for s in call["scores"])
                                  if timed_calls else math.nan)
    del trainer, model
    return statistics.median(timer.times[1:]), statistics.fmean(lengths) if lengths else math.nan, info


def markdown(rows: list[dict]) -> list[str]:
    return ["Our step against TRL GRPOTrainer's on the same batch (rng chat prompt, ours: TB; GRPO: beta = 0; "
            "median of the timed steps after a warm-up; TRL samples without our constraint mask):", "",
            *table(["K", "prompt tokens", "max new tokens", "ours, masked (s)", "ours, unmasked (s)", "TRL GRPO (s)",
                    "ratio ours/TRL masked", "unmasked", "mean length ours masked / unmasked / TRL"],
                   [[r["K"], r["prompt_tokens"], r["max_new_tokens"], f"{r['ours_masked_step_s']:.3f}",
                     f"{r['ours_unmasked_step_s']:.3f}", f"{r['trl_step_s']:.3f}", f"{r['ratio_masked']:.2f}x",
                     f"{r['ratio_unmasked']:.2f}x", f"{r['ours_masked_length_mean']:.2f} / "
                     f"{r['ours_unmasked_length_mean']:.2f} / {r['trl_length_mean']:.2f}"] for r in rows])]


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    from gf_odg.bench.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = list(range(len(rows)))
    for offset, key, label in ((-0.27, "ours_masked_step_s", "ours (masked)"),
                               (0.0, "ours_unmasked_step_s", "ours (unmasked)"),
                               (0.27, "trl_step_s", "TRL GRPOTrainer")):
        ax.bar([i + offset for i in x], [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(x, [f"K={r['K']}" for r in rows])
    ax.set_ylabel("seconds per training step")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "benchmark_trl_step.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
