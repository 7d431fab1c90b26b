"""The optimiser: parameter groups (LoRA, log Z), AdamW or paged 8-bit AdamW, the LR schedule, and one
update (average over processes, clip, step, schedule).

The LoRA and log Z gradients are clipped separately, each to `trainer.grad_clip`: log Z's early
gradients (~100, while log Z travels to log of the partition function) would otherwise shrink the
LoRA step by as much. The warm-up and decay apply to the LoRA learning rate only; log Z keeps
`trainer.log_z_lr` (a decayed log Z rate would leave it short of the partition function it tracks).
"""

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
    for i, group in enumerate(groups):
        group["part"] = LORA if i == 0 else LOG_Z
    return groups


LORA, LOG_Z = "lora", "log_z"


def part_params(optimizer, part: str) -> list:
    return [p for g in optimizer.param_groups if g.get("part", LORA) == part for p in g["params"]]


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
    """`lr_factor` on the LoRA group; log Z's groups keep their learning rate."""
    factor = lr_factor(tcfg)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor if g.get("part", LORA) == LORA else _constant for g in optimizer.param_groups])


def _constant(step: int) -> float:
    return 1.0


def apply_update(optimizer, scheduler, dist, grad_clip: float) -> dict[str, float]:
    """Average the gradients over processes, clip LoRA and log Z each to `grad_clip`, step. Returns
    each part's gradient norm before clipping; when one is NaN or inf, nothing moved."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # processes: a parameter without a gradient on every process keeps none (the averaging would
    # give it zeros, and AdamW moves a parameter with a zero gradient: momentum, weight decay)
    had = [any(flags) for flags in zip(*dist.gather([p.grad is not None for p in params]))]
    dist.average_gradients(params)  # processes: the mean gradient
    for p, had_grad in zip(params, had):
        if not had_grad:
            p.grad = None
    norms = {part: dist.clip_grad_norm(ps, grad_clip)
             for part in (LORA, LOG_Z) if (ps := part_params(optimizer, part))}
    if all(math.isfinite(n) for n in norms.values()):
        optimizer.step()
        scheduler.step()
    return norms
