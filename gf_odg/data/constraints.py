"""Hard constraints as action masks.

One mask serves the sampler (as a logits mask while decoding) and the scorer (the same mask when
log P_F is computed for the loss), so the policy is renormalised over the allowed tokens in both:

    P_F(y_t | s_t) = exp(l_{y_t}) / sum_{a in A(s_t)} exp(l_a),   A(s_t) = allowed tokens at s_t.

The mask at step t depends only on the completion so far, `prefix` = y_<t, which both the sampler
and the scorer hold. Supported: an allowed-token set, banned words and multi-token phrases, a
minimum length (EOS masked before it), a maximum length (EOS forced at the last step, so every
trajectory terminates), and stop strings (EOS forced once the text ends with one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from gf_odg.errors import ConfigError

DIGITS = [str(d) for d in range(10)]


@dataclass
class ConstraintSet:
    """Compiled constraints for one tokenizer; `mask(prefix, t)` gives the allowed tokens at step t."""

    vocab_size: int
    eos_id: int
    max_new_tokens: int
    min_new_tokens: int = 0
    allowed: Optional[torch.Tensor] = None  # [V] bool, EOS included; None: every token
    banned_sequences: list[list[int]] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    decode: Optional[callable] = None  # token ids -> text, needed for stop strings

    @classmethod
    def from_config(cls, spec, tokenizer, max_new_tokens: int) -> "ConstraintSet":
        spec = dict(spec or {})
        known = {"allowed", "banned", "min_new_tokens", "stop_strings"}
        unknown = set(spec) - known
        if unknown:
            raise ConfigError(
                f"task.constraints has unknown key(s) {sorted(unknown)}; expected some of {sorted(known)}."
            )
        vocab_size = len(tokenizer)
        eos_id = tokenizer.eos_token_id
        allowed = None
        if spec.get("allowed") is not None:
            words = DIGITS if spec["allowed"] == "digits" else list(spec["allowed"])
            ids = set()
            for word in words:
                tokens = tokenizer.encode(word, add_special_tokens=False)
                if len(tokens) != 1:
                    raise ConfigError(
                        f"task.constraints.allowed: {word!r} is {len(tokens)} tokens for this tokenizer; "
                        "allowed entries must be single tokens."
                    )
                ids.add(tokens[0])
            allowed = torch.zeros(vocab_size, dtype=torch.bool)
            allowed[sorted(ids)] = True
            allowed[eos_id] = True
        banned = []
        for phrase in spec.get("banned") or []:
            for variant in {phrase, " " + phrase}:
                tokens = tokenizer.encode(variant, add_special_tokens=False)
                if tokens and tokens not in banned:
                    banned.append(tokens)
        min_new = int(spec.get("min_new_tokens") or 0)
        if min_new >= max_new_tokens:
            raise ConfigError(
                f"task.constraints.min_new_tokens={min_new} must be below task.max_new_tokens={max_new_tokens}."
            )
        stops = list(spec.get("stop_strings") or [])
        return cls(
            vocab_size=vocab_size, eos_id=eos_id, max_new_tokens=max_new_tokens, min_new_tokens=min_new,
            allowed=allowed, banned_sequences=banned, stop_strings=stops,
            decode=(lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if stops else None,
        )

    @property
    def columns(self) -> Optional[torch.Tensor]:
        """Token ids that can ever be allowed ([V'] long, sorted), or None for the whole vocabulary.
        Sampling and scoring compute logits for these columns only: the masked softmax is the same,
        and a 49k-vocabulary output projection shrinks to a handful of rows on constrained tasks."""
        if self.allowed is None:
            return None
        if getattr(self, "_columns", None) is None:
            self._columns = self.allowed.nonzero().flatten()
        return self._columns

    def mask(self, prefix: torch.Tensor, t: int) -> torch.Tensor:
        """Allowed tokens at step t for each row; prefix: [N, t] completion tokens so far -> [N, V] bool."""
        n = prefix.shape[0]
        device = prefix.device
        if self.allowed is not None:
            allowed = self.allowed.to(device).unsqueeze(0).expand(n, -1).clone()
        else:
            allowed = torch.ones(n, self.vocab_size, dtype=torch.bool, device=device)
        for seq in self.banned_sequences:
            head, last = seq[:-1], seq[-1]
            if len(head) > t:
                continue
            if head:
                hit = (prefix[:, t - len(head):] == torch.tensor(head, device=device)).all(dim=1)
                allowed[hit, last] = False
            else:
                allowed[:, last] = False
        if t < self.min_new_tokens:
            allowed[:, self.eos_id] = False
        force_eos = torch.zeros(n, dtype=torch.bool, device=device)
        if t >= self.max_new_tokens - 1:
            force_eos[:] = True
        if self.stop_strings and t > 0:
            for i in range(n):
                text = self.decode(prefix[i].tolist())
                if any(text.endswith(s) for s in self.stop_strings):
                    force_eos[i] = True
        if force_eos.any():
            allowed[force_eos] = False
            allowed[force_eos, self.eos_id] = True
        # A row with nothing allowed (a banned phrase cornering an allowed set) may always stop.
        empty = ~allowed.any(dim=1)
        if empty.any():
            allowed[empty, self.eos_id] = True
        return allowed

    def violations(self, completion: list[int]) -> list[str]:
        """Check one finished completion (tokens incl. EOS) against every constraint; [] if it holds."""
        problems = []
        if not completion or completion[-1] != self.eos_id:
            problems.append("does not end with EOS")
        if len(completion) > self.max_new_tokens:
            problems.append(f"longer than {self.max_new_tokens} tokens")
        body = completion[:-1]
        if len(body) < self.min_new_tokens:
            problems.append(f"shorter than {self.min_new_tokens} tokens")
        if self.eos_id in body:
            problems.append("EOS before the end")
        if self.allowed is not None and any(not bool(self.allowed[tok]) for tok in body):
            problems.append("a token outside the allowed set")
        for seq in self.banned_sequences:
            k = len(seq)
            if any(body[i:i + k] == seq for i in range(len(body) - k + 1)):
                problems.append(f"banned sequence {seq}")
        return problems
