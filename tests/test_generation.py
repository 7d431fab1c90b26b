"""The decode path without per-token host work draws what the old one drew.

`_old_mask` and `_old_sample` are the sampler and constraint mask as they were before (a Python
loop over rows decoding every row for stop strings, `bool(finished.all())` after every token, a
growing cache and attention mask), kept here as the reference the new path must match token for
token at the same seed, with the generator left in the same state.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from conftest import compose_cfg
from torch.overrides import TorchFunctionMode

from gf_odg.data.constraints import ConstraintSet
from gf_odg.data.prompts import PromptBatch, render_prompt
from gf_odg.data.stop_strings import StopMatcher, _byte_decoder, token_bytes
from gf_odg.generation.sampling import (
    behaviour_probs,
    decoder_and_head,
    draw,
    head_logits,
    prefill,
    resolve_share_prefill,
    run_decoder,
    sample,
)
from gf_odg.model.loading import load_policy

PROMPTS = ["Hi", "Pick a random integer between 0 and 100, please, and answer with the number only.",
           "A medium length prompt here"]


def _old_mask(cons: ConstraintSet, prefix: torch.Tensor, t: int) -> torch.Tensor:
    n = prefix.shape[0]
    allowed = (cons.allowed.unsqueeze(0).expand(n, -1).clone() if cons.allowed is not None
               else torch.ones(n, cons.vocab_size, dtype=torch.bool))
    for seq in cons.banned_sequences:
        head, last = seq[:-1], seq[-1]
        if len(head) > t:
            continue
        if head:
            hit = (prefix[:, t - len(head):] == torch.tensor(head)).all(dim=1)
            allowed[hit, last] = False
        else:
            allowed[:, last] = False
    if t < cons.min_new_tokens:
        allowed[:, cons.eos_id] = False
    force_eos = torch.zeros(n, dtype=torch.bool)
    if t >= cons.max_new_tokens - 1:
        force_eos[:] = True
    if cons.stop_strings and t > 0:
        for i in range(n):
            text = cons.tokenizer.decode(prefix[i].tolist(), skip_special_tokens=True)
            if any(text.endswith(s) for s in cons.stop_strings):
                force_eos[i] = True
    if force_eos.any():
        allowed[force_eos] = False
        allowed[force_eos, cons.eos_id] = True
    empty = ~allowed.any(dim=1)
    if empty.any():
        allowed[empty, cons.eos_id] = True
    return allowed


@torch.no_grad()
def _old_sample(model, prompts, group, cons, temperature, epsilon, generator, share_prefill=True):
    n, eos = group.shape[0], cons.eos_id
    temperature = torch.full((n,), float(temperature))
    decoder, lm_head, config = decoder_and_head(model)
    columns = cons.columns
    hidden, cache, attn, prompt_len = prefill(model, prompts, group, share_prefill)
    logits = head_logits(lm_head, config, hidden, columns)
    tokens = torch.full((n, cons.max_new_tokens), eos, dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    lengths = torch.full((n,), cons.max_new_tokens, dtype=torch.long)
    for t in range(cons.max_new_tokens):
        allowed = _old_mask(cons, tokens[:, :t], t)
        if columns is not None:
            allowed = allowed[:, columns]
        nxt = draw(behaviour_probs(logits, allowed, temperature, epsilon), generator)
        if columns is not None:
            nxt = columns[nxt]
        nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
        tokens[:, t] = nxt
        newly = (nxt == eos) & ~finished
        lengths[newly] = t + 1
        finished |= newly
        if t == cons.max_new_tokens - 1 or bool(finished.all()):
            break
        attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype)], dim=1)
        hidden, cache = run_decoder(decoder, cache, input_ids=nxt.unsqueeze(1), attention_mask=attn,
                                    position_ids=(prompt_len + t).unsqueeze(1), use_cache=True)
        logits = head_logits(lm_head, config, hidden[:, -1], columns)
    return tokens[:, : int(lengths.max())], lengths


def _prompts(tok, texts=PROMPTS):
    return PromptBatch.build([render_prompt(tok, p, True, None) for p in texts], texts, tok.pad_token_id, "cpu")


SPECS = {
    "digits": ({"allowed": "digits", "min_new_tokens": 1}, 5),
    "banned+stops": ({"allowed": ["a", "b", " a", " b", ".", "!"], "banned": ["b a"], "stop_strings": [".", "ab"],
                      "min_new_tokens": 2}, 9),
    "free": ({"banned": ["the"], "min_new_tokens": 3}, 12),
    # every row ends within a few tokens, well before max_new_tokens and mid-block: the generator rewind
    "early": ({"allowed": ["a", "."], "stop_strings": ["."]}, 20),
}


def _check_same_as_old(model, tok, spec, max_new, **new_options):
    cons = ConstraintSet.from_config(spec, tok, max_new)
    prompts = _prompts(tok)
    group = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0] * 3)
    for seed, (temperature, epsilon) in enumerate([(1.0, 0.0), (1.7, 0.2)]):
        g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        tokens, lengths = _old_sample(model, prompts, group, cons, temperature, epsilon, g_old)
        new = sample(model, tok, prompts, group, cons, temperature=temperature, epsilon=epsilon,
                     generator=g_new, **new_options)
        assert torch.equal(new.tokens, tokens) and torch.equal(new.lengths, lengths)
        assert torch.equal(g_new.get_state(), g_old.get_state())  # the next draw is the same too
    return lengths


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.slow
def test_new_decode_path_draws_the_old_tokens(tiny_policy, name):
    model, tok = tiny_policy
    spec, max_new = SPECS[name]
    lengths = _check_same_as_old(model, tok, spec, max_new)
    if name != "free":  # (49k free tokens: EOS is never drawn, every row runs to max_new_tokens)
        assert len(set(lengths.tolist())) > 1  # rows stop at different steps
    if name == "early":
        assert int(lengths.max()) < 8  # all stopped inside the first block: the check ran past them
    _check_same_as_old(model, tok, spec, max_new, kv_cache="static")
    _check_same_as_old(model, tok, spec, max_new, sync_every=1)


@pytest.mark.slow
def test_new_decode_path_draws_the_old_tokens_in_4bit():
    cfg = compose_cfg(["model=tiny-random", "model.quantization.load_in_4bit=true"])
    model, tok, _ = load_policy(cfg.model, cfg.paths, torch.device("cpu"))
    for spec, max_new in SPECS.values():
        _check_same_as_old(model, tok, spec, max_new)
    _check_same_as_old(model, tok, *SPECS["free"], kv_cache="static")


SYNCING = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero"}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device: reading a tensor's value (`item`,
    `bool`, `int`, `tolist`, `.cpu()`), `nonzero`, and indexing by a bool tensor."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(torch.is_tensor(i) and i.dtype == torch.bool for i in index):
                self.calls[name + "[bool]"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("texts", [PROMPTS[:1], PROMPTS], ids=["one-prompt", "padded"])
def test_at_most_one_host_sync_per_8_tokens(tiny_policy, texts):
    model, tok = tiny_policy
    cons = ConstraintSet.from_config({"banned": ["the"], "stop_strings": ["."], "min_new_tokens": 48}, tok, 49)
    prompts = _prompts(tok, texts)
    group = torch.arange(len(texts)).repeat_interleave(4)
    cons.mask(torch.zeros((1, 0), dtype=torch.long), 0)  # compile the mask's tensors outside the count
    with SyncCounter() as counter:
        traj = sample(model, tok, prompts, group, cons, generator=torch.Generator().manual_seed(0))
    generated = int(traj.lengths.max())
    assert generated == 49
    # One look per 8 tokens, plus a constant few per call (prefill's mask, the final lengths and tokens).
    assert sum(counter.calls.values()) <= math.ceil(generated / 8) + 4, counter.calls
    with SyncCounter() as old:
        _old_sample(model, prompts, group, cons, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert sum(old.calls.values()) > generated  # the counter sees per-token syncs where they exist


def test_stop_automaton_matches_decoding(tiny_policy):
    """The token-id automaton agrees with decoding on every prefix, characters split across tokens included."""
    _, tok = tiny_policy
    stops = [".", "é!", " ab", "ab"]
    matcher = StopMatcher(stops, token_bytes(tok))
    texts = ["Voilà é! then ab. x", "café!", "grab ab", "a. b.c", "naïve ... ab!é!"]
    pieces = [tok.encode(t, add_special_tokens=False) for t in texts]
    to_char = {b: c for c, b in _byte_decoder().items()}  # "é" as two one-byte tokens, then "!"
    pieces.append(tok.convert_tokens_to_ids([to_char[b] for b in "é".encode()]) +
                  tok.encode("!", add_special_tokens=False))
    width = max(len(p) for p in pieces)
    ids = torch.full((len(pieces), width), tok.eos_token_id, dtype=torch.long)
    for i, p in enumerate(pieces):
        ids[i, : len(p)] = torch.tensor(p)
    state = matcher.start(len(pieces), "cpu")
    fired = 0
    for t in range(width):
        state = matcher.advance(state, ids[:, t])
        for i, p in enumerate(pieces):
            text = tok.decode(p[: t + 1], skip_special_tokens=True)
            expected = any(text.endswith(s) for s in stops)
            assert bool(matcher.matched(state)[i]) == expected, (i, text)
            fired += expected
    assert fired >= 6
    assert bool(matcher.matched(state)[-1])  # the split "é" then "!" ends with "é!"


def test_constraints_hold_on_1000_samples_and_each_one_binds(tiny_policy):
    """Stop strings, a banned phrase and min/max length hold on 1,000 samples, and each would be
    broken without its constraint (so the check can fail)."""
    model, tok = tiny_policy
    spec, max_new = SPECS["banned+stops"]
    cons = ConstraintSet.from_config(spec, tok, max_new)
    prompts = _prompts(tok, PROMPTS[:2])
    group = torch.arange(2).repeat_interleave(500)
    traj = sample(model, tok, prompts, group, cons, temperature=1.5, epsilon=0.3,
                  generator=torch.Generator().manual_seed(0))
    completions = traj.token_lists()
    assert all(cons.violations(c) == [] for c in completions)
    by_stop = [any(t.endswith(s) for s in spec["stop_strings"]) for t in traj.texts]
    assert sum(by_stop) > 100
    lengths = [len(c) for c, stop in zip(completions, by_stop) if not stop]  # tokens, EOS included
    assert min(lengths) == spec["min_new_tokens"] + 1 and max(lengths) == max_new  # both bounds reached
    loose = ConstraintSet.from_config({k: v for k, v in spec.items() if k not in ("banned", "stop_strings")},
                                      tok, max_new)
    free = sample(model, tok, prompts, group, loose, temperature=1.5, epsilon=0.3,
                  generator=torch.Generator().manual_seed(0))
    found = collections.Counter(p.split(" ")[0] for c in free.token_lists() for p in cons.violations(c))
    assert found["banned"] > 0 and found["continues"] > 0, found


def test_violations_reports_a_missed_stop_string(tiny_policy):
    _, tok = tiny_policy
    cons = ConstraintSet.from_config({"stop_strings": ["."]}, tok, 10)
    eos = tok.eos_token_id
    stopped = tok.encode("Hi.", add_special_tokens=False) + [eos]
    ran_on = tok.encode("Hi. Then", add_special_tokens=False) + [eos]
    assert cons.violations(stopped) == []
    assert any("stop string" in p for p in cons.violations(ran_on))
    short = ConstraintSet.from_config({"stop_strings": ["."], "min_new_tokens": 4}, tok, 10)
    assert short.violations(stopped) == []  # a stop string ends a completion before the minimum too
    assert short.violations(tok.encode("Hi", add_special_tokens=False) + [eos])  # too short, not stopped


def test_share_prefill_auto():
    class Batch:
        def __init__(self, device, lengths):
            self.input_ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long, device=device)
            self.lengths = torch.tensor(lengths)

        def __len__(self):
            return len(self.lengths)

    group = torch.zeros(32, dtype=torch.long)
    assert resolve_share_prefill("auto", Batch("cpu", [40]), group) is True
    assert resolve_share_prefill(False, Batch("cpu", [40]), group) is False
    assert resolve_share_prefill("auto", Batch("meta", [40]), group) is False  # 31 x 40 tokens saved
    assert resolve_share_prefill("auto", Batch("meta", [256]), group) is True  # 31 x 256
    with pytest.raises(Exception, match="share_prompt_prefill"):
        resolve_share_prefill("sometimes", Batch("cpu", [40]), group)
