"""Rewards scored by a language model: the infilling / next-sentence likelihood of Hu et al. (2024),
and a fluency guard against reward hacking.

    LMLikelihoodReward   score(x, y) = scale * log p_LM(z | c(x, y))        (divided by |z| if per_token)
    FluencyGuard         score(x, y) = mean_t log p_LM(y_t | c(x), y_<t)    (or the min over t)
                                     = -inf (or + penalty) when that is below min_token_logprob

`c(x, y)` is `template` filled with {prompt}, {completion} and any per-prompt field (an extra
column of the prompt records, e.g. {beginning}); `z` is the continuation, fixed or per prompt. p_LM
is the policy's base model with its adapters off: the trainer calls `bind(model, tokenizer)` once the
policy loads, and scoring runs inside `reference_mode` (no second copy of the weights). With
`model=<folder>` another local transformers checkpoint is loaded once, frozen, on the policy's
device. Scoring is batched, without gradients.

Tokenisation. The template text before {completion} is the context, shared by every completion of a
prompt: it is tokenised alone (the tokenizer's own special tokens, e.g. a BOS, included; a start token
if it is empty), with its trailing whitespace moved into the next piece, as BPE tokenisers attach a
space to the word after it. It runs once per distinct context in the shared-prompt prefill of
`gf_odg.generation.scoring.score_completions`, the rest on top of its KV cache. The rest (completion, the
template's text after it, continuation) is tokenised as one text, so the tokens at the join are the
ones the LM would read in running text; the continuation's tokens are those after the longest common
prefix with the tokenisation of the rest without it. A token straddling that join (rare: a completion
ending mid-word) belongs to the continuation and is scored with it. FluencyGuard does the same with
the completion as the piece after the moved whitespace.

Cost: one forward over (completion + continuation) tokens per distinct sample, the context once per
distinct prompt in each batch of `batch_size` rows. `score_prefixes` scores all N*T (prefix +
continuation) sequences in that one mechanism, distinct ones once: O(N * T * (T + |z|)) tokens, about
T/2 times the cost of scoring the full completions.
"""

from __future__ import annotations

import contextlib
import math
import string
from pathlib import Path
from typing import Optional, Sequence

import torch

