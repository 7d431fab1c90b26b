"""The reward interface.

A reward is any callable that returns one score per completion on the log-reward scale: the target
is proportional to exp(score / beta). It is called as TRL's GRPOTrainer calls a reward function,
by keyword:

    reward(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None] | Tensor

`columns` are the prompt records' other fields (a dataset's extra columns), one value per sample.
So `def f(completions, **kwargs)`, `def f(prompts, completions, **kwargs)` and a class with such a
`__call__` run unchanged. A reward without a `completions` parameter but with two positional ones
(`def f(ps, cs, **kw)`) is called positionally, `reward(prompts, completions, **columns)`, as
GF-ODG always did. A reward without `**kwargs` receives only the arguments it names.

Conversational data (prompts given as message lists): a reward gets `prompts` as those lists and
`completions` as `[{"role": "assistant", "content": text}]`, as in TRL, unless it is one of
GF-ODG's own text rewards (module `gf_odg.*` without `conversational = True`), which get text.

Scores: `-inf` marks a hard violation (floored at `objective.log_reward_min`); NaN and `+inf` are
errors. `None` means "this reward does not apply to this sample" (TRL's multi-task convention): in
a list of rewards it drops out of the weighted sum (see `combine`). A sample to which no reward
applies scores -inf, i.e. the floor `objective.log_reward_min` (TRL instead leaves it out of the
update; a GFlowNet has no "out": it must give the sample some mass), with a warning once per reward.

Optional: `score_prefixes(prompts, prefixes, **kwargs) -> [N, T]`, the score of every prefix y_<t
terminated (prefixes[i][t] is the text of completion i's first t tokens), for modified SubTB.
Optional: `bind(model, tokenizer)`, called once after the policy loads, for rewards that score with
the base model (use `gf_odg.model.loading.reference_mode(model)` to switch the adapters off).
A reward may also expose `modes()` (the finite set of valid completions, for exact evaluation)
and `mode_of(completion)` (which mode a completion is, or None).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from gf_odg.errors import RewardError

log = logging.getLogger(__name__)

REWARD_CONTEXT = "_reward_context"  # the key under which `Task.reward_kwargs` hands `RewardContext` on
_TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")
_warned_not_applicable: set[str] = set()


@dataclass
class RewardContext:
    """What a TRL-style call needs beyond the texts: the tokenizer (for `completion_ids` when the
    caller has none) and each sample's prompt as the dataset gave it (a message list, or None)."""

    tokenizer: Any = None
    conversations: Optional[list] = None  # per sample: list of {"role", "content"} dicts, or None


def reward_name(reward: Any) -> str:
    return getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__


def call_reward(reward, prompts: Sequence[str], completions: Sequence[str], completion_ids=None,
                **kwargs) -> torch.Tensor:
    """Call a reward and check what it returned: one finite-or-(-inf) float per completion [N].
    Samples no reward applies to (None) score -inf; see the module docstring."""
    context = kwargs.pop(REWARD_CONTEXT, None)
    scores, applicable = score_reward(reward, prompts, completions, completion_ids, context, kwargs)
    if not applicable.all():
        index = int((~applicable).nonzero()[0])
        name = reward_name(reward)
        if name not in _warned_not_applicable:
            _warned_not_applicable.add(name)
            log.warning("reward %r: no reward applies to %d of %d samples (all returned None), e.g. completion "
                        "%r of prompt %r; such samples score -inf, i.e. objective.log_reward_min (shown once).",
                        name, int((~applicable).sum()), len(completions), completions[index], prompts[index])
        scores = scores.masked_fill(~applicable, -math.inf)
    return scores


def score_reward(reward, prompts: Sequence[str], completions: Sequence[str], completion_ids,
                 context: Optional[RewardContext], columns: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N], applicable [N] bool): scores are NaN exactly where the reward returned None.
    A reward that combines others (`combine`) receives the call as it came."""
    if hasattr(reward, "combine"):
        return reward.combine(prompts, completions, completion_ids, context, columns)
    name = reward_name(reward)
    try:
        raw = _invoke(reward, list(prompts), list(completions), completion_ids, context, columns)
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's reward may raise anything; say which one did
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    return _check(name, raw, completions)


def _check(name: str, raw, completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    applicable = None
    if isinstance(raw, (list, tuple)) and any(v is None for v in raw):
        applicable = torch.tensor([v is not None for v in raw], dtype=torch.bool)
        raw = [math.nan if v is None else v for v in raw]
    try:
        scores = torch.as_tensor(raw, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardError(
            f"reward {name!r} returned {type(raw).__name__}, expected a list of floats (or None) or a tensor ({err})."
        ) from None
    if scores.numel() != len(completions):
        raise RewardError(
            f"reward {name!r} returned {scores.numel()} scores for {len(completions)} completions; "
            "it must return exactly one score per completion."
        )
    if applicable is None:
        applicable = torch.ones(len(completions), dtype=torch.bool)
    bad = (torch.isnan(scores) | (scores == math.inf)) & applicable
    if bad.any():
        index = int(bad.nonzero()[0])
        raise RewardError(
            f"reward {name!r} returned {scores[index].item()} for sample {index} "
            f"(completion {completions[index]!r}); scores must be finite, -inf for a hard violation, "
            "or None where the reward does not apply."
        )
    return scores, applicable


def _invoke(reward, prompts: list, completions: list, completion_ids, context, columns: dict):
    """Call one reward the way its signature asks for: by keyword (TRL) or positionally (legacy)."""
    style, accepted, required = _call_style(reward)
    if style == "positional":
        return reward(prompts, completions, **columns)
    ours = type(reward).__module__.startswith("gf_odg.")
    if getattr(reward, "conversational", not ours) and context is not None and context.conversations is not None:
        prompts = [conv if conv is not None else text for conv, text in zip(context.conversations, prompts)]
        completions = [[{"role": "assistant", "content": text}] for text in completions]
    arguments = {"prompts": prompts, "completions": completions, **columns}
    if (accepted is None and not ours) or (accepted is not None and "completion_ids" in accepted):
        arguments["completion_ids"] = completion_ids if completion_ids is not None else _token_ids(context, completions)
    if accepted is not None:
        missing = sorted(required - set(arguments))
        if missing:
            raise RewardError(
                f"reward {reward_name(reward)!r} needs argument(s) {missing}, which neither TRL's arguments "
                f"(prompts, completions, completion_ids) nor the prompt records' columns "
                f"({sorted(columns) or 'none'}) provide; give the dataset those columns or give them defaults."
            )
        arguments = {k: v for k, v in arguments.items() if k in accepted}
    return reward(**arguments)


def _call_style(reward) -> tuple[str, Optional[set], set]:
    """("keyword" | "positional", the keyword names it accepts or None for any, the required ones)."""
    try:
        params = inspect.signature(reward).parameters.values()
    except (TypeError, ValueError):  # a builtin or an extension type: call it as TRL would
        return "keyword", None, set()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = {p.name for p in named}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "completions" not in names and len(positional) >= 2:
        return "positional", None, set()
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
    required = {p.name for p in named if p.default is p.empty}
    return "keyword", (None if var_keyword else names), required


def _token_ids(context: Optional[RewardContext], completions: list) -> Optional[list[list[int]]]:
    """The completions re-tokenised, when the caller did not pass the sampled ids (None without a tokenizer)."""
    if context is None or context.tokenizer is None:
        return None
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [context.tokenizer.encode(text, add_special_tokens=False) for text in texts]
