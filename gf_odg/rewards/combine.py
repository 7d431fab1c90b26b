"""A weighted sum of reward modules, each logged on its own.

    score(y) = Σ_i w_i · score_i(y)       = -inf when any term with w_i ≠ 0 scores -inf

A hard violation stays one whatever its weight; a term with weight 0 is computed and logged but
does not count. After each call, `last_terms[name]` holds that term's raw scores ([N] tensor, -inf
included) so that the trainer can log `rewards/<name>/mean` and `rewards/<name>/std`.

    reward:
      _target_: gf_odg.rewards.combine.WeightedSum
      terms:
        keywords: {weight: 1.0, reward: {_target_: gf_odg.rewards.text.KeywordsReward}}
        length:   {weight: 0.1, reward: {_target_: gf_odg.rewards.text.LengthReward, target_words: 12}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException

from gf_odg.errors import ConfigError, GFODGError, RewardError
from gf_odg.rewards.base import call_reward


class WeightedSum:
    name = "weighted_sum"

    def __init__(self, terms: Mapping[str, Mapping[str, Any]]):
        if not isinstance(terms, Mapping) or not terms:
            raise ConfigError("task.reward.terms must map each term's name to {weight: ..., reward: ...}.")
        self.weights: dict[str, float] = {}
        self.rewards: dict[str, Any] = {}
        for name, term in terms.items():
            key = f"task.reward.terms.{name}"
            if not isinstance(term, Mapping) or "reward" not in term or set(term) - {"weight", "reward"}:
                raise ConfigError(f"{key} must be {{weight: <float>, reward: <reward config>}}; got {term!r}.")
            weight = float(term.get("weight", 1.0))
            if not math.isfinite(weight):
                raise ConfigError(f"{key}.weight={weight} must be a finite number.")
            self.weights[name], self.rewards[name] = weight, self._build(key, term["reward"])
        self.last_terms: dict[str, torch.Tensor] = {}

    @staticmethod
    def _build(key: str, reward: Any):
        if isinstance(reward, Mapping):
            if "_target_" not in reward:
                raise ConfigError(f"{key}.reward needs a _target_ naming the reward class.")
            try:
                reward = hydra.utils.instantiate(reward)
            except InstantiationException as err:
                if isinstance(err.__cause__, GFODGError):
                    raise ConfigError(f"{key}.reward: {err.__cause__}") from None
                raise ConfigError(f"{key}.reward could not be built: {err}") from err
        if not callable(reward):
            raise ConfigError(f"{key}.reward is a {type(reward).__name__}; it must be a reward (a callable).")
        return reward

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        total = torch.zeros(len(completions))  # [N]
        violated = torch.zeros(len(completions), dtype=torch.bool)  # [N]
        self.last_terms = {}
        for name, reward in self.rewards.items():
            try:
                scores = call_reward(reward, prompts, completions, **kwargs)  # [N]
            except RewardError as err:
                raise RewardError(f"term {name!r} of the weighted sum: {err}") from err
            self.last_terms[name] = scores
            weight = self.weights[name]
            if weight != 0.0:
                hard = torch.isneginf(scores)
                violated |= hard
                total += weight * scores.masked_fill(hard, 0.0)
        return total.masked_fill(violated, -math.inf).tolist()
