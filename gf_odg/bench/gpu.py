"""GPU section: our sampler and scorer against raw Hugging Face generate + forward/backward, on
random-weight models built on the device (no files, no tokenizer, no network).

For each shape (4-bit NF4 where bitsandbytes is importable, else bf16; LoRA r = 16 on the attention
and MLP projections) and each workload (K samples of one prompt of `--prompt-tokens` random tokens:
`free`, 64 new tokens with no mask; `rng`, ten "digit" ids and EOS, at most 3 + EOS), each side is
timed in this one run (median of `--repeats` after a warm-up):

- ours: `sample` + `score_completions` forward/backward + an optimiser step; with the prompt's KV
  cache shared and per sample (the figures behind `share_prompt_prefill=auto`), and the sampler
  with the grown and the static KV cache;
- raw: `model.generate(num_return_sequences=K)` + one forward/backward of the full log-softmax + the
  same optimiser step;
- sampled tokens/s of our sampler, and peak GPU memory of each side.

    python -m gf_odg.bench.gpu --device cuda --out outputs/gpu        # the shapes below, ~8 min on an H100
    python -m gf_odg.bench.gpu --device cpu --tiny                    # seconds: what the tests run

Or `python -m gf_odg.bench gpu` where the bench package's runner is present; `run(ctx)` is its entry.
TRL's GRPO step is the `trl_step` section's (it needs a real model and tokenizer).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from gf_odg.bench.common import sync, timed

# name -> (hidden, intermediate, layers, heads, kv heads); vocabulary 49,152 (the embedded tokenizer's)
SHAPES = {
    "135m": (576, 1536, 30, 9, 3),       # SmolLM2-135M
    "1b": (2048, 8192, 16, 32, 8),       # Llama-3.2-1B
    "8b": (4096, 14336, 32, 32, 8),      # Llama-3-8B
    "tiny": (64, 128, 2, 4, 2),          # --tiny: the CPU smoke test
}
VOCAB = 49152


class _NoText:
    """The sampler decodes texts at the end; random ids have none worth decoding here."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def _peak_gb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def _quantise(model, device: torch.device) -> bool:
    """Swap every decoder Linear for bitsandbytes' NF4 Linear4bit (quantised on the device). False
    when bitsandbytes is missing (the shape then runs in bf16, and the row says so)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                    weight = child.weight.data if device.type == "cuda" else child.weight.data.cpu()
                    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.to(device))
    return True


def build_model(shape: str, device: torch.device, four_bit: bool = True):
    """A random Llama of `shape` on `device`, optionally NF4, with LoRA r = 16 (PEFT)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # random init on the device: seconds, not a file load
    model.config._attn_implementation = "sdpa"
    quantised = four_bit and _quantise(model, device)
    model.requires_grad_(False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    model.eval()
    return model, quantised


def _workloads(k: int, prompt_tokens: int, new_tokens: int, device: torch.device, seed: int = 0):
    from gf_odg.data.constraints import ConstraintSet
    from gf_odg.data.prompts import PromptBatch

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (prompt_tokens,), generator=g).tolist()
    prompts = PromptBatch.build([prompt], ["random"], 0, device)
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[torch.arange(100, 110)] = True  # ten "digit" ids
    allowed[2] = True
    free = ConstraintSet(vocab_size=VOCAB, eos_id=2, max_new_tokens=new_tokens, min_new_tokens=new_tokens - 1)
    rng = ConstraintSet(vocab_size=VOCAB, eos_id=2, max_new_tokens=4, min_new_tokens=1, allowed=allowed)
    return prompts, torch.zeros(k, dtype=torch.long, device=device), {"free": free, "rng": rng}


def measure(model, prompts, group, cons, device: torch.device, repeats: int) -> dict:
    from gf_odg.generation.sampling import sample
    from gf_odg.generation.scoring import score_completions

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    tok = _NoText()
    row: dict = {}

    def draw(share, kv_cache="dynamic"):
        return sample(model, tok, prompts, group, cons, generator=torch.Generator(device=device).manual_seed(0),
                      share_prefill=share, kv_cache=kv_cache)

    traj = draw(True)

    def ours(share, kv_cache="dynamic"):
        def step():
            t = draw(share, kv_cache)
            optimizer.zero_grad(set_to_none=True)
            lp = score_completions(model, prompts, group, t.tokens, t.lengths, cons, cons.eos_id, share_prefill=share)
            lp.total().sum().backward()
            optimizer.step()
        return step

    ids = prompts.input_ids[:1]

    def raw():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 num_return_sequences=len(group), max_new_tokens=cons.max_new_tokens,
                                 min_new_tokens=cons.min_new_tokens, pad_token_id=0, eos_token_id=cons.eos_id)
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=out).logits[:, ids.shape[1] - 1: -1].float()
        torch.log_softmax(logits, -1).gather(-1, out[:, ids.shape[1]:].unsqueeze(-1)).sum().backward()
        optimizer.step()

    for share in (True, False):
        tag = "shared" if share else "per_sample"
        row[f"ours_step_s_{tag}"] = timed(ours(share), device, repeats)
    for kv_cache in ("dynamic", "static"):
        row[f"sample_s_{kv_cache}"] = timed(lambda cache=kv_cache: draw(True, cache), device, repeats)
    row["raw_step_s"] = timed(raw, device, repeats)
    best = min(row["ours_step_s_shared"], row["ours_step_s_per_sample"])
    row["ours_vs_raw"] = best / row["raw_step_s"]
    row["share_speedup"] = row["ours_step_s_per_sample"] / row["ours_step_s_shared"]
    row["static_cache_speedup"] = row["sample_s_dynamic"] / row["sample_s_static"]
    row["sampled_tokens_per_s"] = float(traj.lengths.sum()) / row["sample_s_dynamic"]
    row["peak_gb_ours"] = _peak_gb(ours(True), device)
    row["peak_gb_raw"] = _peak_gb(raw, device)
    row["prompt_tokens"], row["K"], row["max_new_tokens"] = int(prompts.lengths[0]), len(group), cons.max_new_tokens
    row["saved_prompt_tokens"] = (len(group) - 1) * int(prompts.lengths[0])
    return row


