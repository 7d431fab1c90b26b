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
from gf_odg.errors import ConfigError


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


def pad_tokens(token_lists, eos_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions as token lists (EOS included) -> (tokens [N, W] right padded with EOS, lengths [N]),
    the layout of `Trajectories`; W is the longest list."""
    width = max(len(t) for t in token_lists)
    tokens = torch.full((len(token_lists), width), eos_id, dtype=torch.long)
    for i, t in enumerate(token_lists):
        tokens[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    return tokens.to(device), lengths.to(device)


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


SYNC_EVERY = 8  # tokens between the host's checks that every row has finished


def resolve_share_prefill(setting, prompts: PromptBatch, group: torch.Tensor) -> bool:
    """`trainer.share_prompt_prefill`: true, false, or "auto".

    auto: share on the CPU always (measured 5-18x faster per step there); on a GPU share when the
    prompt tokens it saves, (samples per prompt - 1) x prompt length, reach SHARE_MIN_SAVED_TOKENS.
    On a GPU a small model is bound by kernel launches and a 4-bit model dequantises its weights once
    per forward call, and sharing makes two calls where per-sample prefill makes one: measured on an
    H100 with the rng chat prompt (about 40 tokens) at K = 32, about 1,200 tokens saved, sharing
    ran at 0.7-0.8x. The threshold is provisional until the GPU check (scripts/gpu_check.sh)
    measures the crossing; see docs/gpu.md."""
    if isinstance(setting, bool):
        return setting
    if str(setting).lower() in ("true", "false"):
        return str(setting).lower() == "true"
    if str(setting).lower() != "auto":
        raise ConfigError(f"trainer.share_prompt_prefill={setting!r}: expected true, false or auto.")
    if prompts.input_ids.device.type == "cpu":
        return True
    per_prompt = torch.bincount(group.cpu(), minlength=len(prompts)).tolist()  # once per call, not per token
    lengths = prompts.lengths.cpu().tolist()
    saved = sum((k - 1) * length for k, length in zip(per_prompt, lengths) if k > 0)
    return saved >= SHARE_MIN_SAVED_TOKENS


SHARE_MIN_SAVED_TOKENS = 4096


def _mask_kind(config) -> str | None:
    """How a prebuilt 4D attention mask must look for this model's attention ("bool" for SDPA,
    "float" for eager), or None to let transformers build it from the 2D mask (other kernels, and
    sliding-window layers, whose windows a prebuilt mask would skip)."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or any("sliding" in str(t) for t in layer_types):
        return None
    impl = getattr(config, "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "float"}.get(impl)


def _attention_4d(attn: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[N, S] 0/1 -> [N, 1, 1, S] in the form transformers would build for a one-token query."""
    keep = attn.bool()[:, None, None, :]
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=attn.device).masked_fill(~keep, torch.finfo(dtype).min)


def _static_cache(config, cache, width: int):
    """A preallocated cache of `width` positions holding what `cache` holds (each layer written once)."""
    from transformers import StaticCache

    static = StaticCache(config=config, max_cache_len=width)
    for src, dst in zip(cache.layers, static.layers):
        dst.update(src.keys, src.values)
    return static


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _prefix_tensor(prefix_tokens, n: int, eos: int, device):
    """[N, P] forced tokens (EOS padded) and [N] their counts, or (None, None) without prefixes."""
    if prefix_tokens is None:
        return None, None
    if len(prefix_tokens) != n:
        raise ValueError(f"sample: {len(prefix_tokens)} prefixes for {n} rows.")
    width = max((len(p) for p in prefix_tokens), default=0)
    forced = torch.full((n, max(width, 1)), eos, dtype=torch.long)
    for i, p in enumerate(prefix_tokens):
        forced[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prefix_tokens], dtype=torch.long)
    return forced.to(device), lengths.to(device)


@torch.no_grad()
def sample(model, tokenizer, prompts: PromptBatch, group: torch.Tensor, constraints: ConstraintSet,
           temperature: torch.Tensor | float = 1.0, epsilon: float = 0.0,
           generator: torch.Generator | None = None, share_prefill: bool | str = True,
           top_p: float = 1.0, kv_cache: str = "dynamic", sync_every: int = SYNC_EVERY,
           prefix_tokens: list[list[int]] | None = None) -> Trajectories:
    """Draw one completion per entry of `group` (prompt indices), e.g. group = arange(P).repeat_interleave(K).

    No host synchronisation per token: the constraint mask is kept on the device as a state the
    loop advances; whether every row has finished is read every `sync_every` tokens. The steps run
    past the last row's EOS draw EOS only, and the generator is rewound so that it ends where a
    check after every token would have left it: the same seed draws the same tokens, and leaves the
    same generator state, for any `sync_every`. `kv_cache="static"` preallocates the KV cache
    (transformers' StaticCache) instead of growing it every token (same draws; see docs/gpu.md).

    `prefix_tokens` (one list per row, possibly empty) continues given completion prefixes: row i's
    first len(prefix_tokens[i]) tokens are forced to the prefix (its draws are made and discarded,
    the mask state advances through them), and the rest is sampled as usual (local search,
    gf_odg/exploration/local_search.py). The prefix must itself be allowed by the constraints.
    """
    device = prompts.input_ids.device
    n = group.shape[0]
    eos = constraints.eos_id
    max_new = constraints.max_new_tokens
    if kv_cache not in ("dynamic", "static"):
        raise ConfigError(f"kv_cache={kv_cache!r}: expected dynamic or static.")
    if not torch.is_tensor(temperature):
        temperature = torch.full((n,), float(temperature), device=device)
    gen = generator if generator is not None else _default_generator(device)
    decoder, lm_head, config = decoder_and_head(model)
    columns = constraints.columns  # None, or the token ids that may ever be allowed
    if columns is not None:
        columns = columns.to(device)
    share = resolve_share_prefill(share_prefill, prompts, group)
    hidden, cache, attn, prompt_len = prefill(model, prompts, group, share)
    logits = head_logits(lm_head, config, hidden, columns)  # [N, V or V']
    width = attn.shape[1]
    kind = _mask_kind(config)
    if kv_cache == "static" and kind is None:
        kv_cache = "dynamic"  # a prebuilt mask would be wrong here; the grown cache is always right
    padded = kind is not None and bool((attn == 0).any())  # once per call
    full_attn = torch.cat([attn, torch.zeros((n, max_new), dtype=attn.dtype, device=device)], dim=1)  # [N, L + T]
    if kv_cache == "static":
        cache = _static_cache(config, cache, width + max_new)
    state = constraints.start(n, device, in_columns=columns is not None)
    tokens = torch.full((n, max_new), eos, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.full((n,), max_new, dtype=torch.long, device=device)
    first_done = torch.full((), -1, dtype=torch.long, device=device)  # first step after which all finished
    agree = getattr(model, "gf_odg_all_true", None)  # FSDP: every process makes the same forward calls
    every = 1 if agree is not None else max(1, int(sync_every))
    block_start, block_rng = 0, gen.get_state()
    forced, forced_len = _prefix_tensor(prefix_tokens, n, eos, device)
    for t in range(max_new):
        allowed = constraints.allowed_at(state)  # [N, V or V'] on the device
        probs = behaviour_probs(logits, allowed, temperature, epsilon, top_p)
        nxt = draw(probs, gen)
        if columns is not None:
            nxt = columns[nxt]
        if forced is not None and t < forced.shape[1]:
            nxt = torch.where(t < forced_len, forced[:, t], nxt)
        nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
        tokens[:, t] = nxt
        newly = (nxt == eos) & ~finished
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        finished = finished | newly
        if t == max_new - 1:
            break
        first_done = torch.where((first_done < 0) & finished.all(), torch.full_like(first_done, t), first_done)
        if (t + 1 - block_start) % every == 0:
            stop_at = int(first_done)  # the host's one look per block
            done = stop_at >= 0
            if agree is not None:
                done = agree(done)
            if done:
                if agree is None and stop_at < t:  # drew past the last EOS: rewind the generator
                    gen.set_state(block_rng)
                    for _ in range(block_start, stop_at + 1):
                        torch.rand((n, 1), generator=gen, device=device, dtype=torch.float64)
                break
            block_start, block_rng = t + 1, gen.get_state()
        state = constraints.advance(state, nxt)
        full_attn[:, width + t] = 1
        if kv_cache == "static":
            mask = _attention_4d(full_attn, kind, hidden.dtype)
        elif padded:
            mask = _attention_4d(full_attn[:, : width + t + 1], kind, hidden.dtype)
        elif kind is not None:
            mask = None  # nothing padded: transformers needs no mask for a one-token query
        else:
            mask = full_attn[:, : width + t + 1]
        hidden, cache = run_decoder(decoder, cache, input_ids=nxt.unsqueeze(1), attention_mask=mask,
                                    position_ids=(prompt_len + t).unsqueeze(1), use_cache=True)
        logits = head_logits(lm_head, config, hidden[:, -1], columns)
    lengths_list = lengths.tolist()
    width_out = max(lengths_list)
    tokens = tokens[:, :width_out]
    rows = tokens.tolist()
    texts = [tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(rows, lengths_list)]
    return Trajectories(group=group, tokens=tokens, lengths=lengths, texts=texts)
