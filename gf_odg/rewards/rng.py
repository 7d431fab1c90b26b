"""The `rng` task's reward (Hu et al. 2024, sec. 2): sample an integer in [low, high].

    score(y) = log p_target(int(y))   if y is a canonical integer in [low, high] (no sign, no
                                       leading zeros, nothing else)
             = -inf                    otherwise (floored by the objective)

With the default uniform target every valid integer scores log(1/(high-low+1)); any constant would
give the same target, this one makes log Z = 0 the optimum at beta = 1. A non-uniform target is a
probability table over low..high (a list, or a dict {integer: probability}).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from gf_odg.errors import ConfigError


class RandomIntegerReward:
    name = "rng"

    def __init__(self, low: int = 0, high: int = 100, target: Optional[Any] = None):
        if high < low:
            raise ConfigError(f"task.reward: high={high} must be >= low={low}.")
        self.low, self.high = int(low), int(high)
        count = self.high - self.low + 1
        if target is None:
            probs = [1.0 / count] * count
        else:
            probs = self._table(target, count)
        self.probs = probs

    def _table(self, target, count: int) -> list[float]:
        if hasattr(target, "items"):
            table = {int(k): float(v) for k, v in target.items()}
            missing = [n for n in range(self.low, self.high + 1) if n not in table]
            extra = [n for n in table if not self.low <= n <= self.high]
            if missing or extra:
                raise ConfigError(
                    f"task.reward.target must give a probability for every integer {self.low}..{self.high}"
                    f" (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, outside {extra[:5]})."
                )
            values = [table[n] for n in range(self.low, self.high + 1)]
        else:
            values = [float(v) for v in target]
            if len(values) != count:
                raise ConfigError(
                    f"task.reward.target has {len(values)} entries; it must have {count} "
                    f"(one per integer {self.low}..{self.high})."
                )
        if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
            raise ConfigError("task.reward.target must hold finite, non-negative probabilities with a positive sum.")
        total = sum(values)
        return [v / total for v in values]

    def mode_of(self, completion: str) -> Optional[int]:
        text = completion.strip()
        if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
            return None
        value = int(text)
        return value if self.low <= value <= self.high else None

    def modes(self) -> list[str]:
        return [str(n) for n in range(self.low, self.high + 1)]

    def target_probs(self) -> dict[str, float]:
        return {str(n): p for n, p in zip(range(self.low, self.high + 1), self.probs)}

    def _score(self, completion: str) -> float:
        value = self.mode_of(completion)
        if value is None:
            return -math.inf
        p = self.probs[value - self.low]
        return math.log(p) if p > 0 else -math.inf

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [self._score(c) for c in completions]

    def score_prefixes(self, prompts, prefixes: list[list[str]], **kwargs) -> torch.Tensor:
        """prefixes[i][t] = the text of completion i's first t tokens; -> [N, T] scores."""
        width = max(len(p) for p in prefixes)
        out = torch.full((len(prefixes), width), -math.inf)
        for i, row in enumerate(prefixes):
            for t, text in enumerate(row):
                out[i, t] = self._score(text)
        return out
