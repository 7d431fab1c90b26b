"""A reward written as a TRL user would write one, for `rng`'s prompt: no `modes()`, no class.

    uv run python train.py task.reward=null task.reward=examples.integers.uniform_0_100

The exact evaluation enumerates the 1,110 digit strings the mask allows and scores each with it
(docs/results/first_run.md, "The same with a reward the user writes").
"""

import math


def uniform_0_100(prompts, completions, **kwargs):
    """0 for a canonical integer in 0..100, -inf for anything else."""
    out = []
    for c in completions:
        t = c.strip()
        ok = t.isascii() and t.isdigit() and (t == "0" or not t.startswith("0")) and int(t) <= 100
        out.append(0.0 if ok else -math.inf)
    return out