def _options(ctx) -> SimpleNamespace:
    opts = vars(getattr(ctx, "options", None) or SimpleNamespace())
    tiny = bool(opts.get("tiny", False))
    shapes = opts.get("gpu_shapes") or ("tiny" if tiny else "135m,1b,8b")
    return SimpleNamespace(
        device=torch.device(str(getattr(ctx, "device", None) or opts.get("device") or
                                ("cuda" if torch.cuda.is_available() else "cpu"))),
        shapes=[s for s in str(shapes).split(",") if s], tiny=tiny,
        k=int(opts.get("gpu_k") or (4 if tiny else 32)),
        prompt_tokens=int(opts.get("gpu_prompt_tokens") or (16 if tiny else 256)),
        new_tokens=int(opts.get("gpu_new_tokens") or (8 if tiny else 64)),
        repeats=int(opts.get("gpu_repeats") or getattr(ctx, "repeats", None) or (1 if tiny else 3)),
        budget_s=float(opts.get("gpu_budget_s") or 480), four_bit=not opts.get("gpu_bf16", False),
    )


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, torch {torch.__version__}"


def run(ctx) -> dict:
    """Every shape x workload row, stopping before a shape that the time budget cannot hold."""
    o = _options(ctx)
    started = time.perf_counter()
    rows, skipped = [], []
    for shape in o.shapes:
        spent = time.perf_counter() - started
        if rows and spent > o.budget_s * 0.5:  # the next (larger) shape would not fit
            skipped.append(f"{shape}: {spent:.0f} s of the {o.budget_s:.0f} s budget spent")
            continue
        t0 = time.perf_counter()
        try:
            model, quantised = build_model(shape, o.device, o.four_bit)
        except torch.OutOfMemoryError as err:
            skipped.append(f"{shape}: out of memory building it ({err})")
            continue
        build_s = time.perf_counter() - t0
        prompts, group, workloads = _workloads(o.k, o.prompt_tokens, o.new_tokens, o.device)
        for name, cons in workloads.items():
            row = {"shape": shape, "workload": name, "weights": "nf4" if quantised else "bf16/fp32",
                   "lora_r": 16, "build_s": build_s, **measure(model, prompts, group, cons, o.device, o.repeats)}
            rows.append(row)
            print(f"  gpu {shape} {name}: ours {row['ours_vs_raw']:.2f}x raw HF, sharing x{row['share_speedup']:.2f}, "
                  f"static cache x{row['static_cache_speedup']:.2f}, {row['sampled_tokens_per_s']:.0f} tok/s",
                  flush=True)
        del model
        if o.device.type == "cuda":
            torch.cuda.empty_cache()
        if getattr(ctx, "out", None):  # after each shape: a timeout keeps what was measured
            write(Path(ctx.out), _result(o, rows, skipped))
    return _result(o, rows, skipped)


def _result(o, rows: list[dict], skipped: list[str]) -> dict:
    return {"machine": _machine(o.device), "rows": rows, "skipped": skipped, "k": o.k,
            "prompt_tokens": o.prompt_tokens, "new_tokens": o.new_tokens, "repeats": o.repeats}


def write(out: Path, result: dict) -> None:
    """gpu.json and gpu.md in `out`, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu.json", json.dumps(result, indent=2)), ("gpu.md", "\n".join(markdown(result)) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def markdown(result: dict) -> list[str]:
    intro = (f"K = {result['k']}, prompt {result['prompt_tokens']} random tokens, median of {result['repeats']} "
             "after a warm-up; random weights, LoRA r = 16. `ours / raw` uses the faster of shared and "
             "per-sample prefill.")
    header = ("| shape | workload | weights | ours / raw | ours shared s | ours per-sample s | raw s | sharing x "
              "| static cache x | sampled tok/s | peak GB ours | peak GB raw |")
    lines = [f"## GPU: ours vs raw HF generate + forward/backward ({result['machine']})", "", intro, "", header,
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def gb(value):
        return f"{value:.2f}" if value is not None else "-"

    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['workload']} | {r['weights']} | {r['ours_vs_raw']:.2f} | "
                     f"{r['ours_step_s_shared']:.3f} | {r['ours_step_s_per_sample']:.3f} | {r['raw_step_s']:.3f} | "
                     f"{r['share_speedup']:.2f} | {r['static_cache_speedup']:.2f} | {r['sampled_tokens_per_s']:.0f} | "
                     f"{gb(r['peak_gb_ours'])} | {gb(r['peak_gb_raw'])} |")
    for s in result["skipped"]:
        lines.append(f"\nSkipped {s}.")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, K=4, 8 tokens: a smoke test")
    parser.add_argument("--gpu-shapes", default=None, help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--gpu-k", type=int, default=None)
    parser.add_argument("--gpu-prompt-tokens", type=int, default=None)
    parser.add_argument("--gpu-new-tokens", type=int, default=None)
    parser.add_argument("--gpu-repeats", type=int, default=None)
    parser.add_argument("--gpu-budget-s", type=float, default=None)
    parser.add_argument("--gpu-bf16", action="store_true", help="no 4-bit quantisation")
    parser.add_argument("--out", default="outputs/gpu")
    args = parser.parse_args(argv)
    result = run(SimpleNamespace(device=args.device, options=args, out=args.out))
    write(Path(args.out), result)
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
