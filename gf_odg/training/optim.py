"""The optimiser: parameter groups (LoRA, log Z), AdamW or paged 8-bit AdamW, the LR schedule, and one
update (average over processes, clip, step, schedule)."""

from __future__ import annotations

import math

import torch

from gf_odg.errors import ConfigError


def param_groups(model, log_z, tcfg) -> list[dict]:
    """The LoRA group at `trainer.lr`; log Z's group(s) at `trainer.log_z_lr` (and a conditioned
    head's MLP at `trainer.log_z_head_lr`)."""
    lora_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": lora_params, "lr": tcfg.lr, "weight_decay": tcfg.weight_decay}]
    if hasattr(log_z, "param_groups"):
        groups += log_z.param_groups(tcfg.log_z_lr, tcfg.log_z_head_lr)
    elif log_z is not None:
        groups.append({"params": list(log_z.parameters()), "lr": tcfg.log_z_lr, "weight_decay": 0.0})
    return groups


def build_optimizer(name: str, groups: list, device: torch.device):
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("trainer.optimizer=paged_adamw_8bit needs a CUDA device; use adamw on the CPU.")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups)
    raise ConfigError(f"trainer.optimizer={name!r} is not one of adamw, paged_adamw_8bit.")


def lr_factor(tcfg):
    """Linear warm-up over `warmup_steps`, then constant, or a linear/cosine decay to
    `min_lr_ratio` at `max_steps` (decay steadies the final policy: the sampler that is evaluated)."""
    warmup, total, floor = max(0, tcfg.warmup_steps), max(1, tcfg.max_steps), tcfg.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if tcfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1 - progress if tcfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * shape

    return factor


def build_scheduler(optimizer, tcfg):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(tcfg))


def apply_update(optimizer, scheduler, dist, grad_clip: float) -> float:
    """Average the gradients over processes, clip, step: the gradient norm (NaN or inf: nothing moved)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dist.average_gradients(params)  # data parallel: the mean gradient over processes
    grad_norm = dist.clip_grad_norm(params, grad_clip)
    if math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    return grad_norm
