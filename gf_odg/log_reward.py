"""The log-reward shared by every objective, and the reward temperature schedule.

    log R(x, y) = max( score(x, y) / beta  +  lambda * log p_ref(y | x),  log_reward_min )

`beta` may be annealed (linear or cosine from `beta` to `beta_end` over `beta_steps`); the floor
keeps one `-inf` (a hard violation) from blowing up a squared loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def beta_at(cfg, step: int) -> float:
    if cfg.beta_schedule == "constant" or cfg.beta_end is None or cfg.beta_steps <= 0:
        return float(cfg.beta)
    progress = min(1.0, step / cfg.beta_steps)
    if cfg.beta_schedule == "linear":
        weight = progress
    else:  # cosine
        weight = 0.5 * (1 - math.cos(math.pi * progress))
    return float(cfg.beta + (cfg.beta_end - cfg.beta) * weight)


def log_reward(score: torch.Tensor, beta: float, log_reward_min: float, ref_weight: float = 0.0,
               log_ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    value = score / beta
    if ref_weight and log_ref is not None:
        value = value + ref_weight * log_ref
    value = torch.nan_to_num(value, nan=log_reward_min, neginf=log_reward_min)
    return value.clamp(min=log_reward_min)


def log_reward_fn(cfg, step: int):
    """scores -> log R at step `step`'s beta, floored (no reference term): what replay ranks by."""
    beta = beta_at(cfg, step)
    floor = cfg.log_reward_min
    return lambda scores: log_reward(torch.as_tensor(scores, dtype=torch.float32), beta, floor)
