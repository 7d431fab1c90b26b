"""first_run: where the default run's time goes, against the baselines it replaced, measured in one
process: a training step (the default task and settings, `Trainer.step()`) with the model in bf16
against fp32, and the exact evaluation scoring the completion tree (one position per prefix) against
teacher-forcing every completion. Figures: bf16_over_fp32 and tree_over_forced (time ratios); on a
CPU without native bf16 (gf_odg.model.loading.cpu_has_native_bf16) the first is emulated bf16."""

from __future__ import annotations

import tempfile
from pathlib import Path


from gf_odg.bench.common import Context, our_trainer, time_steps, timed


def run(ctx: Context) -> dict:
    from gf_odg.evaluation.exact import completion_log_probs, enumerate_terminals, tree_log_probs
    from gf_odg.model.loading import cpu_has_native_bf16

    row: dict = {"native_bf16": ctx.device.type == "cuda" or cpu_has_native_bf16()}
    k = max(ctx.ks)
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory(prefix="gfodg-first-run-") as tmpdir:
            trainer = our_trainer(ctx, [f"model.dtype={dtype}", f"model.quantization.compute_dtype={dtype}",
                                        f"trainer.samples_per_prompt={k}"], Path(tmpdir), "benchmark-first-run")
            step_s, _, _ = time_steps(trainer, ctx.repeats)
            row[f"step_s_{dtype}"] = step_s
            if dtype == "float32":
                model, tok, task = trainer.model, trainer.tokenizer, trainer.task
                terminals = enumerate_terminals(task.constraints)
                if terminals is not None:
                    row["completions"] = len(terminals)
                    row["forced_s"] = timed(lambda: completion_log_probs(model, tok, task, 0, terminals),
                                            ctx.device, ctx.repeats)
                    row["tree_s"] = timed(lambda: tree_log_probs(model, tok, task, 0), ctx.device, ctx.repeats)
                    forced = completion_log_probs(model, tok, task, 0, terminals)
                    row["tree_max_abs_diff"] = float((tree_log_probs(model, tok, task, 0)[1] - forced).abs().max())
            trainer.close()
        print(f"  first_run {dtype}: step {step_s:.3f}s (K={k})", flush=True)
    row["K"] = k
    row["bf16_over_fp32"] = row["step_s_bfloat16"] / row["step_s_float32"]
    if "tree_s" in row:
        row["tree_over_forced"] = row["tree_s"] / row["forced_s"]
        print(f"  first_run exact evaluation: tree {row['tree_s']:.2f}s, teacher-forced {row['forced_s']:.2f}s "
              f"({row['completions']} completions), max |diff| {row['tree_max_abs_diff']:.1e}", flush=True)
    return row


def markdown(r: dict) -> list[str]:
    lines = [f"Training step (K={r['K']}): fp32 {r['step_s_float32']:.3f} s, bf16 {r['step_s_bfloat16']:.3f} s, "
             f"ratio bf16/fp32 {r['bf16_over_fp32']:.2f} (native bf16: {r['native_bf16']})."]
    if "tree_s" in r:
        lines.append(f"Exact evaluation of {r['completions']} completions: tree {r['tree_s']:.2f} s, teacher-forced "
                     f"{r['forced_s']:.2f} s, ratio {r['tree_over_forced']:.2f}; largest |log-prob difference| "
                     f"{r['tree_max_abs_diff']:.1e}.")
    return [*lines, ""]
