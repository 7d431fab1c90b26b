"""overhead: our full step (`Trainer.step()`: sample + reward + score + optimiser) against the same
batch size through raw `model.generate`, the reward and one raw forward/backward + optimiser step,
and where our step time goes. Figure: overhead_ratio = ours / raw (on-policy TB, K = max --ks)."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from gf_odg.bench.common import Context, our_trainer, timed

PARTS = ("time/sample", "time/reward", "time/score_backward")


def run(ctx: Context) -> dict:
    k = max(ctx.ks)
    with tempfile.TemporaryDirectory(prefix="gfodg-overhead-") as tmpdir:
        trainer = our_trainer(ctx, [f"trainer.samples_per_prompt={k}", "exploration=on_policy"], Path(tmpdir),
                              "benchmark-overhead")
        parts: dict[str, list] = {}

        def ours():
            metrics = trainer.step()
            for key in PARTS:
                parts.setdefault(key, []).append(metrics[key])

        model, tok, task, device = trainer.model, trainer.tokenizer, trainer.task, ctx.device
        ids = torch.tensor([task.prompt_tokens[0]], device=device)  # [1, prompt_len]

        def raw():
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     num_return_sequences=k, max_new_tokens=task.constraints.max_new_tokens,
                                     pad_token_id=tok.pad_token_id)  # [K, prompt_len + new]
            completions = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            task.reward([task.prompts[0]] * k, completions)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=out).logits[:, ids.shape[1] - 1: -1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, out[:, ids.shape[1]:].unsqueeze(-1)).sum()
            logp.backward()
            trainer.optimizer.step()

        ours_s = timed(ours, device, ctx.repeats)
        raw_s = timed(raw, device, ctx.repeats)
        trainer.close()
    breakdown = {key: statistics.median(values[1:]) for key, values in parts.items()}  # [0]: the warm-up
    row = {"K": k, "ours_step_s": ours_s, "raw_step_s": raw_s, "overhead_ratio": ours_s / raw_s, **breakdown}
    print(f"  overhead K={k}: ours {ours_s:.3f}s, raw generate+forward/backward {raw_s:.3f}s, "
          f"ratio {row['overhead_ratio']:.2f}", flush=True)
    return row


def markdown(o: dict) -> list[str]:
    return [f"Step (K={o['K']}): ours {o['ours_step_s']:.3f} s (sample {o.get('time/sample', 0):.3f}, reward "
            f"{o.get('time/reward', 0):.3f}, score+backward+optimiser {o.get('time/score_backward', 0):.3f}); "
            f"raw generate + reward + forward/backward {o['raw_step_s']:.3f} s; ratio {o['overhead_ratio']:.2f}", ""]
