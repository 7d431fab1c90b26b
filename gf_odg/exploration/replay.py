"""A prioritised, deduplicated replay buffer of past trajectories, for off-policy training.

An entry is one trajectory (prompt, completion tokens with EOS, text) with its *raw* reward score.
Priorities are computed at sampling time from `log_reward_fn(scores)`, so when beta changes the
buffer re-tempers itself without touching what it stores.

Scope: with `scope="prompt"` each prompt has its own pool of `capacity` entries (Hu et al. 2024 keep
a per-prompt top-k); with `scope="global"` all prompts share one pool of `capacity` (Lee et al.).
Either way `sample(prompt)` draws only that prompt's entries, and the trainer always asks with the
prompt: a replayed trajectory is trained under the prompt it was scored with, never attached to another
(its score, R(x', y), would be wrong there). `sample(None)` draws from all prompts, for inspection.

Deduplication is always between entries of the same prompt:
  - exact: an identical token sequence never enters twice; a higher score raises the stored one.
  - edit: texts at normalised Levenshtein distance d(a, b) / max(|a|, |b|) <= threshold are
    near-duplicates; embedding: cosine(embed(a), embed(b)) >= 1 - threshold.
    A newcomer better than all its near-duplicates replaces them; otherwise it is rejected.
Exact dedup applies in every mode. A score of -inf (a hard violation), or below `min_score` (raw),
or a log-reward below `min_log_reward` (config `exploration.replay.min_log_reward`) never enters.

Eviction: when a pool is full, the entry with the lowest score goes, the oldest first among equal
scores; a newcomer scoring below every stored entry is rejected instead. A full pool of equal scores
is therefore FIFO. Age is insertion order; raising a duplicate's score does not make it younger.

Sampling is with replacement, with probabilities over the N candidate entries:
  uniform:  p_i = 1 / N
  rank:     p_i ∝ 1 / (k N + rank_i), rank 0 = highest log-reward, k = RANK_K (Tripp et al. 2020,
            weighted retraining); ties in log-reward are ranked oldest first.
  softmax:  p_i ∝ exp(log_reward_i / priority_temperature)
  ratio:    p_i ∝ (R_i / P_F(y_i))^(1 / priority_temperature), with P_F the policy's probability of
            the entry as last recorded (`record_log_pf`: every trained row, and before each draw the
            trainer rescores the `rescore` x K entries recorded longest ago under the current
            policy, gf_odg.training.step.rescore_replay; at 0.25, none is more than 4 pool / K steps
            stale): the
            completions the policy under-samples most, relative to their reward, come first. An
            entry never scored comes before every scored one. This is the target-to-policy ratio
            whose minimum the exact evaluation reports (`exact_min_ratio`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from gf_odg.errors import ConfigError

RANK_K = 1e-2
HISTOGRAM_BINS = 64  # letters hashed into bins; merging letters keeps the bag distance a lower bound
SCOPES = ("prompt", "global")
PRIORITIES = ("uniform", "rank", "softmax", "ratio")
DEDUPS = ("exact", "edit", "embedding")
STATE_VERSION = 1
_INF = 1 << 40  # an edit distance no text reaches

LogRewardFn = Callable[[torch.Tensor], torch.Tensor]  # scores [N] -> log-rewards [N]
EmbedFn = Callable[[list[str]], torch.Tensor]  # texts -> [N, D]


@dataclass(frozen=True)
class ReplayEntry:
    prompt: str
    tokens: tuple[int, ...]  # completion token ids, EOS included
    text: str
    score: float  # raw reward score, not tempered
    extra: Optional[dict] = None


def edit_distances(query: str, candidates: Sequence[str]) -> torch.Tensor:
    """Levenshtein distance from `query` to each candidate: [M] int64."""
    return _levenshtein(_codes(query), [_codes(c) for c in candidates])


def _codes(text: str) -> torch.Tensor:
    return torch.tensor([ord(ch) for ch in text], dtype=torch.long)  # [len(text)]


def _levenshtein(query: torch.Tensor, candidates: list[torch.Tensor],
                 bound: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Levenshtein distances [M] between code sequences; where `bound` [M] is given, any distance
    above it is reported as bound + 1.

    Banded DP (Ukkonen): a cell D[i, j] with |i - j| > B costs more than B, so with B = max(bound)
    only offsets o = j - i + B in [0, 2B] are kept, one row per query character, vectorised over
    candidates. From row i-1: diagonal D[i-1, j-1] is offset o, up D[i-1, j] is offset o + 1, and
    within the row D[i, j] = min(E[j], D[i, j-1] + 1), which unrolls to o + cummin_{o' <= o}(E[o'] - o').
    Every path through (i, j) costs at least D[i, j] + |(len(b) - j) - (len(a) - i)|, so a candidate
    whose row minimum of that exceeds its bound is dropped early (checked every few rows).
    """
    n = len(query)
    lengths = torch.tensor([c.numel() for c in candidates], dtype=torch.long)  # [M]
    if bound is None:
        bound = lengths.clamp(min=n)  # no distance exceeds the longer length
    if not candidates or n == 0 or int(lengths.max()) == 0:
        return torch.minimum(lengths + n, bound + 1)  # one side is empty
    band = int(bound.max())
    offsets = torch.arange(2 * band + 1)  # [2B + 1]
    # chars[:, i + o] is b[j - 1] for row i: b padded with sentinels (-1 never matches) both sides
    chars = torch.nn.utils.rnn.pad_sequence(candidates, batch_first=True, padding_value=-1)  # [M, W]
    chars = F.pad(chars, (band + 1, max(0, n + band - chars.shape[1])), value=-1)
    gap = (lengths[:, None] - n + band - offsets).abs()  # [M, 2B + 1] lengths left to match, the same every row
    row = torch.where(offsets >= band, offsets - band, _INF).repeat(len(candidates), 1)  # D[0, j] = j, j >= 0
    alive = torch.arange(len(candidates))  # candidates still computed: the rows of row and gap
    for i, code in enumerate(query.tolist(), start=1):
        best = row + (chars[:, i: i + 2 * band + 1].index_select(0, alive) != code)  # diagonal
        best[:, :-1] = torch.minimum(best[:, :-1], row[:, 1:] + 1)  # up
        if band - i >= 0:
            best[:, : band - i] = _INF  # j < 0
            best[:, band - i] = i  # j = 0
        row = torch.cummin(best - offsets, dim=1).values + offsets  # left
        if i % 4 == 0 or i == n:
            within = (row + gap).amin(dim=1) <= bound.index_select(0, alive)
            if not within.all():
                keep = within.nonzero().squeeze(1)
                alive, row, gap = alive.index_select(0, keep), row.index_select(0, keep), gap.index_select(0, keep)
                if alive.numel() == 0:
                    break
    final = lengths.index_select(0, alive) - n + band  # offset of (n, len(b)); outside the band means > B
    distance = row.gather(1, final.clamp(0, 2 * band)[:, None]).squeeze(1)
    distance = torch.where((final >= 0) & (final <= 2 * band), distance, _INF)
    return (bound + 1).index_copy(0, alive, torch.minimum(distance, bound.index_select(0, alive) + 1))


