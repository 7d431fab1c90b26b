"""determinism: what `trainer.deterministic=true` costs: our step with torch's deterministic kernels
against the same trainer's step without them, alternated step by step in one process (so both sides
share the machine's load), exploration=replay, K = max --ks, --threads torch threads. Figure: ratio =
deterministic / default, of the median step times."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from gf_odg.bench.common import Context, our_trainer, sync


def run(ctx: Context) -> dict:
    k = max(ctx.ks)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="gfodg-determinism-") as tmpdir:
        trainer = our_trainer(ctx, [f"trainer.samples_per_prompt={k}", "exploration=replay"], Path(tmpdir),
                              "benchmark-determinism")
        try:
            trainer.step()  # warm-up
            for i in range(2 * ctx.repeats):
                on = i % 2 == 1
                torch.use_deterministic_algorithms(on, warn_only=True)  # what trainer.deterministic sets
                sync(trainer.device)
                t0 = time.perf_counter()
                trainer.step()
                sync(trainer.device)
                times[on].append(time.perf_counter() - t0)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            trainer.close()
    row = {"K": k, "threads": torch.get_num_threads(), "steps_each": ctx.repeats,
           "default_step_s": statistics.median(times[False]), "deterministic_step_s": statistics.median(times[True])}
    row["ratio"] = row["deterministic_step_s"] / row["default_step_s"]
    print(f"  determinism K={k}, {row['threads']} thread(s): default {row['default_step_s']:.3f}s, deterministic "
          f"{row['deterministic_step_s']:.3f}s, ratio {row['ratio']:.3f}", flush=True)
    return row


def markdown(r: dict) -> list[str]:
    return [f"trainer.deterministic (K={r['K']}, {r['threads']} thread(s), median of {r['steps_each']} steps each, "
            f"alternated): default {r['default_step_s']:.3f} s, deterministic {r['deterministic_step_s']:.3f} s, "
            f"ratio {r['ratio']:.3f}", ""]
