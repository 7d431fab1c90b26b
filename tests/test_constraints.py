"""Hard constraints: never violated when sampling, and the scorer renormalises over the same mask."""

from __future__ import annotations

import pytest
import torch

from gf_odg.data.constraints import ConstraintSet
from gf_odg.data.prompts import PromptBatch, render_prompt
from gf_odg.generation.sampling import decoder_and_head, head_logits, sample
from gf_odg.generation.scoring import score_completions


def _prompts(tokenizer, texts):
    return PromptBatch.build([render_prompt(tokenizer, t, True, None) for t in texts], texts,
                             tokenizer.pad_token_id, "cpu")


@pytest.mark.slow
def test_sampled_completions_never_violate_the_mask(tiny_policy):
    model, tok = tiny_policy
    specs = [
        ({"allowed": "digits", "min_new_tokens": 1}, 4),
        ({"banned": ["the", "and"], "min_new_tokens": 3}, 6),
        # "a b" is the tokens "a", " b": both allowed, so the banned phrase can fire (checked below)
        ({"allowed": ["a", "b", "c", " b", " the"], "banned": ["a b"], "min_new_tokens": 2}, 5),
    ]
    prompts = _prompts(tok, ["Count:", "Write a much longer prompt so that the lengths differ a lot here"])
    for spec, max_new in specs:
        cons = ConstraintSet.from_config(spec, tok, max_new)
        generator = torch.Generator().manual_seed(0)
        group = torch.arange(2).repeat_interleave(200)  # 400 per spec, 1200 in all
        traj = sample(model, tok, prompts, group, cons, temperature=1.5, epsilon=0.3, generator=generator)
        for tokens in traj.token_lists():
            assert cons.violations(tokens) == [], (spec, tokens)
        if "allowed" in spec and "banned" in spec:  # without the ban, the phrase is drawn
            unbanned = ConstraintSet.from_config({k: v for k, v in spec.items() if k != "banned"}, tok, max_new)
            free = sample(model, tok, prompts, group, unbanned, temperature=1.5, epsilon=0.3,
                          generator=torch.Generator().manual_seed(0))
            assert sum(any("banned" in p for p in cons.violations(t)) for t in free.token_lists()) > 10


def test_violations_detects_each_kind(tiny_policy):
    _, tok = tiny_policy
    cons = ConstraintSet.from_config({"allowed": "digits", "min_new_tokens": 1}, tok, 4)
    eos = tok.eos_token_id
    one = tok.encode("1", add_special_tokens=False)[0]
    letter = tok.encode("a", add_special_tokens=False)[0]
    assert cons.violations([one, eos]) == []
    assert cons.violations([eos])  # too short
    assert cons.violations([letter, eos])  # outside the allowed set
    assert cons.violations([one, one, one, one, eos])  # too long
    assert cons.violations([one, one])  # no EOS


def test_scored_logprob_is_the_renormalised_masked_distribution(tiny_policy):
    model, tok = tiny_policy
    cons = ConstraintSet.from_config({"allowed": "digits", "min_new_tokens": 1}, tok, 4)
    prompts = _prompts(tok, ["Pick a number"])
    group = torch.zeros(16, dtype=torch.long)
    traj = sample(model, tok, prompts, group, cons, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = score_completions(model, prompts, group, traj.tokens, traj.lengths, cons, tok.eos_token_id)
        # Reference: full logits of the plain model on prompt + completion, softmax over the allowed set.
        decoder, head, config = decoder_and_head(model)
        for i, tokens in enumerate(traj.token_lists()):
            ids = torch.tensor([prompts.input_ids[0].tolist() + tokens])
            logits = model(input_ids=ids).logits[0].float()
            start = prompts.input_ids.shape[1] - 1
            expected = 0.0
            for t, token in enumerate(tokens):
                allowed = cons.mask(torch.tensor([tokens[:t]], dtype=torch.long).reshape(1, t), t)[0]
                row = logits[start + t].masked_fill(~allowed, float("-inf"))
                expected += float(torch.log_softmax(row, -1)[token])
            assert abs(float(lp.total()[i]) - expected) < 1e-5


def test_scored_logprob_full_vocabulary_several_prompts_and_chunks(tiny_policy):
    """The full-vocabulary path (no allowed set) against a hand-built mask and the plain model's
    logits, on prompts of different lengths (left padding) and chunks that start mid-completion."""
    model, tok = tiny_policy
    banned = tok.encode(" the", add_special_tokens=False)
    assert len(banned) == 1
    cons = ConstraintSet.from_config({"banned": [" the"], "min_new_tokens": 2}, tok, 7)
    texts = ["Pick a number", "Write one long sentence about the sea, the wind and the boats"]
    prompts = _prompts(tok, texts)
    group = torch.tensor([0, 1, 1, 0, 1])
    traj = sample(model, tok, prompts, group, cons, generator=torch.Generator().manual_seed(2))
    tokens, lengths = traj.tokens, traj.lengths
    with torch.no_grad():
        lp = score_completions(model, prompts, group, tokens, lengths, cons, tok.eos_token_id,
                               chunk_rows=10)  # 5 rows: chunks of 2 steps, at offsets 0, 2, 4, 6
    assert tokens.shape[1] > 4
    with torch.no_grad():
        for i, row in enumerate(traj.token_lists()):
            prompt = render_prompt(tok, texts[int(group[i])], True, None)
            logits = model(input_ids=torch.tensor([prompt + row])).logits[0].float()
            for t, token in enumerate(row):
                allowed = torch.ones(cons.vocab_size, dtype=torch.bool)
                if t < 2:
                    allowed[tok.eos_token_id] = False
                allowed[banned[0]] = False  # a one-token phrase: never allowed
                if t == cons.max_new_tokens - 1:
                    allowed[:] = False
                    allowed[tok.eos_token_id] = True
                row_logits = logits[len(prompt) - 1 + t].masked_fill(~allowed, float("-inf"))
                expected = float(torch.log_softmax(row_logits, -1)[token])
                assert abs(float(lp.token[i, t]) - expected) < 1e-5, (i, t)


def test_epsilon_without_an_allowed_set_warns(cfg_factory, tiny_policy):
    from gf_odg.exploration.behaviour import epsilon_warning

    _, tok = tiny_policy
    free = ConstraintSet.from_config({"min_new_tokens": 1}, tok, 4)
    digits = ConstraintSet.from_config({"allowed": "digits"}, tok, 4)
    on = cfg_factory("exploration=default", "exploration.epsilon=0.05").exploration
    off = cfg_factory("exploration=default", "exploration.epsilon=0.0").exploration
    decaying_in = cfg_factory("exploration=default", "exploration.epsilon=0.0", "exploration.epsilon_end=0.1",
                              "exploration.epsilon_steps=10").exploration
    message = epsilon_warning(on, free, len(tok))
    assert message and "exploration.epsilon=0.05" in message and str(len(tok)) in message
    assert epsilon_warning(decaying_in, free, len(tok))  # epsilon that grows later warns too
    assert epsilon_warning(off, free, len(tok)) is None
    assert epsilon_warning(on, digits, len(tok)) is None
