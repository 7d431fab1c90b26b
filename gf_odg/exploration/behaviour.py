"""The behaviour policy's schedule: tempering, epsilon-uniform mixing, and the replay share.

Per step (or per sample, `temper_per=sample`): with probability `p_temper` the sampling temperature
is drawn from U[temper_lo, temper_hi], else it is 1. Epsilon and the replay fraction follow linear
schedules from their start value to `*_end` over `*_steps` steps (constant when `*_end` is null).
"""

from __future__ import annotations

from typing import Optional

import torch


def linear(start: float, end, steps: int, step: int) -> float:
    if end is None or steps <= 0:
        return float(start)
    return float(start + (end - start) * min(1.0, step / steps))


def behaviour_temperatures(cfg, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n] sampling temperatures for one step's samples."""
    draws = 1 if cfg.temper_per == "batch" else n
    temper = torch.rand(draws, generator=generator) < cfg.p_temper
    values = cfg.temper_lo + (cfg.temper_hi - cfg.temper_lo) * torch.rand(draws, generator=generator)
    temps = torch.where(temper, values, torch.ones(draws))
    return temps.expand(n).clone() if draws == 1 else temps


def epsilon_at(cfg, step: int) -> float:
    return linear(cfg.epsilon, cfg.epsilon_end, cfg.epsilon_steps, step)


def replay_fraction_at(cfg, step: int) -> float:
    replay = cfg.replay
    if not replay.enabled:
        return 0.0
    return linear(replay.fraction, replay.fraction_end, replay.fraction_steps, step)


def epsilon_warning(cfg, constraints, vocab_size: int) -> Optional[str]:
    """The start-up warning for epsilon-uniform mixing with no allowed-token set, or None.

    Without an allowed set, epsilon mixes over the whole vocabulary and mostly draws junk (measured
    on experiment=sparse_rng: it did not help)."""
    eps = max(float(cfg.epsilon), float(cfg.epsilon_end or 0.0))
    if eps <= 0 or constraints.allowed is not None:
        return None
    return (f"exploration.epsilon={cfg.epsilon} with no allowed-token set: epsilon-uniform mixes over all "
            f"{vocab_size} tokens, which mostly draws junk (measured on experiment=sparse_rng: it did not "
            "help). Consider exploration.epsilon=0, or a task.constraints.allowed set.")
