"""scale (not in the default sections): per model load (4-bit NF4 + LoRA, bf16 + LoRA), sampled
tokens per second, seconds per training step and peak GPU memory over --scale-steps steps of the
rng task (16 free tokens) after one warm-up step."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gf_odg.bench.common import Context, our_trainer, sync
from gf_odg.bench.report import table

VARIANTS = {"4-bit NF4 + LoRA": ["model.quantization.load_in_4bit=true"],
            "bf16 + LoRA": ["model.quantization.load_in_4bit=false", "model.dtype=bfloat16"]}


def run(ctx: Context) -> list[dict]:
    k, steps, device = max(ctx.ks), ctx.options.scale_steps, ctx.device
    rows = []
    for name, extra in VARIANTS.items():
        with tempfile.TemporaryDirectory(prefix="gfodg-scale-") as tmpdir:
            trainer = our_trainer(ctx, [*extra, f"trainer.samples_per_prompt={k}", "task.max_new_tokens=16",
                                        "task.constraints.allowed=null"], Path(tmpdir), "benchmark-scale")
            trainer.step()  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sample_s, step_s, tokens = 0.0, 0.0, 0
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                metrics = trainer.step()
                sync(device)
                step_s += time.perf_counter() - t0
                sample_s += metrics["time/sample"]
                tokens += int(trainer.last_batch.traj.lengths.sum())
            row = {"variant": name, "params": sum(p.numel() for p in trainer.model.parameters()), "K": k,
                   "step_s": step_s / steps, "sample_tokens_per_s": tokens / sample_s,
                   "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            trainer.close()
            del trainer
        rows.append(row)
        print(f"  scale {name}: {row['step_s']:.3f} s/step, {row['sample_tokens_per_s']:.0f} sampled tokens/s, "
              f"peak {row['peak_gpu_gb']} GB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> list[str]:
    return table(["variant", "parameters", "K", "s / step", "sampled tokens / s", "peak GPU memory (GiB)"],
                 [[r["variant"], f"{r['params'] / 1e9:.2f} B", r["K"], f"{r['step_s']:.3f}",
                   f"{r['sample_tokens_per_s']:.0f}",
                   f"{r['peak_gpu_gb']:.2f}" if r["peak_gpu_gb"] is not None else "-"] for r in rows])
