"""A weighted sum of reward modules, each logged on its own (TRL's `reward_funcs` + `reward_weights`).

    score(y) = Σ_{i applies to y} w_i · score_i(y)       = -inf when any term with w_i ≠ 0 scores -inf

A term that returns None for a sample does not apply to it and drops out of the sum (TRL's nan-sum);
when no counted term applies, the sample is "not applicable" and `call_reward` floors it (see `base`).
A hard violation stays one whatever its weight; a term with weight 0 is computed and logged but
does not count. After each call, `last_terms[name]` holds that term's raw scores ([N] tensor, -inf
included, and -inf where it did not apply) so that the trainer can log `rewards/<name>/mean` and
`/std` (of the finite scores).
`bind(model, tokenizer)` reaches every term that has it; `score_prefixes` exists (same formula, per
prefix) when every term with w_i ≠ 0 has one.

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
from gf_odg.rewards.base import call_reward, score_reward


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
        if all(hasattr(r, "score_prefixes") for n, r in self.rewards.items() if self.weights[n] != 0.0):
            self.score_prefixes = self._score_prefixes  # only then: the trainer tests for it (objective=subtb)

    def bind(self, model, tokenizer) -> None:
        """Hand the policy (and its tokenizer) to every term that scores with its base model."""
        for reward in self.rewards.values():
            if hasattr(reward, "bind"):
                reward.bind(model, tokenizer)

    def _score_prefixes(self, prompts: list[str], prefixes: list[list[str]], **kwargs) -> torch.Tensor:
        """[N, T]: Σ_i w_i · score_i(prefix), -inf where a counted term is -inf (or has no column t)."""
        width = max((len(row) for row in prefixes), default=0)
        total = torch.zeros(len(prefixes), width)  # [N, T]
        violated = torch.zeros(len(prefixes), width, dtype=torch.bool)  # [N, T]
        for name, reward in self.rewards.items():
            weight = self.weights[name]
            if weight == 0.0:
                continue
            scores = reward.score_prefixes(prompts, prefixes, **kwargs)  # no kwargs: the 2-argument contract
            scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
            if scores.dim() != 2 or scores.shape[0] != len(prefixes) or scores.shape[1] > width:
                raise RewardError(f"term {name!r} of the weighted sum: score_prefixes returned shape "
                                  f"{tuple(scores.shape)} for {len(prefixes)} rows of at most {width} prefixes.")
            if torch.isnan(scores).any() or (scores == math.inf).any():
                raise RewardError(f"term {name!r} of the weighted sum: score_prefixes returned NaN or +inf.")
            scores = torch.cat([scores, torch.full((len(prefixes), width - scores.shape[1]), -math.inf)], dim=1)
            hard = torch.isneginf(scores)
            violated |= hard
            total += weight * scores.masked_fill(hard, 0.0)
        return total.masked_fill(violated, -math.inf)

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

    def set_weights(self, weights, key: str = "task.reward_weights") -> None:
        """Replace the weights in term order (TRL's `reward_weights`: one per reward)."""
        weights = [float(w) for w in weights]
        if len(weights) != len(self.rewards):
            raise ConfigError(f"{key} has {len(weights)} weights for {len(self.rewards)} rewards "
                              f"({', '.join(self.rewards)}); give one weight per reward.")
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"{key}={weights} must be finite numbers.")
        self.weights = dict(zip(self.rewards, weights))

    def combine(self, prompts, completions, completion_ids, context, columns) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [N], applicable [N]): what `base.score_reward` asks of a reward made of others."""
        total = torch.zeros(len(completions))  # [N]
        violated = torch.zeros(len(completions), dtype=torch.bool)  # [N]
        counted_applies = torch.zeros(len(completions), dtype=torch.bool)  # [N]
        self.last_terms = {}
        for name, reward in self.rewards.items():
            try:
                scores, applies = score_reward(reward, prompts, completions, completion_ids, context, columns)  # [N]
            except RewardError as err:
                raise RewardError(f"term {name!r} of the weighted sum: {err}") from err
            self.last_terms[name] = scores.masked_fill(~applies, -math.inf)  # logs average the finite ones
            weight = self.weights[name]
            if weight != 0.0:
                hard = applies & torch.isneginf(scores)
                violated |= hard
                counted_applies |= applies
                total += weight * scores.masked_fill(hard | ~applies, 0.0)  # None: out of the sum (nan-sum)
        if all(w == 0.0 for w in self.weights.values()):
            counted_applies[:] = True  # nothing counts: every sample scores 0
        return total.masked_fill(violated, -math.inf), counted_applies

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return call_reward(self, prompts, completions, **kwargs).tolist()
