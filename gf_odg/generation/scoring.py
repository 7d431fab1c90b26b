"""Scoring completions: log P_F of each chosen token under the constraint mask, with or without grad.

    log P_F(y_t | s_t) = l_{y_t} - logsumexp_{a in A(s_t)} l_a

Shared-prompt prefill, as in the sampler: the prompt runs once (with gradients when enabled), its
KV cache and last hidden state are indexed out to the samples (the indexing sums their gradients),
and only the completion tokens run on top. The first token's log-probability comes from the
prompt's last position.

The log-softmax is selective and chunked: the output projection runs on a few hundred rows at a
time (recomputed in backward under activation checkpointing), so no float32 [N, T, V] tensor is
ever materialised; with a 128k vocabulary that tensor alone is gigabytes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from gf_odg.data.constraints import ConstraintSet
from gf_odg.data.prompts import PromptBatch
from gf_odg.generation.sampling import decoder_and_head, head_logits, prefill, resolve_share_prefill, run_decoder


@dataclass
class TokenLogProbs:
    token: torch.Tensor  # [N, T] log P_F(y_t | s_t), 0 beyond each completion's length
    eos: Optional[torch.Tensor]  # [N, T] log P_F(EOS | s_t) (-inf where EOS is masked), if asked
    valid: torch.Tensor  # [N, T] bool, t < length

    def total(self) -> torch.Tensor:
        return self.token.sum(dim=1)  # [N]


@contextmanager
def layer_checkpointing(decoder, enabled: bool, with_cache: bool = False):
    """Activation checkpointing of the decoder layers for one pass.

    transformers checkpoints a layer only when the layer's own `training` flag is set (and
    `gradient_checkpointing_enable` ran); the policy runs in eval mode (no dropout), so the flag of
    the layer modules alone, not of their children, is switched for the pass. `with_cache`: the
    pass reads a KV cache that `read_only_cache` made safe to replay in backward.
    """
    layers = [m for m in getattr(decoder, "layers", []) if getattr(m, "gradient_checkpointing", False)]
    if not enabled or not layers:
        yield
        return
    saved = [(m.training, m.__dict__.get("_can_checkpoint_with_cache")) for m in layers]
    for m in layers:
        m.training = True
        if with_cache:
            m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, (training, can) in zip(layers, saved):
            m.training = training
            if can is None:
                m.__dict__.pop("_can_checkpoint_with_cache", None)
            else:
                m._can_checkpoint_with_cache = can


def read_only_cache(cache):
    """Make a prompt's KV cache return prompt + new keys without storing the new ones, so a
    checkpointed layer recomputed in backward sees exactly what it saw in forward."""
    for layer in cache.layers:
        keys, values = layer.keys, layer.values

        def update(key_states, value_states, *args, _k=keys, _v=values, **kwargs):
            return torch.cat([_k, key_states], dim=-2), torch.cat([_v, value_states], dim=-2)

        layer.update = update
    return cache


def completion_hidden(model, prompts: PromptBatch, group: torch.Tensor, tokens: torch.Tensor,
                      share_prefill: bool = True) -> torch.Tensor:
    """Hidden states that predict each completion token: [N, T, H] (position t predicts y_t).

    With `model.gradient_checkpointing: true` in the config and gradients on, the completion pass
    is checkpointed layer by layer (the prompt pass, one row per distinct prompt, is not).
    """
    decoder, _, _ = decoder_and_head(model)
    checkpointed = torch.is_grad_enabled() and bool(getattr(model, "gf_odg_checkpointing", False))
    n, width = tokens.shape
    if not share_prefill:
        # Per-sample teacher forcing: prompt and completion in one pass, no cache.
        ids = torch.cat([prompts.input_ids[group], tokens[:, : width - 1]], dim=1)
        mask = torch.cat([prompts.attention_mask[group],
                          torch.ones((n, width - 1), dtype=torch.long, device=tokens.device)], dim=1)
        with layer_checkpointing(decoder, checkpointed):
            hidden, _ = run_decoder(decoder, input_ids=ids, attention_mask=mask,
                                    position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
        start = prompts.input_ids.shape[1] - 1
        return hidden[:, start: start + width]
    last_hidden, cache, attn, prompt_len = prefill(model, prompts, group, share=True)
    in_step = getattr(model, "gf_odg_all_true", None) is not None  # FSDP: every process makes both passes
    if width == 1 and not in_step:
        return last_hidden.unsqueeze(1)
    fed = max(width - 1, 1)  # under FSDP a one-token batch still runs the completion pass, its output unused
    attn = torch.cat([attn, torch.ones((n, fed), dtype=attn.dtype, device=tokens.device)], dim=1)
    positions = prompt_len.unsqueeze(1) + torch.arange(fed, device=tokens.device)
    if checkpointed:
        cache = read_only_cache(cache)
    with layer_checkpointing(decoder, checkpointed, with_cache=True):
        hidden, _ = run_decoder(decoder, cache, input_ids=tokens[:, :fed], attention_mask=attn,
                                position_ids=positions, use_cache=True)
    return torch.cat([last_hidden.unsqueeze(1), hidden[:, : width - 1]], dim=1)


def _chunk_logprobs(lm_head, config, eos_index: int, hidden, token_index, allowed, columns):
    """token_index / eos_index index the computed columns (the vocabulary, or `columns`)."""
    logits = head_logits(lm_head, config, hidden, columns)  # [N, c, V or V'] fp32, one chunk only
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    normaliser = torch.logsumexp(logits, dim=-1)  # [N, c]
    chosen = logits.gather(-1, token_index.clamp(min=0).unsqueeze(-1)).squeeze(-1) - normaliser
    chosen = torch.where(token_index >= 0, chosen, torch.full_like(chosen, float("-inf")))
    eos = logits[..., eos_index] - normaliser
    return chosen, eos


def selective_logprobs(lm_head, config, hidden: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                       constraints: Optional[ConstraintSet], eos_id: int, chunk_rows: int = 128,
                       want_eos: bool = False) -> TokenLogProbs:
    n, width, _ = hidden.shape
    valid = torch.arange(width, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)  # [N, T]
    safe_tokens = torch.where(valid, tokens, torch.full_like(tokens, eos_id))
    columns = constraints.columns if constraints is not None else None
    if columns is not None:
        columns = columns.to(tokens.device)
        lookup = torch.full((lm_head.weight.shape[0],), -1, dtype=torch.long, device=tokens.device)
        lookup[columns] = torch.arange(len(columns), device=tokens.device)
        token_index, eos_index = lookup[safe_tokens], int(lookup[eos_id])
    else:
        token_index, eos_index = safe_tokens, eos_id
    step = max(1, chunk_rows // max(n, 1))
    chosen_parts, eos_parts = [], []
    state = constraints.start(n, tokens.device, in_columns=columns is not None) if constraints is not None else None
    for t0 in range(0, width, step):
        t1 = min(width, t0 + step)
        allowed = None
        if constraints is not None:
            masks = []  # the sampler's mask state, advanced along the completions: [N, c, V or V']
            for t in range(t0, t1):
                masks.append(constraints.allowed_at(state))
                state = constraints.advance(state, safe_tokens[:, t])
            allowed = torch.stack(masks, dim=1)
        args = (lm_head, config, eos_index, hidden[:, t0:t1], token_index[:, t0:t1], allowed, columns)
        if torch.is_grad_enabled() and hidden.requires_grad:
            chosen, eos = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            chosen, eos = _chunk_logprobs(*args)
        chosen_parts.append(chosen)
        eos_parts.append(eos)
    chosen = torch.cat(chosen_parts, dim=1)
    zero = torch.zeros((), device=chosen.device, dtype=chosen.dtype)
    token = torch.where(valid, chosen, zero)
    eos = torch.cat(eos_parts, dim=1) if want_eos else None
    return TokenLogProbs(token=token, eos=eos, valid=valid)


def score_completions(model, prompts: PromptBatch, group: torch.Tensor, tokens: torch.Tensor,
                      lengths: torch.Tensor, constraints: Optional[ConstraintSet], eos_id: int,
                      share_prefill: bool | str = True, chunk_rows: int = 128, want_eos: bool = False) -> TokenLogProbs:
    """log P_F per completion token (gradients follow torch's grad mode). `share_prefill`: true,
    false or "auto" (`resolve_share_prefill`)."""
    _, lm_head, config = decoder_and_head(model)
    share = resolve_share_prefill(share_prefill, prompts, group)
    hidden = completion_hidden(model, prompts, group, tokens, share)
    return selective_logprobs(lm_head, config, hidden, tokens, lengths, constraints, eos_id, chunk_rows, want_eos)
