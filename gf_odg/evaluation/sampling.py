"""Drawing evaluation samples: completions of one decoding under the constraint mask, scored once.

    Decoding       how completions are drawn (temperature T, nucleus p, best of n); the policy is (1, 1, 1)
    draw_samples   one completion per entry of a prompt order, under a decoding -> Samples
    sample_rows    one JSON-ready row per completion (what samples*.jsonl holds)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from gf_odg.data.prompts import PromptBatch
from gf_odg.errors import ConfigError
from gf_odg.generation.sampling import sample
from gf_odg.rewards.base import call_reward


@dataclass(frozen=True)
class Decoding:
    """How completions are drawn: softmax(l / temperature) over the allowed tokens, cut to the
    nucleus holding `top_p` of the mass, best-scoring of `best_of` draws. The policy is (1, 1, 1)."""

    name: str
    temperature: float = 1.0
    top_p: float = 1.0
    best_of: int = 1

    @property
    def is_policy(self) -> bool:
        return self.temperature == 1.0 and self.top_p == 1.0 and self.best_of == 1


POLICY = Decoding("policy")
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_decoding(name: str, best_of_n: int) -> Decoding:
    """`temperature_<T>`, `nucleus_<p>`, `best_of_n` (n = eval.best_of_n) or `best_of_<n>`."""
    text = str(name)
    if match := re.fullmatch(rf"temperature_{_NUMBER}", text):
        temperature = float(match.group(1))
        if temperature > 0:
            return Decoding(text, temperature=temperature)
    elif match := re.fullmatch(rf"nucleus_{_NUMBER}", text):
        top_p = float(match.group(1))
        if 0 < top_p <= 1:
            return Decoding(text, top_p=top_p)
    elif text == "best_of_n":
        return Decoding(text, best_of=best_of_n)
    elif match := re.fullmatch(r"best_of_(\d+)", text):
        if int(match.group(1)) >= 1:
            return Decoding(text, best_of=int(match.group(1)))
    raise ConfigError(
        f"eval.baselines: {text!r} is not a decoding; use temperature_<T> (T > 0, e.g. temperature_0.7), "
        "nucleus_<p> (0 < p <= 1, e.g. nucleus_0.95), best_of_n (n = eval.best_of_n) or best_of_<n>."
    )


@dataclass
class Samples:
    """Completions of one decoding, in the order of `prompt_indices`, scored once."""

    decoding: Decoding
    prompt_indices: list[int]  # task prompt index of each completion
    texts: list[str]
    tokens: list[list[int]]  # completion tokens, EOS included
    scores: torch.Tensor  # [N] float32, -inf for a hard violation
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # reward term -> [N] raw scores
    # the policy's decoding on an enumerable task: each prompt's exact distribution (gf_odg.evaluation.exact)
    exact: list = field(default_factory=list)

    def by_prompt(self) -> dict[int, list[int]]:
        """Positions of each prompt's completions."""
        groups: dict[int, list[int]] = {}
        for position, prompt in enumerate(self.prompt_indices):
            groups.setdefault(prompt, []).append(position)
        return groups


def draw_samples(model, tokenizer, task, prompt_order: list[int], decoding: Decoding, batch_size: int,
                 generator: torch.Generator, share_prefill: bool = True, progress: bool = False) -> Samples:
    """One completion per entry of `prompt_order` (task prompt indices) under `decoding`.

    best_of n draws n completions per entry and keeps the highest-scoring one (the first on a tie).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    n = decoding.best_of
    slots = [p for p in prompt_order for _ in range(n)]
    extra = {"top_p": decoding.top_p} if decoding.top_p < 1.0 else {}  # the policy needs no nucleus support
    texts, tokens = [], []
    bar = tqdm(total=len(slots), desc=f"sample {decoding.name}", disable=not progress, dynamic_ncols=True, leave=False)
    for start in range(0, len(slots), batch_size):
        chunk = slots[start: start + batch_size]
        used = sorted(set(chunk))
        local = {p: j for j, p in enumerate(used)}
        prompts = PromptBatch.build([task.prompt_tokens[p] for p in used], [task.prompts[p] for p in used],
                                    tokenizer.pad_token_id, device)
        group = torch.tensor([local[p] for p in chunk], device=device)
        traj = sample(model, tokenizer, prompts, group, task.constraints, temperature=decoding.temperature,
                      generator=generator, share_prefill=share_prefill, **extra)
        texts += traj.texts
        tokens += traj.token_lists()
        bar.update(len(chunk))
    bar.close()
    scores = call_reward(task.reward, [task.prompts[p] for p in slots], texts, **task.reward_kwargs(slots))
    terms = {name: torch.as_tensor(values, dtype=torch.float32).reshape(-1)
             for name, values in (getattr(task.reward, "last_terms", None) or {}).items()}
    if n > 1:
        keep = (scores.view(-1, n).argmax(dim=1) + torch.arange(0, len(slots), n)).tolist()  # [len(prompt_order)]
        texts, tokens = [texts[i] for i in keep], [tokens[i] for i in keep]
        scores = scores[keep]
        terms = {name: values[keep] for name, values in terms.items()}
    return Samples(decoding, list(prompt_order), texts, tokens, scores, terms)


def mode_of(task, text: str, score: float = 0.0) -> Optional[str]:
    """The reward's mode of a completion (`mode_of()`), as a string; None for a completion with no
    mode or a score of -inf (invalid under its own prompt, though another prompt may list it)."""
    if not math.isfinite(score) or not hasattr(task.reward, "mode_of"):
        return None
    mode = task.reward.mode_of(text)
    return None if mode is None else str(mode)


def sample_rows(task, samples: Samples) -> list[dict]:
    """One row per completion: prompt, completion, score (None for a hard violation), mode, decoding."""
    return [{"prompt": task.prompts[p], "completion": text,
             "score": float(score) if math.isfinite(score) else None,
             "mode": mode_of(task, text, score), "decoding": samples.decoding.name}
            for p, text, score in zip(samples.prompt_indices, samples.texts, samples.scores.tolist())]
