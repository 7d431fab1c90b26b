"""The reward interface.

A reward is any callable

    reward(prompts: list[str], completions: list[str], **kwargs) -> list[float] | Tensor

returning one score per completion on the log-reward scale: the target is proportional to
exp(score / beta). A TRL reward function therefore drops in unchanged. `-inf` marks a hard
violation (floored at `objective.log_reward_min`); NaN and `+inf` are errors.

Optional: `score_prefixes(prompts, prefixes, **kwargs) -> [N, T]`, the score of every prefix y_<t
terminated (prefixes[i][t] is the text of completion i's first t tokens), for modified SubTB.
Optional: `bind(model, tokenizer)`, called once after the policy loads, for rewards that score with
the base model (use `gf_odg.model.loading.reference_mode(model)` to switch the adapters off). A reward may also expose `modes()` (the finite set of valid
completions, for exact evaluation) and `mode_of(completion)` (which mode a completion is, or None).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from gf_odg.errors import RewardError


def reward_name(reward: Any) -> str:
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


def call_reward(reward, prompts: Sequence[str], completions: Sequence[str], **kwargs) -> torch.Tensor:
    """Call a reward and check what it returned: one finite-or-(-inf) float per completion."""
    name = reward_name(reward)
    try:
        scores = reward(list(prompts), list(completions), **kwargs)
    except Exception as err:  # noqa: BLE001 - a user's reward may raise anything; say which one did
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardError(
            f"reward {name!r} returned {type(scores).__name__}, expected a list of floats or a tensor ({err})."
        ) from None
    if scores.numel() != len(completions):
        raise RewardError(
            f"reward {name!r} returned {scores.numel()} scores for {len(completions)} completions; "
            "it must return exactly one score per completion."
        )
    bad = torch.isnan(scores) | (scores == math.inf)
    if bad.any():
        index = int(bad.nonzero()[0])
        raise RewardError(
            f"reward {name!r} returned {scores[index].item()} for sample {index} "
            f"(completion {completions[index]!r}); scores must be finite, or -inf for a hard violation."
        )
    return scores
