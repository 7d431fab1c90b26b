"""Stop strings matched on token ids: a small automaton per stop string, precomputed once.

"The completion's text ends with s" is decided without decoding. Each token's bytes are known up
front (`token_bytes`), and the state of a row is the set of k such that the text so far ends with
the first k bytes of s: a bool row [M + 1] (M = len(s) in bytes; k = 0 always holds). Appending a
token whose bytes are tau (length L) gives

    ends with s[:k']  <=>  (k' <= L and tau ends with s[:k'])                       # inside tau
                       or  (k' >  L and ends with s[:k' - L] before, s[k' - L:k'] == tau)  # tau closes it

so with `inside[v]`, `closes[v]` ([V, M + 1] bool) and `length[v]`, one step is a gather and two
element-wise ops on [N, M + 1], for every row at once and with no host synchronisation. The text
ends with s when bit M is set. Working in bytes keeps a character split across tokens exact, as
`tokenizer.decode` sees it (UTF-8 is self-synchronising, so a byte suffix that is a whole encoded
string is also a character suffix). Special tokens decode to nothing (the decode the old check used
skipped them), so they leave the state unchanged.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character map that byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def _decoder_type(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ if decoder is not None else None


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes as `tokenizer.decode(..., skip_special_tokens=True)` writes them.

    Byte-level BPE (GPT-2, Llama 3, SmolLM2): read from the vocabulary, exact and fast. Any other
    tokenizer: each token decoded after an anchor token and the anchor's text removed, so a
    SentencePiece word-start marker keeps its space (one batch decode; seconds on a large vocabulary).
    """
    size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {i: t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}
    if _decoder_type(tokenizer) == "ByteLevel":
        table = _byte_decoder()
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        out = []
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                out.append(b"")
            elif i in added:
                out.append(added[i].encode("utf-8"))
            else:
                out.append(bytes(table[c] for c in piece) if all(c in table for c in piece)
                           else piece.encode("utf-8"))
        return out
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    prefix = tokenizer.decode(anchor, skip_special_tokens=True)
    texts = tokenizer.batch_decode([anchor + [i] for i in range(size)], skip_special_tokens=True)
    return [b"" if i in special else t[len(prefix):].encode("utf-8") if t.startswith(prefix) else t.encode("utf-8")
            for i, t in enumerate(texts)]


class StopMatcher:
    """Which rows' text ends with one of the stop strings; state [N, sum(M_s + 1)] bool."""

    def __init__(self, stop_strings: list[str], pieces: list[bytes]):
        self.stop_strings = list(stop_strings)
        self.vocab_size = len(pieces)
        self._tables = [self._compile(s.encode("utf-8"), pieces) for s in self.stop_strings]
        self._on: dict[torch.device, list] = {}

    @staticmethod
    def _compile(stop: bytes, pieces: list[bytes]):
        m = len(stop)
        inside_at, closes_at, empty = [], [], []  # (token, k) pairs; tokens with no bytes
        for v, tau in enumerate(pieces):
            n = len(tau)
            if n == 0:
                empty.append(v)
                continue
            if tau in stop:  # tau can close a prefix of s only if it is a substring of s
                closes_at += [(v, k) for k in range(n + 1, m + 1) if stop[k - n:k] == tau]
            if tau[-1] in stop:
                inside_at += [(v, k) for k in range(1, min(n, m) + 1) if tau.endswith(stop[:k])]
        inside = torch.zeros((len(pieces), m + 1), dtype=torch.bool)
        closes = torch.zeros((len(pieces), m + 1), dtype=torch.bool)
        inside[:, 0] = True
        if inside_at:
            inside[tuple(torch.tensor(inside_at).T)] = True
        if closes_at:
            closes[tuple(torch.tensor(closes_at).T)] = True
        closes[empty] = True  # no bytes: the state is unchanged
        length = torch.tensor([min(len(tau), m + 1) for tau in pieces], dtype=torch.long)
        return inside, closes, length, m

    def _device_tables(self, device: torch.device):
        if device not in self._on:
            self._on[device] = [(i.to(device), c.to(device), n.to(device), m) for i, c, n, m in self._tables]
        return self._on[device]

    def start(self, n: int, device) -> list[torch.Tensor]:
        """The state of n empty texts."""
        state = []
        for _, _, _, m in self._device_tables(torch.device(device)):
            s = torch.zeros((n, m + 1), dtype=torch.bool, device=device)
            s[:, 0] = True
            state.append(s)
        return state

    def advance(self, state: list[torch.Tensor], tokens: torch.Tensor) -> list[torch.Tensor]:
        """The state after appending `tokens` ([N] ids) to each row."""
        out = []
        for s, (inside, closes, length, m) in zip(state, self._device_tables(tokens.device)):
            ks = torch.arange(m + 1, device=tokens.device)
            source = (ks.unsqueeze(0) - length[tokens].unsqueeze(1)).clamp(min=0)  # [N, M + 1]
            out.append(inside[tokens] | (s.gather(1, source) & closes[tokens]))
        return out

    @staticmethod
    def matched(state: list[torch.Tensor]) -> torch.Tensor:
        """[N] bool: the text ends with one of the stop strings."""
        hit = state[0][:, -1]
        for s in state[1:]:
            hit = hit | s[:, -1]
        return hit


@lru_cache(maxsize=8)
def _cached_bytes(tokenizer) -> tuple[bytes, ...]:
    return tuple(token_bytes(tokenizer))


def build_stop_matcher(stop_strings: list[str], tokenizer) -> StopMatcher:
    try:
        pieces = list(_cached_bytes(tokenizer))
    except TypeError:  # an unhashable tokenizer
        pieces = token_bytes(tokenizer)
    return StopMatcher(stop_strings, pieces)
