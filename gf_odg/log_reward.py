"""The log-reward every part of training and evaluation uses, and the reward temperature schedule.

    log R(x, y) = log_reward_min                                   if score(x, y) = -inf (a hard violation)
                                                                   or mean_t log p_ref(y_t | x, y_<t) < floor
                = max( score(x, y) / beta  +  lambda * prior(x, y),  log_reward_min )   otherwise

    prior(x, y) = log p_ref(y | x)              objective.ref_normalize = none (the default)
                = log p_ref(y | x) / |y|        objective.ref_normalize = length

|y| counts the generated tokens including EOS; the fluency floor (`objective.fluency_floor`, null: off)
compares log p_ref(y | x) / |y|, the base model's own unmasked log-probability per token, with the floor.
`target_log_reward` is the one place this is computed: the training step (TB, VarGrad, SubTB's whole
trajectories and its prefix rewards, RLOO's floor), the exact evaluation's target and replay seeding call
it, with the `TargetOptions` that `target_options(objective_cfg)` reads from the configuration.

`beta` may be annealed (linear or cosine from `beta` to `beta_end` over `beta_steps`); the floor
keeps one `-inf` (a hard violation) from blowing up a squared loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

REF_NORMALIZE = ("none", "length")


@dataclass(frozen=True)
class TargetOptions:
    """What defines log R besides the score: the objective's keys, with beta at one step."""

    beta: float = 1.0
    log_reward_min: float = -50.0
    ref_weight: float = 0.0  # lambda
    ref_masked: bool = False  # p_ref renormalised under the constraint mask (the prior term only)
    ref_normalize: str = "none"  # none | length
    fluency_floor: Optional[float] = None  # mean per-token log p_ref below it: a hard violation

    @property
    def needs_reference(self) -> bool:
        """Whether log R reads log p_ref (a reference pass, adapters off)."""
        return self.ref_weight != 0 or self.fluency_floor is not None

    @property
    def needs_lengths(self) -> bool:
        return self.fluency_floor is not None or (self.ref_weight != 0 and self.ref_normalize == "length")


def target_options(ocfg, step: int = 0, beta: Optional[float] = None) -> TargetOptions:
    """The target of `objective` config `ocfg` at training step `step` (or at an explicit `beta`)."""
    return TargetOptions(beta=beta_at(ocfg, step) if beta is None else float(beta),
                         log_reward_min=float(ocfg.log_reward_min), ref_weight=float(ocfg.ref_weight),
                         ref_masked=bool(ocfg.get("ref_masked", False)),
                         ref_normalize=str(ocfg.get("ref_normalize", "none")),
                         fluency_floor=None if ocfg.get("fluency_floor") is None else float(ocfg.fluency_floor))


def beta_at(cfg, step: int) -> float:
    if cfg.beta_schedule == "constant" or cfg.beta_end is None or cfg.beta_steps <= 0:
        return float(cfg.beta)
    progress = min(1.0, step / cfg.beta_steps)
    if cfg.beta_schedule == "linear":
        weight = progress
    else:  # cosine
        weight = 0.5 * (1 - math.cos(math.pi * progress))
    return float(cfg.beta + (cfg.beta_end - cfg.beta) * weight)


def below_fluency_floor(target: TargetOptions, log_ref: Optional[torch.Tensor],
                        lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Where the mean per-token log p_ref is below `target.fluency_floor` (bool, log_ref's shape);
    None when the floor is off."""
    if target.fluency_floor is None:
        return None
    if log_ref is None or lengths is None:
        raise ValueError("objective.fluency_floor needs log p_ref and the completion lengths.")
    per_token = log_ref / lengths.to(log_ref.dtype)
    return ~(per_token >= target.fluency_floor)  # NaN counts as below


def target_log_reward(score: torch.Tensor, target: TargetOptions, log_ref: Optional[torch.Tensor] = None,
                      lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log R of each completion (module docstring), elementwise over `score`'s shape. `log_ref`:
    log p_ref(y | x) (needed when `target.needs_reference`), `lengths`: generated tokens incl. EOS
    (needed for the floor and length normalisation)."""
    value = score / target.beta
    if target.ref_weight != 0:
        if log_ref is None:
            raise ValueError("objective.ref_weight != 0 needs log p_ref (a reference pass).")
        prior = log_ref
        if target.ref_normalize == "length":
            if lengths is None:
                raise ValueError("objective.ref_normalize=length needs the completion lengths.")
            prior = log_ref / lengths.to(log_ref.dtype)
        value = value + target.ref_weight * prior
    floor = target.log_reward_min
    value = torch.nan_to_num(value, nan=floor, neginf=floor).clamp(min=floor)
    below = below_fluency_floor(target, log_ref, lengths)
    if below is not None:
        value = torch.where(below, torch.full_like(value, floor), value)
    return value


def log_reward(score: torch.Tensor, beta: float, log_reward_min: float, ref_weight: float = 0.0,
               log_ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`target_log_reward` with beta, floor and an unnormalised prior only (no fluency floor);
    no prior term when `log_ref` is None."""
    target = TargetOptions(beta=beta, log_reward_min=log_reward_min,
                           ref_weight=ref_weight if log_ref is not None else 0.0)
    return target_log_reward(score, target, log_ref)


def log_reward_fn(cfg, step: int):
    """scores -> log R at step `step`'s beta, floored (no reference term): what replay ranks by."""
    target = TargetOptions(beta=beta_at(cfg, step), log_reward_min=float(cfg.log_reward_min))
    return lambda scores: target_log_reward(torch.as_tensor(scores, dtype=torch.float32), target)
