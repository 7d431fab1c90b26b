"""Hard constraints as action masks.

One mask serves the sampler (as a logits mask while decoding) and the scorer (the same mask when
log P_F is computed for the loss), so the policy is renormalised over the allowed tokens in both:

    P_F(y_t | s_t) = exp(l_{y_t}) / sum_{a in A(s_t)} exp(l_a),   A(s_t) = allowed tokens at s_t.

The mask at step t depends only on the completion so far, `prefix` = y_<t, which both the sampler
and the scorer hold. Supported: an allowed-token set, banned words and multi-token phrases, a
minimum length (EOS masked before it), a maximum length (EOS forced at the last step, so every
trajectory terminates), and stop strings (EOS forced once the text ends with one, even before the
minimum length: a stop string ends the completion).

The mask is built from tensors compiled once (the allowed row, banned sequences, a stop-string
automaton over token ids, gf_odg/data/stop_strings.py) and a small per-row state that the sampler
advances token by token (`start`, `advance`, `allowed_at`): no loop over rows, no decoding and no
host synchronisation per token. `mask(prefix, t)` replays a prefix through the same state.
`violations()` is the independent check: it decodes the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from gf_odg.data.stop_strings import StopMatcher, build_stop_matcher
from gf_odg.errors import ConfigError

DIGITS = [str(d) for d in range(10)]


@dataclass
class MaskState:
    """What the mask at step t needs of the completion so far, kept incrementally by the sampler."""

    t: int
    in_columns: bool
    history: torch.Tensor  # [N, H] the last H tokens (H = longest banned sequence - 1), -1 before the start
    stops: Optional[list[torch.Tensor]]  # the stop-string automaton's state, or None


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
    tokenizer: Optional[object] = field(default=None, repr=False)  # needed for stop strings

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
        stops = [str(s) for s in spec.get("stop_strings") or []]
        if any(not s for s in stops):
            raise ConfigError("task.constraints.stop_strings has an empty string, which every text ends with; "
                              "remove it.")
        return cls(
            vocab_size=vocab_size, eos_id=eos_id, max_new_tokens=max_new_tokens, min_new_tokens=min_new,
            allowed=allowed, banned_sequences=banned, stop_strings=stops, tokenizer=tokenizer if stops else None,
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

    # ------------------------------------------------------------------ the mask, as tensors
    def _stop_matcher(self) -> Optional[StopMatcher]:
        if not self.stop_strings:
            return None
        if getattr(self, "_stops", None) is None:
            if self.tokenizer is None:
                raise ValueError("ConstraintSet with stop_strings needs `tokenizer` "
                                 "(ConstraintSet.from_config sets it).")
            self._stops = build_stop_matcher(self.stop_strings, self.tokenizer)
        return self._stops

    def _compiled(self, device: torch.device, in_columns: bool) -> dict:
        """Per device and space (vocabulary or `columns`): the base row, the EOS index, and each banned
        sequence as (head ids, index of its last token); built once, reused every step."""
        cache = self.__dict__.setdefault("_compiled_on", {})
        key = (device, in_columns)
        if key not in cache:
            if in_columns and self.columns is not None:
                lookup = torch.full((self.vocab_size,), -1, dtype=torch.long)
                lookup[self.columns] = torch.arange(len(self.columns))
                base = torch.ones(len(self.columns), dtype=torch.bool)
            else:
                lookup = torch.arange(self.vocab_size)
                base = (self.allowed.clone() if self.allowed is not None
                        else torch.ones(self.vocab_size, dtype=torch.bool))
            eos = int(lookup[self.eos_id])
            banned = []
            for seq in self.banned_sequences:
                last = int(lookup[seq[-1]]) if 0 <= seq[-1] < self.vocab_size else -1
                if last >= 0:  # a last token outside the columns is never allowed anyway
                    banned.append((torch.tensor(seq[:-1], dtype=torch.long, device=device), last))
            eos_only = torch.zeros_like(base)
            eos_only[eos] = True
            cache[key] = {"base": base.to(device), "eos": eos, "eos_only": eos_only.to(device), "banned": banned}
        return cache[key]

    def start(self, n: int, device, in_columns: bool = False) -> MaskState:
        """The mask state of n empty completions. `in_columns`: masks over `columns` ([N, V'])."""
        device = torch.device(device)
        history = max((len(seq) - 1 for seq in self.banned_sequences), default=0)
        matcher = self._stop_matcher()
        return MaskState(
            t=0, in_columns=in_columns and self.columns is not None,
            history=torch.full((n, history), -1, dtype=torch.long, device=device),
            stops=matcher.start(n, device) if matcher is not None else None,
        )

    def advance(self, state: MaskState, tokens: torch.Tensor) -> MaskState:
        """The state after each row took `tokens` ([N] ids) at step state.t."""
        history = state.history
        if history.shape[1]:
            history = torch.cat([history[:, 1:], tokens.unsqueeze(1)], dim=1)
        stops = self._stops.advance(state.stops, tokens) if state.stops is not None else None
        return MaskState(t=state.t + 1, in_columns=state.in_columns, history=history, stops=stops)

    def allowed_at(self, state: MaskState) -> torch.Tensor:
        """Allowed tokens at step state.t: [N, V] bool (or [N, V'] over `columns`). Tensor operations
        only: no loop over rows and no host synchronisation."""
        t, history = state.t, state.history
        c = self._compiled(history.device, state.in_columns)
        n = history.shape[0]
        allowed = c["base"].unsqueeze(0).expand(n, -1).clone()
        for head, last in c["banned"]:
            if len(head) > t:
                continue
            if len(head):
                hit = (history[:, history.shape[1] - len(head):] == head).all(dim=1)
                allowed[:, last] &= ~hit
            else:
                allowed[:, last] = False
        if t < self.min_new_tokens:
            allowed[:, c["eos"]] = False
        if t >= self.max_new_tokens - 1:
            return c["eos_only"].unsqueeze(0).expand(n, -1).clone()
        if state.stops is not None and t > 0:
            stop = StopMatcher.matched(state.stops)
            allowed = torch.where(stop.unsqueeze(1), c["eos_only"].unsqueeze(0), allowed)
        # A row with nothing allowed (a banned phrase cornering an allowed set) may always stop.
        allowed[:, c["eos"]] |= ~allowed.any(dim=1)
        return allowed

    def mask(self, prefix: torch.Tensor, t: int) -> torch.Tensor:
        """Allowed tokens at step t for each row; prefix: [N, t] completion tokens so far -> [N, V] bool."""
        state = self.start(prefix.shape[0], prefix.device)
        for i in range(t):
            state = self.advance(state, prefix[:, i])
        return self.allowed_at(state)

    # ------------------------------------------------------------------ the independent check
    def violations(self, completion: list[int]) -> list[str]:
        """Check one finished completion (tokens incl. EOS) against every constraint; [] if it holds.
        Independent of the mask: stop strings are checked by decoding the text, not by the automaton."""
        problems = []
        if not completion or completion[-1] != self.eos_id:
            problems.append("does not end with EOS")
        if len(completion) > self.max_new_tokens:
            problems.append(f"longer than {self.max_new_tokens} tokens")
        body = completion[:-1]
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        check_stops = bool(self.stop_strings) and self.tokenizer is not None
        # a stop string ends the completion even before min_new_tokens (the mask forces EOS there)
        stopped = check_stops and len(body) > 0 and any(decode(body).endswith(s) for s in self.stop_strings)
        if len(body) < self.min_new_tokens and not stopped:
            problems.append(f"shorter than {self.min_new_tokens} tokens")
        if self.eos_id in body:
            problems.append("EOS before the end")
        if self.allowed is not None and any(not bool(self.allowed[tok]) for tok in body):
            problems.append("a token outside the allowed set")
        for seq in self.banned_sequences:
            k = len(seq)
            if any(body[i:i + k] == seq for i in range(len(body) - k + 1)):
                problems.append(f"banned sequence {seq}")
        if check_stops:
            if any(s in decode(body) for s in self.stop_strings):  # cheap filter before every prefix
                for t in range(1, len(body)):
                    text = decode(body[:t])
                    hit = [s for s in self.stop_strings if text.endswith(s)]
                    if hit:
                        problems.append(f"continues after stop string {hit[0]!r} (token {t})")
                        break
        return problems
