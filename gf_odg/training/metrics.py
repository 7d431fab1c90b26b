"""The metrics of one training step (W&B + metrics.jsonl): loss, log P_F, log R, the residual's
spread, rewards, completions, exploration, replay, discovery."""

from __future__ import annotations

import math

import numpy as np
import torch

from gf_odg.distributed import Dist


def new_valid_texts(batch, dist: Dist) -> list[str]:
    """The distinct valid completions (finite score) sampled fresh in this step by any process, stripped."""
    traj, score, fresh = batch.traj, batch.score, ~batch.from_replay
    new = [t.strip() for t, s, f in zip(traj.texts, score.tolist(), fresh.tolist()) if f and math.isfinite(s)]
    return [text for part in dist.gather(new) for text in part]


def step_metrics(batch, result, grad_norms: dict, *, lr: float, max_new_tokens: int, distinct_valid: int,
                 nonfinite_total: int, reward=None, replay=None, log_reward_fn=None) -> dict:
    """batch: a StepBatch; result: the step's Loss (gf_odg/training/step.py); grad_norms: "lora" and
    (with a log Z) "log_z" gradient norms before clipping."""
    traj, score = batch.traj, batch.score
    log_pf, log_r, log_z, diag = result.log_pf, result.log_reward, result.log_z, result.diagnostics
    finite = result.finite and all(math.isfinite(n) for n in grad_norms.values())
    valid = torch.isfinite(score)
    group = traj.group.to(log_pf.device)
    ratio = (log_r - log_pf).detach()
    var_per_prompt = []
    for g in group.unique():
        values = ratio[group == g]
        if values.numel() > 1:
            var_per_prompt.append(float(values.var()))
    residual = diag["residual"].float()
    fresh = ~batch.from_replay
    m = {
        "discovery/distinct_valid": distinct_valid,
        "loss": float(result.loss.detach()),
        "log_pf/mean": float(log_pf.detach().mean()),
        "log_reward/mean": float(log_r.mean()),
        "residual/mean": float(residual.mean()),
        "residual/std": float(residual.std()) if residual.numel() > 1 else 0.0,
        "var_log_ratio": float(np.mean(var_per_prompt)) if var_per_prompt else float("nan"),
        "beta": result.beta,
        "reward/mean": float(score[valid].mean()) if valid.any() else float("nan"),
        "reward/valid_fraction": float(valid.float().mean()),
        "completion/length_mean": float(traj.lengths.float().mean()),
        "completion/eos_fraction": float((traj.lengths < max_new_tokens).float().mean()),
        "completion/unique_fraction": len(set(traj.texts)) / max(1, len(traj.texts)),
        "grad_norm": grad_norms["lora"],  # LoRA's
        "lr": lr,
        "nonfinite_steps": nonfinite_total,
        "skipped_step": 0.0 if finite else 1.0,
        "exploration/temperature_mean": batch.temperature_mean,
        "exploration/epsilon": batch.epsilon,
        "exploration/replay_fraction": float(batch.from_replay.float().mean()),
        "exploration/fresh_unique_fraction":
            len({t for t, f in zip(traj.texts, fresh) if f}) / max(1, int(fresh.sum())),
    }
    if result.below_floor is not None:  # objective.fluency_floor
        m["reward/below_fluency_floor"] = float(result.below_floor.float().mean())
    if result.log_ref_token_mean is not None:  # the prior or the floor reads log p_ref
        m["log_ref/token_mean"] = result.log_ref_token_mean
    if "log_z" in grad_norms:
        m["grad_norm/log_z"] = grad_norms["log_z"]
    if log_z is not None:
        m["log_z"] = float(log_z.detach().mean())
    elif "log_z_estimate" in diag:
        m["log_z"] = float(diag["log_z_estimate"].mean())
    for name, values in (getattr(reward, "last_terms", None) or {}).items():
        values = torch.as_tensor(values, dtype=torch.float32)
        fin = values[torch.isfinite(values)]
        m[f"rewards/{name}/mean"] = float(fin.mean()) if fin.numel() else float("nan")
        m[f"rewards/{name}/std"] = float(fin.std()) if fin.numel() > 1 else 0.0
    if replay is not None:
        stats = replay.stats(log_reward_fn)
        m["replay/size"] = stats.get("size", len(replay))
        for key in ("mean_log_reward", "max_log_reward"):
            if key in stats:
                m[f"replay/{key}"] = stats[key]
    return m


def sample_rows(batch, step: int) -> list[dict]:
    """The batch as rows of the samples table."""
    traj = batch.traj
    return [{"step": step, "prompt": batch.prompts.texts[int(g)], "completion": t, "score": float(s),
             "replayed": bool(r)} for g, t, s, r in zip(traj.group, traj.texts, batch.score, batch.from_replay)]


def progress_postfix(metrics: dict) -> dict:
    shown = {"loss": f"{metrics['loss']:.3f}", "reward": f"{metrics['reward/mean']:.2f}",
             "valid": f"{metrics['reward/valid_fraction']:.2f}"}
    if "log_z" in metrics:
        shown["log_z"] = f"{metrics['log_z']:.2f}"
    return shown
