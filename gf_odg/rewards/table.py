"""A reward given as an explicit table, for small enumerable problems where the exact target is known.

    score(x, y) = tables[x][y]   (or table[y] when one table serves every prompt); -inf if absent.

Prefixes are scored by the same lookup (a prefix terminated is the completion of that prefix), so
modified SubTB can train on it, and `modes()` lists every prompt's completions for the mode figures.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from gf_odg.errors import ConfigError


class TableReward:
    name = "table"

    def __init__(self, table: Optional[dict] = None, tables: Optional[dict] = None):
        if (table is None) == (tables is None):
            raise ConfigError("task.reward: give exactly one of `table` (all prompts) or `tables` (per prompt).")
        self.table = {str(k): float(v) for k, v in (table or {}).items()}
        self.tables = {str(p): {str(k): float(v) for k, v in t.items()} for p, t in (tables or {}).items()}
        # every completion some prompt's table lists, in the order the tables list them
        self.known = dict.fromkeys(self.table) if self.table else dict.fromkeys(
            key for table in self.tables.values() for key in table)

    def _lookup(self, prompt: str, completion: str) -> float:
        table = self.tables.get(prompt, {}) if self.tables else self.table
        return table.get(completion, -math.inf)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return [self._lookup(p, c) for p, c in zip(prompts, completions)]

    def score_prefixes(self, prompts, prefixes: list[list[str]], **kwargs) -> torch.Tensor:
        width = max(len(p) for p in prefixes)
        out = torch.full((len(prefixes), width), -math.inf)
        for i, (prompt, row) in enumerate(zip(prompts, prefixes)):
            for t, text in enumerate(row):
                out[i, t] = self._lookup(prompt, text)
        return out

    def modes(self) -> list[str]:
        """Every prompt's completions (a prompt's target gives the others no mass: their score is -inf)."""
        return list(self.known)

    def mode_of(self, completion: str) -> Optional[str]:
        return completion if completion in self.known else None
