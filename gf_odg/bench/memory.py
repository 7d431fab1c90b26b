"""memory: peak memory of scoring log-probabilities with our selective, chunked log-softmax against
a full float32 log_softmax over [B, T, V], on a one-layer model with a large vocabulary. Each
variant runs in a fresh process (`python -m gf_odg.bench.memory VARIANT V B T DEVICE`), so one
variant's peak cannot hide the other's. Figure: ratio = selective peak / full peak."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from gf_odg.bench.common import Context, child_env

VARIANTS = ("naive", "selective")


def add_arguments(group) -> None:
    group.add_argument("--memory-vocab", type=int, default=128256, help="vocabulary size V (--quick: 4096)")
    group.add_argument("--memory-batch", type=int, default=16, help="completions B (--quick: 2)")
    group.add_argument("--memory-tokens", type=int, default=64, help="completion tokens T (--quick: 8)")


def run(ctx: Context) -> dict:
    o = ctx.options
    vocab, batch, width = (4096, 2, 8) if ctx.quick else (o.memory_vocab, o.memory_batch, o.memory_tokens)
    row = {"vocab": vocab, "batch": batch, "completion_tokens": width}
    for variant in VARIANTS:
        sizes = [str(x) for x in (vocab, batch, width, ctx.device)]
        cmd = [sys.executable, "-m", "gf_odg.bench.memory", variant, *sizes]
        result = subprocess.run(cmd, capture_output=True, text=True, env=child_env(1))
        if result.returncode != 0:
            raise RuntimeError(f"memory benchmark, {variant}: the child process failed:\n{result.stderr[-3000:]}")
        row[f"peak_mb_{variant}"] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
    row["ratio"] = row["peak_mb_selective"] / row["peak_mb_naive"]
    print(f"  memory V={vocab} B={batch} T={width}: naive {row['peak_mb_naive']:.0f} MB, "
          f"selective {row['peak_mb_selective']:.0f} MB, ratio {row['ratio']:.3f}", flush=True)
    return row


def measure(variant: str, vocab: int, batch: int, width: int, device_name: str) -> dict:
    """In this (fresh) process: peak memory above the baseline of one log-prob computation + backward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gf_odg.generation.scoring import selective_logprobs

    device = torch.device(device_name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(device)
    tokens = torch.randint(0, vocab, (batch, width), device=device)  # [B, T]
    lengths = torch.full((batch,), width, device=device)
    hidden = model.model(input_ids=tokens).last_hidden_state.detach().requires_grad_(True)  # [B, T, H]
    head = model.get_output_embeddings()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _proc_status("VmRSS")
    if variant == "naive":
        logits = head(hidden).float()  # [B, T, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        logp.sum().backward()
    else:
        lp = selective_logprobs(head, config, hidden, tokens, lengths, None, eos_id=0, chunk_rows=128)
        lp.total().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _proc_status("VmHWM") - before
    return {"variant": variant, "peak_bytes": int(peak)}


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def markdown(m: dict) -> list[str]:
    return [f"Scoring memory (V={m['vocab']}, B={m['batch']}, T={m['completion_tokens']}): full log_softmax "
            f"{m['peak_mb_naive']:.0f} MB, selective chunked {m['peak_mb_selective']:.0f} MB, "
            f"ratio {m['ratio']:.3f}", ""]


if __name__ == "__main__":  # the child process of run()
    torch.set_num_threads(1)
    if len(sys.argv) != 6 or sys.argv[1] not in VARIANTS:
        raise SystemExit("usage: python -m gf_odg.bench.memory {naive,selective} VOCAB BATCH TOKENS DEVICE")
    variant, vocab, batch, width, device = sys.argv[1:]
    print(json.dumps(measure(variant, int(vocab), int(batch), int(width), device)))
