"""Hard constraints: never violated when sampling, and the scorer renormalises over the same mask."""

from __future__ import annotations

import torch

from gf_odg.data.constraints import ConstraintSet
from gf_odg.data.prompts import PromptBatch, render_prompt
from gf_odg.generation.sampling import decoder_and_head, head_logits, sample
from gf_odg.generation.scoring import score_completions


def _prompts(tokenizer, texts):
    return PromptBatch.build([render_prompt(tokenizer, t, True, None) for t in texts], texts,
                             tokenizer.pad_token_id, "cpu")


def test_sampled_completions_never_violate_the_mask(tiny_policy):
    model, tok = tiny_policy
    specs = [
        ({"allowed": "digits", "min_new_tokens": 1}, 4),
        ({"banned": ["the", "and"], "min_new_tokens": 3}, 6),
        ({"allowed": ["a", "b", "c", " the"], "banned": ["a b"], "min_new_tokens": 2}, 5),
    ]
    prompts = _prompts(tok, ["Count:", "Write a much longer prompt so that the lengths differ a lot here"])
    for spec, max_new in specs:
        cons = ConstraintSet.from_config(spec, tok, max_new)
        generator = torch.Generator().manual_seed(0)
        group = torch.arange(2).repeat_interleave(200)  # 400 per spec, 1200 in all
        traj = sample(model, tok, prompts, group, cons, temperature=1.5, epsilon=0.3, generator=generator)
        for tokens in traj.token_lists():
            assert cons.violations(tokens) == [], (spec, tokens)


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
            assert abs(float(lp.total()[i]) - expected) < 1e-4