from gf_odg.errors import ConfigError, RewardError
from gf_odg.model.loading import reference_mode
from gf_odg.data.prompts import PromptBatch
from gf_odg.generation.scoring import score_completions


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _LanguageModelReward:
    """What both rewards share: the template, the language model, and batched token log-probabilities."""

    def __init__(self, template: str, model: Optional[str], batch_size: int):
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        if names.count("completion") != 1 or any(not n.isidentifier() for n in names):
            raise ConfigError(
                f"task.reward.template={template!r} must hold {{completion}} exactly once, plus any of "
                "{prompt} and per-prompt record fields by name (write a literal brace as {{ or }})."
            )
        if batch_size < 1:
            raise ConfigError(f"task.reward.batch_size={batch_size} must be >= 1.")
        cut = template.index("{completion}")
        self.head, self.tail = template[:cut], template[cut + len("{completion}"):]
        self.fields = sorted(set(names) - {"prompt", "completion"})
        self.batch_size = int(batch_size)
        self.model_path = None
        if model is not None:
            self.model_path = Path(model).expanduser()
            if not (self.model_path / "config.json").is_file():
                raise ConfigError(
                    f"task.reward.model={model!r}: no transformers checkpoint (config.json) at "
                    f"{self.model_path.resolve()}. Give a local model folder, or leave it null to score "
                    "with the policy's base model."
                )
        self._lm = None  # (model, tokenizer, uses_reference_mode)
        self._device = torch.device("cpu")

    def bind(self, model, tokenizer) -> None:
        """Called once by the trainer after the policy loads: score with its base model (adapters off)."""
        self._device = next(model.parameters()).device
        if self.model_path is None:
            self._lm = (model, tokenizer, hasattr(model, "disable_adapter"))

    def _language_model(self):
        if self._lm is None:
            if self.model_path is None:
                raise RewardError(
                    f"{type(self).__name__} scores with the policy's base model, which it gets through "
                    "bind(model, tokenizer) (the trainer calls it); call bind first, or set "
                    "task.reward.model=<local model folder>."
                )
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            # the reward defines the target: fp32 on any CPU (a policy in bf16 on a CPU that has it
            # still meets an fp32 reward), bf16 on CUDA
            dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            model.to(self._device).eval().requires_grad_(False)
            self._lm = (model, tokenizer, False)
        return self._lm

    def _texts(self, prompt: str, i: int, kwargs: dict) -> tuple[str, str]:
        """The template's text before and after {completion}, for sample i."""
        missing = [f for f in self.fields if f not in kwargs]
        if missing:
            raise KeyError(
                f"task.reward.template uses {missing}, which the batch does not carry (record fields passed: "
                f"{sorted(kwargs) or 'none'}); give every prompt record these fields (whoever calls the reward "
                "passes the records' fields as keyword arguments, as the trainer does)."
            )
        values = {f: str(kwargs[f][i]) for f in self.fields}
        return self.head.format(prompt=prompt, **values), self.tail.format(prompt=prompt, **values)

    def _encode(self, tokenizer, context: str, before: str, after: str) -> tuple[tuple[int, ...], list[int], int]:
        """(context ids, ids of `before + after`, index of the first token of `after`), with the
        context's trailing whitespace moved in front of `before` (see the module docstring)."""
        stripped = context.rstrip()
        before = context[len(stripped):] + before
        context_ids = tokenizer.encode(stripped, add_special_tokens=True) if stripped else []
        if not context_ids:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            context_ids = [start]
        ids = tokenizer.encode(before + after, add_special_tokens=False)
        start = _common_prefix(ids, tokenizer.encode(before, add_special_tokens=False))
        return tuple(context_ids), ids, start

    @torch.no_grad()
    def _logprobs(self, items: list[tuple[tuple[int, ...], list[int]]]) -> list[torch.Tensor]:
        """log p_LM of every token of each (context ids, ids) pair: one [len(ids)] tensor per distinct pair.

        Under FSDP (the policy's layers sharded, `gf_odg_max_int` set on it by `Dist.shard`) every forward
        call gathers each layer from all processes, so every process makes as many as the busiest one: a
        process with fewer chunks of distinct items scores stand-in chunks, and every chunk is at least two
        tokens wide, so that `score_completions` runs its prompt pass and its completion pass everywhere."""
        model, tokenizer, adapters = self._language_model()
        device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        order = sorted(range(len(items)), key=lambda i: (items[i][0], len(items[i][1])))
        out: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
        n_chunks = -(-len(order) // self.batch_size)
        lockstep = getattr(model, "gf_odg_max_int", None)  # only on a sharded policy
        if lockstep is not None:
            n_chunks = lockstep(n_chunks)
        with reference_mode(model) if adapters else contextlib.nullcontext():
            for first in range(0, n_chunks * self.batch_size, self.batch_size):
                chunk = order[first: first + self.batch_size]
                pairs = [items[i] for i in chunk] or [((pad,), [eos])]  # a stand-in, its result dropped
                token = self._score_chunk(model, pairs, eos, pad, device, min_width=1 if lockstep is None else 2)
                for j, i in enumerate(chunk):
                    out[i] = token[j, : len(items[i][1])]
        return out

    @staticmethod
    def _score_chunk(model, pairs: list, eos: int, pad: int, device, min_width: int) -> torch.Tensor:
        """log p_LM of each pair's tokens, one row per pair: [n, T] on the CPU, 0 past each length."""
        contexts = list(dict.fromkeys(c for c, _ in pairs))
        row = {c: j for j, c in enumerate(contexts)}
        prompts = PromptBatch.build([list(c) for c in contexts], [""] * len(contexts), pad, device)
        group = torch.tensor([row[c] for c, _ in pairs], device=device)  # [n]
        lengths = torch.tensor([len(ids) for _, ids in pairs], device=device)  # [n]
        tokens = torch.full((len(pairs), max(min_width, int(lengths.max()))), eos, dtype=torch.long)  # [n, T]
        for j, (_, ids) in enumerate(pairs):
            tokens[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return score_completions(model, prompts, group, tokens.to(device), lengths, None, eos).token.float().cpu()

    def _score_all(self, keys: list, items: dict) -> dict:
        """Score each distinct key's (context ids, ids) once: {key: log-probs}."""
        distinct = list(dict.fromkeys(keys))
        return dict(zip(distinct, self._logprobs([items[k] for k in distinct])))


class LMLikelihoodReward(_LanguageModelReward):
    """score(x, y) = scale * log p_LM(z | c(x, y)), or scale * log p_LM(z | c(x, y)) / |z| with per_token.

    The continuation z is `continuation`, or per prompt the record field `continuation_key` (a
    jsonl prompts file with {"prompt": ..., "continuation": " The end."}). With the default template
    the context is the prompt text followed directly by the completion; a template such as
    "{beginning} {completion}" reads another record field instead of the prompt (an instruction to
    the policy is rarely good context for the LM). Also scores every prefix (`score_prefixes`), for
    modified SubTB.
    """

    name = "lm_likelihood"

    def __init__(self, continuation: Optional[str] = None, continuation_key: str = "continuation",
                 scale: float = 1.0, per_token: bool = False, model: Optional[str] = None,
                 template: str = "{prompt}{completion}", batch_size: int = 64):
        super().__init__(template, model, batch_size)
        if continuation is not None and not str(continuation).strip():
            raise ConfigError("task.reward.continuation is empty; give the text to score, or leave it null "
                              "to read it per prompt from the records' `continuation_key` field.")
        if not math.isfinite(scale):
            raise ConfigError(f"task.reward.scale={scale} must be a finite number.")
        self.continuation, self.continuation_key = continuation, continuation_key
        self.scale, self.per_token = float(scale), bool(per_token)

    def _continuation(self, i: int, kwargs: dict) -> str:
        if self.continuation is not None:
            return self.continuation
        if self.continuation_key not in kwargs:
            raise KeyError(
                f"no {self.continuation_key!r} in the batch (record fields passed: {sorted(kwargs) or 'none'}); "
                f"give every prompt record a {self.continuation_key!r} field, set task.reward.continuation_key "
                "to the field that holds the text to score, or fix it with task.reward.continuation."
            )
        text = str(kwargs[self.continuation_key][i])
        if not text.strip():
            raise ValueError(f"sample {i} has an empty {self.continuation_key!r}")
        return text

    def _item(self, tokenizer, prompt: str, completion: str, i: int, kwargs: dict):
        head, tail = self._texts(prompt, i, kwargs)
        context, ids, start = self._encode(tokenizer, head, completion + tail, self._continuation(i, kwargs))
        return (context, tuple(ids), start), (context, ids)

    def _value(self, logprobs: torch.Tensor, start: int) -> float:
        z = logprobs[start:]  # the continuation's tokens
        return self.scale * float(z.sum()) / (max(1, z.numel()) if self.per_token else 1)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        _, tokenizer, _ = self._language_model()
        keys, items = [], {}
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            key, item = self._item(tokenizer, prompt, completion, i, kwargs)
            keys.append(key)
            items[key] = item
        scored = self._score_all(keys, items)
        return [self._value(scored[key], key[2]) for key in keys]

    def score_prefixes(self, prompts: list[str], prefixes: list[list[str]], **kwargs) -> torch.Tensor:
        """prefixes[i][t] = the text of completion i's first t tokens -> [N, T] scores, -inf past a row's end.
        Per-prompt continuations need the batch's record fields as kwargs, as in `__call__`."""
        _, tokenizer, _ = self._language_model()
        rows, items = [], {}
        for i, (prompt, row) in enumerate(zip(prompts, prefixes)):
            keys = []
            for text in row:
                key, item = self._item(tokenizer, prompt, text, i, kwargs)
                keys.append(key)
                items[key] = item
            rows.append(keys)
        scored = self._score_all([k for keys in rows for k in keys], items)
        out = torch.full((len(prefixes), max((len(r) for r in prefixes), default=0)), -math.inf)  # [N, T]
        for i, keys in enumerate(rows):
            for t, key in enumerate(keys):
                out[i, t] = self._value(scored[key], key[2])
        return out


class FluencyGuard(_LanguageModelReward):
    """A guard against reward hacking (gibberish that games another term):

        s(x, y) = mean_t log p_LM(y_t | c(x), y_<t)         (statistic="min": the min over t)
        score   = s                 if s >= min_token_logprob
                = -inf              if below and penalty is None (a hard violation)
                = s + penalty       if below, otherwise

    An empty completion has no tokens to vouch for it and counts as below the floor. The context is
    `template` before {completion} (default: the prompt text, a newline).
    """

    name = "fluency"

    def __init__(self, min_token_logprob: float = -10.0, penalty: Optional[float] = None, statistic: str = "mean",
                 template: str = "{prompt}\n{completion}", model: Optional[str] = None, batch_size: int = 64):
        super().__init__(template, model, batch_size)
        if statistic not in ("mean", "min"):
            raise ConfigError(f"task.reward.statistic={statistic!r} must be 'mean' or 'min' (of the per-token "
                              "log-probabilities).")
        if not math.isfinite(min_token_logprob):
            raise ConfigError(f"task.reward.min_token_logprob={min_token_logprob} must be a finite log-probability.")
        if penalty is not None and not math.isfinite(penalty):
            raise ConfigError(f"task.reward.penalty={penalty} must be finite, or null for a hard violation (-inf).")
        self.floor, self.penalty, self.statistic = float(min_token_logprob), penalty, statistic

    def _value(self, logprobs: torch.Tensor) -> float:
        empty = logprobs.numel() == 0  # nothing vouches for it: below the floor
        value = self.floor if empty else float(logprobs.mean() if self.statistic == "mean" else logprobs.min())
        if not empty and value >= self.floor:
            return value
        return -math.inf if self.penalty is None else value + float(self.penalty)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        _, tokenizer, _ = self._language_model()
        keys, items = [], {}
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            head, _ = self._texts(prompt, i, kwargs)  # the text after {completion} is not scored
            context, ids, start = self._encode(tokenizer, head, "", completion)
            key = (context, tuple(ids), start)
            keys.append(key)
            items[key] = (context, ids)
        scored = self._score_all(keys, items)
        return [self._value(scored[key][key[2]:]) for key in keys]
