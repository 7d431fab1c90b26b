"""The sampler: K completions per prompt under the constraint mask and a behaviour policy.

Shared-prompt prefill: each distinct prompt is run through the model once; its KV cache is then
indexed out to the samples that continue it (`DynamicCache.batch_select_indices`), and only the
completion tokens are decoded. With `share_prefill=False` the prompt is repeated per sample before
prefill (what `generate(num_return_sequences=K)` does), kept as a fallback and as the benchmark's
baseline.

Behaviour policy at step t, over the allowed set A(s_t):
    q(a | s_t) = (1 - eps) * softmax(l / T)_A(a) + eps * 1[a in A] / |A|
with one temperature T per sample. The loss never uses q: it rescores under the training policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version

from gf_odg.data.constraints import ConstraintSet
from gf_odg.data.prompts import PromptBatch


@dataclass
class Trajectories:
    group: torch.Tensor  # [N] index of each sample's prompt in the PromptBatch
    tokens: torch.Tensor  # [N, T] completion tokens, EOS included, right padded with EOS
    lengths: torch.Tensor  # [N] number of completion tokens, EOS included
    texts: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def token_lists(self) -> list[list[int]]:
        return [self.tokens[i, : int(self.lengths[i])].tolist() for i in range(len(self))]


def decoder_and_head(model):
    """The transformer body (hidden states) and the output projection of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), base.config


_CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"


def run_decoder(decoder, cache=None, **kwargs):
    """Call the transformer body with a KV cache, under either name transformers has used for it.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); 5.0-5.23 know only
    the old one. Returns (last hidden state, cache).
    """
    if cache is not None:
        kwargs[_CACHE_KWARG] = cache
    out = decoder(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.last_hidden_state, new_cache


def head_logits(lm_head, config, hidden: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Output logits in fp32, for every token or only for `columns` (token ids): [..., V or V']."""
    if columns is None:
        logits = lm_head(hidden).float()
    else:
        columns = columns.to(hidden.device)
        bias = lm_head.bias[columns] if getattr(lm_head, "bias", None) is not None else None
        logits = torch.nn.functional.linear(hidden, lm_head.weight[columns].to(hidden.dtype), bias).float()
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def prefill(model, prompts: PromptBatch, group: torch.Tensor, share: bool):
    """Run the prompts; return (last hidden state per sample [N, H], cache for N samples, attn [N, L], lengths [N])."""
    decoder, _, _ = decoder_and_head(model)
    if share:
        hidden, cache = run_decoder(decoder, input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                                    position_ids=prompts.position_ids(), use_cache=True)
        cache.batch_select_indices(group)
        last_hidden = hidden[group, -1]
    else:
        ids, mask = prompts.input_ids[group], prompts.attention_mask[group]
        hidden, cache = run_decoder(decoder, input_ids=ids, attention_mask=mask,
                                    position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0), use_cache=True)
        last_hidden = hidden[:, -1]
    return last_hidden, cache, prompts.attention_mask[group], prompts.lengths[group]


def behaviour_probs(logits: torch.Tensor, allowed: torch.Tensor, temperature: torch.Tensor,
                    epsilon: float, top_p: float = 1.0) -> torch.Tensor:
    """q over the vocabulary; logits [N, V] fp32, allowed [N, V] bool, temperature [N].
    `top_p` < 1 keeps the smallest set of allowed tokens holding that much mass (nucleus decoding,
    an evaluation baseline; never used for training)."""
    scaled = (logits / temperature.unsqueeze(1)).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already >= p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if epsilon > 0:
        uniform = allowed.float() / allowed.sum(dim=1, keepdim=True)
        probs = (1 - epsilon) * probs + epsilon * uniform
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inverting the CDF: [N, V] -> [N]. Several times faster than
    `torch.multinomial` on a large vocabulary on the CPU; a zero-probability token is never drawn
    (the first index whose cumulative mass exceeds u * total has positive mass)."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return index.clamp(max=probs.shape[1] - 1)


@torch.no_grad()
def sample(model, tokenizer, prompts: PromptBatch, group: torch.Tensor, constraints: ConstraintSet,
           temperature: torch.Tensor | float = 1.0, epsilon: float = 0.0,
           generator: torch.Generator | None = None, share_prefill: bool = True,
           top_p: float = 1.0) -> Trajectories:
    """Draw one completion per entry of `group` (prompt indices), e.g. group = arange(P).repeat_interleave(K)."""
    device = prompts.input_ids.device
    n = group.shape[0]
    eos = constraints.eos_id
    if not torch.is_tensor(temperature):
        temperature = torch.full((n,), float(temperature), device=device)
    decoder, lm_head, config = decoder_and_head(model)
    columns = constraints.columns  # None, or the token ids that may ever be allowed
    if columns is not None:
        columns = columns.to(device)
    hidden, cache, attn, prompt_len = prefill(model, prompts, group, share_prefill)
    logits = head_logits(lm_head, config, hidden, columns)  # [N, V or V']
    tokens = torch.full((n, constraints.max_new_tokens), eos, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.full((n,), constraints.max_new_tokens, dtype=torch.long, device=device)
    for t in range(constraints.max_new_tokens):
        allowed = constraints.mask(tokens[:, :t], t)
        if columns is not None:
            allowed = allowed[:, columns]
        probs = behaviour_probs(logits, allowed, temperature, epsilon, top_p)
        nxt = draw(probs, generator)
        if columns is not None:
            nxt = columns[nxt]
        nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
        tokens[:, t] = nxt
        newly = (nxt == eos) & ~finished
        lengths[newly] = t + 1
        finished |= newly
        if t == constraints.max_new_tokens - 1:
            break
        done = bool(finished.all())
        agree = getattr(model, "gf_odg_all_true", None)  # FSDP: every process makes the same forward calls
        if (agree(done) if agree is not None else done):
            break
        attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=device)], dim=1)
        hidden, cache = run_decoder(decoder, cache, input_ids=nxt.unsqueeze(1), attention_mask=attn,
                                    position_ids=(prompt_len + t).unsqueeze(1), use_cache=True)
        logits = head_logits(lm_head, config, hidden[:, -1], columns)
    width = int(lengths.max())
    tokens = tokens[:, :width]
    texts = [tokenizer.decode(tokens[i, : int(lengths[i])].tolist(), skip_special_tokens=True) for i in range(n)]
    return Trajectories(group=group, tokens=tokens, lengths=lengths, texts=texts)
