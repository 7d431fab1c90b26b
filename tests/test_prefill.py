"""Shared-prompt prefill gives the same log P_F and gradients as per-sample prefill."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from gf_odg.data.constraints import ConstraintSet
from gf_odg.model.loading import load_policy
from gf_odg.data.prompts import PromptBatch, render_prompt
from gf_odg.generation.sampling import sample
from gf_odg.generation.scoring import score_completions

PROMPTS = ["Hi", "Pick a random integer between 0 and 100, please, and answer with the number only.",
           "A medium length prompt here"]


def _lp_and_grads(model, prompts, traj, cons, eos, share):
    model.zero_grad(set_to_none=True)
    lp = score_completions(model, prompts, traj.group, traj.tokens, traj.lengths, cons, eos,
                           share_prefill=share, chunk_rows=7, want_eos=True)
    (lp.total() * torch.linspace(0.5, 1.5, len(traj))).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    return lp.total().detach(), lp.eos.detach(), grads


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "4bit"])
def test_shared_prefill_matches_per_sample(four_bit):
    cfg = compose_cfg(["model=tiny-random", f"model.quantization.load_in_4bit={str(four_bit).lower()}"])
    model, tok, _ = load_policy(cfg.model, cfg.paths, torch.device("cpu"))
    cons = ConstraintSet.from_config({"allowed": "digits", "min_new_tokens": 1}, tok, 5)
    prompts = PromptBatch.build([render_prompt(tok, p, True, None) for p in PROMPTS], PROMPTS,
                                tok.pad_token_id, "cpu")
    assert len(set(prompts.lengths.tolist())) == 3  # three different lengths, so left padding matters
    group = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0])
    traj = sample(model, tok, prompts, group, cons, generator=torch.Generator().manual_seed(0))
    assert len(set(traj.lengths.tolist())) > 1  # EOS at different positions
    shared = _lp_and_grads(model, prompts, traj, cons, tok.eos_token_id, True)
    single = _lp_and_grads(model, prompts, traj, cons, tok.eos_token_id, False)
    assert torch.allclose(shared[0], single[0], atol=1e-4)
    finite = torch.isfinite(single[1])
    assert torch.equal(finite, torch.isfinite(shared[1]))
    assert torch.allclose(shared[1][finite], single[1][finite], atol=1e-4)
    assert shared[2].abs().max() > 0
    assert torch.allclose(shared[2], single[2], atol=1e-5, rtol=1e-3)


def test_sampling_is_the_same_with_and_without_sharing(tiny_policy):
    model, tok = tiny_policy
    cons = ConstraintSet.from_config({"allowed": "digits", "min_new_tokens": 1}, tok, 4)
    prompts = PromptBatch.build([render_prompt(tok, p, True, None) for p in PROMPTS], PROMPTS,
                                tok.pad_token_id, "cpu")
    group = torch.arange(3).repeat_interleave(8)
    a = sample(model, tok, prompts, group, cons, generator=torch.Generator().manual_seed(3), share_prefill=True)
    b = sample(model, tok, prompts, group, cons, generator=torch.Generator().manual_seed(3), share_prefill=False)
    assert a.texts == b.texts