@contextmanager
def _one_thread():
    """Run torch on one thread: dedup works on many small tensors, where the fork-join of intra-op
    threads costs more than the work, and on a busy CPU each parallel op can wait a scheduler tick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _choice(key: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"exploration.replay.{key}={value!r} is not one of {', '.join(allowed)}.")
    return value


class ReplayBuffer:
    """Past trajectories with raw scores, sampled by priority; see the module docstring for the rules.

    Arguments mirror `ReplayConfig` (`from_config` maps them); `embed_fn(texts) -> [N, D]` is needed
    for `dedup="embedding"`; `min_score` filters raw scores, `min_log_reward` tempered ones.
    """

    def __init__(self, capacity: int, scope: str = "prompt", priority: str = "softmax",
                 priority_temperature: float = 1.0, dedup: str = "exact", dedup_threshold: float = 0.1,
                 embed_fn: Optional[EmbedFn] = None, min_score: Optional[float] = None,
                 min_log_reward: Optional[float] = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"exploration.replay.capacity={capacity!r} must be an integer >= 1.")
        if not (priority_temperature > 0 and math.isfinite(priority_temperature)):
            raise ConfigError(
                f"exploration.replay.priority_temperature={priority_temperature!r} must be a finite number > 0."
            )
        if not 0 <= dedup_threshold <= 1:
            raise ConfigError(f"exploration.replay.dedup_threshold={dedup_threshold!r} must be in [0, 1].")
        self.capacity = capacity
        self.scope = _choice("scope", scope, SCOPES)
        self.priority = _choice("priority", priority, PRIORITIES)
        self.dedup = _choice("dedup", dedup, DEDUPS)
        if self.dedup == "embedding" and embed_fn is None:
            raise ConfigError("exploration.replay.dedup=embedding needs an embedding model; none was given.")
        self.priority_temperature = float(priority_temperature)
        self.dedup_threshold = float(dedup_threshold)
        self.embed_fn = embed_fn
        self.min_score = min_score
        self.min_log_reward = min_log_reward
        # pool key (the prompt, or None for the global pool) -> {(prompt, tokens): entry}, oldest first
        self._pools: dict[Optional[str], dict[tuple[str, tuple[int, ...]], ReplayEntry]] = {}
        self._features: dict[tuple[str, tuple[int, ...]], Any] = {}  # _text_features cache, rebuilt on demand
        self._log_pf: dict[tuple[str, tuple[int, ...]], float] = {}  # (prompt, tokens) -> last log P_F (ratio)
        self._scored_at: dict[tuple[str, tuple[int, ...]], int] = {}  # when it was recorded (record_log_pf calls)
        self._clock = 0

    @classmethod
    def from_config(cls, cfg: Any, embed_fn: Optional[EmbedFn] = None) -> "ReplayBuffer":
        """Build from an `exploration.replay` config node (`ReplayConfig`)."""
        return cls(capacity=cfg.capacity, scope=cfg.scope, priority=cfg.priority,
                   priority_temperature=cfg.priority_temperature, dedup=cfg.dedup,
                   dedup_threshold=cfg.dedup_threshold, embed_fn=embed_fn, min_log_reward=cfg.min_log_reward)

    # ---- size -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(pool) for pool in self._pools.values())

    def size(self, prompt: Optional[str] = None) -> int:
        return len(self) if prompt is None else len(self.entries(prompt))

    def entries(self, prompt: Optional[str] = None) -> list[ReplayEntry]:
        """The entries `sample(prompt)` draws from, in a fixed order (pool, then age)."""
        if prompt is None:
            return [entry for pool in self._pools.values() for entry in pool.values()]
        if self.scope == "prompt":
            return list(self._pools.get(prompt, {}).values())
        return [entry for entry in self._pools.get(None, {}).values() if entry.prompt == prompt]

    # ---- adding -----------------------------------------------------------------------------

    def add(self, prompt: str, tokens: Sequence[int], text: str, score: float, extra: Optional[dict] = None,
            log_reward_fn: Optional[LogRewardFn] = None) -> bool:
        """Offer one trajectory; True if it entered the buffer (a raised duplicate score is not entering).

        `log_reward_fn` is needed only when the buffer has a `min_log_reward`.
        """
        return self.add_batch([prompt], [tokens], [text], [score], None if extra is None else [extra],
                              log_reward_fn)[0]

    def add_batch(self, prompts: Sequence[str], tokens: Sequence[Sequence[int]], texts: Sequence[str],
                  scores: Sequence[float], extras: Optional[Sequence[Optional[dict]]] = None,
                  log_reward_fn: Optional[LogRewardFn] = None) -> list[bool]:
        """Offer trajectories in order, as repeated `add`; embeds all texts in one call."""
        scores = [float(s) for s in scores]
        bad = [s for s in scores if math.isnan(s) or s == math.inf]
        if bad:
            raise ValueError(f"replay: scores must be finite or -inf, got {bad[0]}.")
        extras = list(extras) if extras is not None else [None] * len(scores)
        keep = [s > -math.inf and (self.min_score is None or s >= self.min_score) for s in scores]
        if self.min_log_reward is not None and scores:
            if log_reward_fn is None:
                raise ValueError("replay: this buffer has a min_log_reward, so add() needs log_reward_fn.")
            log_rewards = self._log_rewards(scores, log_reward_fn)
            keep = [k and lr >= self.min_log_reward for k, lr in zip(keep, log_rewards.tolist())]
        features = [None] * len(scores)
        if self.dedup != "exact" and any(keep):
            todo = [i for i, k in enumerate(keep) if k]
            for i, feature in zip(todo, self._text_features([texts[i] for i in todo])):
                features[i] = feature
        return [k and self._add(ReplayEntry(p, self._as_tuple(t), x, s, e), f)
                for k, p, t, x, s, e, f in zip(keep, prompts, tokens, texts, scores, extras, features)]

    @staticmethod
    def _as_tuple(tokens: Sequence[int]) -> tuple[int, ...]:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return tuple(int(t) for t in tokens)

    def _add(self, new: ReplayEntry, feature: Any) -> bool:
        """Dedup, evict, insert; `feature` is the newcomer's `_text_features` (None in exact mode)."""
        pool = self._pools.setdefault(new.prompt if self.scope == "prompt" else None, {})
        key = (new.prompt, new.tokens)
        old = pool.get(key)
        if old is not None:
            if new.score > old.score:  # same key keeps its place (its age) in the dict
                pool[key] = replace(old, score=new.score, extra=old.extra if new.extra is None else new.extra)
            return False
        if self.dedup != "exact":
            near = self._near_duplicates(pool, new, feature)
            if any(pool[k].score >= new.score for k in near):
                return False
            for k in near:
                self._remove(pool, k)
        if len(pool) >= self.capacity:
            lowest = min(pool, key=lambda k: pool[k].score)  # min keeps the first, i.e. oldest, of ties
            if new.score < pool[lowest].score:
                return False
            self._remove(pool, lowest)
        pool[key] = new
        if feature is not None:
            self._features[key] = feature
        return True

    def _remove(self, pool: dict, key: tuple[str, tuple[int, ...]]) -> None:
        del pool[key]
        self._features.pop(key, None)
        self._log_pf.pop(key, None)
        self._scored_at.pop(key, None)

    def stalest(self, prompt: str, n: int) -> list[ReplayEntry]:
        """The n entries of `prompt` whose log P_F was recorded longest ago (never recorded first)."""
        entries = self.entries(prompt)
        order = sorted(range(len(entries)), key=lambda i: self._scored_at.get((entries[i].prompt, entries[i].tokens), -1))
        return [entries[i] for i in order[:n]]

    def record_log_pf(self, prompts: Sequence[str], tokens: Sequence[Sequence[int]],
                      log_pf: Sequence[float]) -> None:
        """The policy's log P_F of trajectories it was just trained on; kept for those in the buffer
        (what `priority="ratio"` reads; other priorities ignore it)."""
        self._clock += 1
        for prompt, toks, value in zip(prompts, tokens, log_pf):
            key = (prompt, self._as_tuple(toks))
            pool = self._pools.get(prompt if self.scope == "prompt" else None, {})
            if key in pool and math.isfinite(float(value)):
                self._log_pf[key] = float(value)
                self._scored_at[key] = self._clock

    def _near_duplicates(self, pool: dict, new: ReplayEntry, feature: Any) -> list:
        keys = [k for k in pool if k[0] == new.prompt]
        if not keys:
            return []
        missing = [k for k in keys if k not in self._features]  # e.g. after load_state_dict
        if missing:
            self._features.update(zip(missing, self._text_features([pool[k].text for k in missing])))
        if self.dedup == "embedding":
            cosine = torch.stack([self._features[k] for k in keys]) @ feature  # [M]
            return [k for k, c in zip(keys, cosine.tolist()) if c >= 1 - self.dedup_threshold]
        with _one_thread():
            return self._edit_near_duplicates([(k, self._features[k]) for k in keys], feature)

    def _edit_near_duplicates(self, candidates: list, feature: tuple) -> list:
        """Keys among (key, features) candidates at normalised edit distance <= threshold from `feature`."""
        codes, histogram = feature
        lengths = torch.tensor([c.numel() for _, (c, _) in candidates])  # [M]
        bound = (self.dedup_threshold * lengths.clamp(min=len(codes)) + 1e-9).floor().long()  # most edits allowed
        # cheap lower bounds on the distance first: the length gap, and the letter-count (bag) distance
        histograms = torch.stack([h for _, (_, h) in candidates])  # [M, HISTOGRAM_BINS]
        bag = torch.maximum((histograms - histogram).clamp(min=0).sum(1), (histogram - histograms).clamp(min=0).sum(1))
        close = (((lengths - len(codes)).abs() <= bound) & (bag <= bound)).nonzero().squeeze(1).tolist()
        if not close:
            return []
        bound = bound[close]
        distance = _levenshtein(codes, [candidates[i][1][0] for i in close], bound)
        return [candidates[i][0] for i, ok in zip(close, (distance <= bound).tolist()) if ok]

    def _text_features(self, texts: list[str]) -> list:
        """What near-duplicate tests compare: a unit embedding, or (character codes, hashed letter counts)."""
        if self.dedup == "embedding":
            return self._embed(texts)
        features = []
        for text in texts:
            codes = _codes(text)
            features.append((codes, torch.bincount(codes % HISTOGRAM_BINS, minlength=HISTOGRAM_BINS)))
        return features

    def _embed(self, texts: list[str]) -> list[torch.Tensor]:
        vectors = self.embed_fn(texts)
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"replay: embed_fn must return a [{len(texts)}, D] tensor, got "
                             f"{getattr(vectors, 'shape', type(vectors))}.")
        return list(F.normalize(vectors.detach().float().cpu(), dim=-1))

    # ---- sampling ---------------------------------------------------------------------------

    @staticmethod
    def _log_rewards(scores: Sequence[float], log_reward_fn: LogRewardFn) -> torch.Tensor:
        log_rewards = log_reward_fn(torch.tensor(scores, dtype=torch.float64))
        log_rewards = torch.as_tensor(log_rewards).detach().double().cpu().reshape(-1)
        if log_rewards.numel() != len(scores) or torch.isnan(log_rewards).any():
            raise ValueError(f"replay: log_reward_fn must map {len(scores)} scores to as many log-rewards, no NaN.")
        return log_rewards  # [N]

    def _probabilities(self, entries: list[ReplayEntry], log_reward_fn: Optional[LogRewardFn]) -> torch.Tensor:
        n = len(entries)
        if self.priority == "uniform":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        if log_reward_fn is None:
            raise ValueError(f"replay: priority={self.priority} needs a log_reward_fn.")
        log_rewards = self._log_rewards([e.score for e in entries], log_reward_fn)  # [N]
        if self.priority == "rank":
            order = torch.sort(log_rewards, descending=True, stable=True).indices
            rank = torch.empty(n, dtype=torch.float64)
            rank[order] = torch.arange(n, dtype=torch.float64)
            weights = 1.0 / (RANK_K * n + rank)
            return weights / weights.sum()
        if self.priority == "ratio":
            log_pf = torch.tensor([self._log_pf.get((e.prompt, e.tokens), math.nan) for e in entries],
                                  dtype=torch.float64)
            unscored = torch.isnan(log_pf)
            if unscored.any():  # not scored yet: these first, uniformly
                return unscored.double() / unscored.sum()
            log_rewards = log_rewards - log_pf
        if log_rewards.max() == -math.inf:  # nothing to prefer
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        return torch.softmax(log_rewards / self.priority_temperature, dim=0)

    def probabilities(self, prompt: Optional[str] = None,
                      log_reward_fn: Optional[LogRewardFn] = None) -> torch.Tensor:
        """Sampling probabilities [N] over `entries(prompt)`, in that order."""
        entries = self.entries(prompt)
        return self._probabilities(entries, log_reward_fn) if entries else torch.zeros(0, dtype=torch.float64)

    def sample(self, prompt: Optional[str], n: int, generator: torch.Generator,
               log_reward_fn: Optional[LogRewardFn] = None) -> list[ReplayEntry]:
        """n entries for `prompt` (None: any prompt), drawn with replacement; [] if there are none.

        `generator` must be a CPU generator; `log_reward_fn` is needed unless priority is uniform.
        """
        entries = self.entries(prompt)
        if not entries or n <= 0:
            return []
        probs = self._probabilities(entries, log_reward_fn)
        picks = torch.multinomial(probs, n, replacement=True, generator=generator)
        return [entries[i] for i in picks.tolist()]

    def stats(self, log_reward_fn: LogRewardFn, prompt: Optional[str] = None) -> dict[str, float]:
        """size and distinct prompts; mean and max log-reward only when the buffer is not empty."""
        entries = self.entries(prompt)
        out = {"size": len(entries), "prompts": len({e.prompt for e in entries})}
        if entries:
            log_rewards = self._log_rewards([e.score for e in entries], log_reward_fn)
            out["mean_log_reward"] = float(log_rewards.mean())
            out["max_log_reward"] = float(log_rewards.max())
        return out

    # ---- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain Python types only, loadable with `torch.load(..., weights_only=True)`.

        `extra` dicts are stored as given; keep them to plain types too.
        """
        return {
            "version": STATE_VERSION,
            "entries": [{"prompt": e.prompt, "tokens": list(e.tokens), "text": e.text, "score": e.score,
                         "extra": e.extra, "log_pf": self._log_pf.get((e.prompt, e.tokens)),
                         "scored_at": self._scored_at.get((e.prompt, e.tokens))}
                        for e in self.entries()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a saved buffer's, in its order.

        Entries are restored without dedup or score filters; if this buffer's capacity is smaller than
        the saved one's, pools are trimmed by the eviction rule (lowest score, oldest first).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"replay: unknown state version {state.get('version')!r}, expected {STATE_VERSION}.")
        self._pools, self._features, self._log_pf, self._scored_at = {}, {}, {}, {}
        for item in state["entries"]:
            entry = ReplayEntry(item["prompt"], tuple(item["tokens"]), item["text"], float(item["score"]),
                                item.get("extra"))
            if item.get("log_pf") is not None:
                self._log_pf[(entry.prompt, entry.tokens)] = float(item["log_pf"])
                self._scored_at[(entry.prompt, entry.tokens)] = int(item.get("scored_at") or 0)
            self._pools.setdefault(entry.prompt if self.scope == "prompt" else None, {})[
                (entry.prompt, entry.tokens)] = entry
        self._clock = max(self._scored_at.values(), default=0)
        for name, pool in self._pools.items():
            if len(pool) > self.capacity:
                keys = list(pool)  # oldest first; evict as `add` would: lowest score, then oldest
                order = sorted(range(len(keys)), key=lambda i: (pool[keys[i]].score, i))
                evict = set(order[: len(keys) - self.capacity])
                self._pools[name] = {k: pool[k] for i, k in enumerate(keys) if i not in evict}
