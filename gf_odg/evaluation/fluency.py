"""How fluent the base model's own samples are, to help pick `objective.fluency_floor`.

Draws completions from the base model (adapters off, temperature 1, under the task's constraint mask:
what training starts from) and computes each one's mean per-token log p_ref, exactly as the floor
reads it (gf_odg.log_reward.below_fluency_floor): the base model's own log-probability over its whole
vocabulary, EOS included, divided by the number of generated tokens including EOS. A floor near the
25th percentile floors about a quarter of what the base model itself writes.
"""

from __future__ import annotations

from typing import Optional

import torch

from gf_odg.data.prompts import PromptBatch
from gf_odg.evaluation.sampling import POLICY, Samples, draw_samples
from gf_odg.generation.scoring import score_completions
from gf_odg.model.loading import reference_mode

PERCENTILES = (5, 25, 50, 75)


@torch.no_grad()
def per_token_log_ref(model, tokenizer, task, prompt_indices: list[int], tokens: list[list[int]],
                      batch_size: int = 64, share_prefill: bool = True) -> torch.Tensor:
    """log p_ref(y | x) / |y| of each completion (tokens incl. EOS) under its prompt: [N] float64.
    Call it under `reference_mode` for p_ref (the function scores with whatever `model` is)."""
    device = next(model.parameters()).device
    eos = task.constraints.eos_id
    out = []
    for start in range(0, len(tokens), batch_size):
        rows, slots = tokens[start: start + batch_size], prompt_indices[start: start + batch_size]
        used = sorted(set(slots))
        local = {p: j for j, p in enumerate(used)}
        prompts = PromptBatch.build([task.prompt_tokens[p] for p in used], [task.prompts[p] for p in used],
                                    tokenizer.pad_token_id, device)
        width = max(len(r) for r in rows)
        batch = torch.tensor([list(r) + [eos] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        group = torch.tensor([local[p] for p in slots], device=device)
        lp = score_completions(model, prompts, group, batch, lengths, None, eos, share_prefill)
        out.append((lp.total().double() / lengths.double()).cpu())
    return torch.cat(out)


def base_fluency(model, tokenizer, task, n_samples: int, batch_size: int = 64, seed: int = 0,
                 share_prefill: bool = True, percentiles=PERCENTILES) -> tuple[dict, torch.Tensor, Samples]:
    """(summary, per-token log p_ref [N], samples) of `n_samples` base-model completions spread
    evenly over the task's prompts. The summary has p<k> for each percentile (linear interpolation),
    the mean, and the fraction of valid samples (finite score)."""
    order = [i % len(task.records) for i in range(n_samples)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with reference_mode(model):
        samples = draw_samples(model, tokenizer, task, order, POLICY, batch_size, generator, share_prefill)
        values = per_token_log_ref(model, tokenizer, task, samples.prompt_indices, samples.tokens, batch_size,
                                   share_prefill)
    return summarize(values, samples.scores, percentiles), values, samples


def summarize(values: torch.Tensor, scores: Optional[torch.Tensor] = None, percentiles=PERCENTILES) -> dict:
    q = torch.quantile(values, torch.tensor([p / 100 for p in percentiles], dtype=values.dtype))
    summary = {"n": int(values.numel()), **{f"p{p}": float(v) for p, v in zip(percentiles, q)},
               "mean": float(values.mean())}
    if scores is not None:
        summary["valid_fraction"] = float(torch.isfinite(scores).double().mean())
    return summary
