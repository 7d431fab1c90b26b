"""Memory levers: activation checkpointing and micro-batched scoring give the same gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose_cfg
from gf_odg.data.constraints import ConstraintSet
from gf_odg.model.loading import load_policy
from gf_odg.data.prompts import PromptBatch, render_prompt
from gf_odg.generation.sampling import decoder_and_head, sample
from gf_odg.generation.scoring import score_completions
from gf_odg.training.trainer import Trainer

PROMPTS = ["Hi", "Pick a random integer between 0 and 100, please, and answer with the number only.",
           "A medium length prompt here"]


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "4bit"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "per-sample"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(four_bit, share):
    cfg = compose_cfg(["model=tiny-random", "model.gradient_checkpointing=true",
                       f"model.quantization.load_in_4bit={str(four_bit).lower()}"])
    torch.manual_seed(0)
    model, tok, _ = load_policy(cfg.model, cfg.paths, torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at 0; give every adapter weight a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    cons = ConstraintSet.from_config({"allowed": "digits", "min_new_tokens": 1}, tok, 5)
    prompts = PromptBatch.build([render_prompt(tok, p, True, None) for p in PROMPTS], PROMPTS,
                                tok.pad_token_id, "cpu")
    group = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
    traj = sample(model, tok, prompts, group, cons, generator=torch.Generator().manual_seed(0))
    assert int(traj.lengths.max()) > 2
    layer = decoder_and_head(model)[0].layers[0]
    checkpoint_fn = layer._gradient_checkpointing_func
    calls = []  # runs of the layer's checkpointed body: in forward, and again when backward recomputes it

    def counting(fn, *args, **kwargs):
        def body(*a, **k):
            calls.append(1)
            return fn(*a, **k)

        return checkpoint_fn(body, *args, **kwargs)

    layer._gradient_checkpointing_func = counting

    def grads(checkpointed: bool):
        model.gf_odg_checkpointing = checkpointed
        model.zero_grad(set_to_none=True)
        calls.clear()
        lp = score_completions(model, prompts, traj.group, traj.tokens, traj.lengths, cons, tok.eos_token_id,
                               share_prefill=share, chunk_rows=7)
        (lp.total() * torch.linspace(0.5, 1.5, len(traj))).sum().backward()
        flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return lp.total().detach(), flat, len(calls)

    plain_lp, plain_grads, plain_calls = grads(False)
    ckpt_lp, ckpt_grads, ckpt_calls = grads(True)
    assert plain_calls == 0 and ckpt_calls == 2  # the completion (or whole) pass ran again in backward
    assert torch.allclose(plain_lp, ckpt_lp, atol=1e-5)
    assert plain_grads.abs().max() > 0
    assert torch.allclose(plain_grads, ckpt_grads, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("objective", ["tb", "vargrad", "rloo"])
def test_micro_batches_give_the_same_gradient_as_one_pass(objective, tmp_path):
    def trainer(micro: int) -> Trainer:
        cfg = compose_cfg([*TINY, f"objective={objective}", "trainer.samples_per_prompt=10", "trainer.prompts_per_step=1",
                           f"trainer.micro_batch_size={micro}", "trainer.grad_clip=1000", "seed=5"], tmp_path / str(micro))
        t = Trainer(cfg, tmp_path / f"run{micro}")
        t.setup()
        with torch.no_grad():
            for name, p in t.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        return t

    whole, micro = trainer(0), trainer(3)
    batch = whole.collect()
    assert len(batch.traj) == 10
    m_whole, m_micro = whole.train_step(batch), micro.train_step(batch)
    assert m_whole["loss"] == pytest.approx(m_micro["loss"], abs=1e-5)
    g_whole = [p.grad for g in whole.optimizer.param_groups for p in g["params"]]
    g_micro = [p.grad for g in micro.optimizer.param_groups for p in g["params"]]
    assert any(float(g.abs().max()) > 0 for g in g_whole)
    for a, b in zip(g_whole, g_micro):  # float32 sums in another order: relative to the gradient's size
        assert float((a - b).norm()) <= 1e-5 * float(a.norm()) + 1e-7, (float((a - b).norm()), float(a.norm()))
    whole.close()
    micro.close()
