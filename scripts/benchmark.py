"""Benchmarks: shared-prompt prefill, scoring memory, and framework overhead, each against a baseline
measured in the same process and run. Figures are ratios; nothing here is a timed test.

    uv run python scripts/benchmark.py                        # embedded SmolLM2 (4-bit + LoRA), CPU
    uv run python scripts/benchmark.py --sections prefill --ks 16,32 --repeats 3
    uv run python scripts/benchmark.py --model tiny-random --quick   # seconds; what the tests run

Sections:
- prefill: one training step's sampling and scoring (forward + backward) of K completions of one
  prompt, with the prompt computed once and its KV cache shared, against per-sample prefill
  (what `generate(num_return_sequences=K)` and a plain teacher-forced pass do); on the rng chat
  prompt and on a few-shot prompt of >= 200 tokens.
- memory: peak memory of scoring log-probabilities with our selective, chunked log-softmax against
  a full float32 log_softmax over [B, T, V], on a tiny model with a 128k vocabulary.
- overhead: our full step (sample + reward + score + optimiser) against the same batch through raw
  `model.generate`, the reward and one raw forward/backward, and where our step time goes.

Writes benchmark.md, benchmark.json and benchmark.png to --out (default outputs/benchmark/<time>).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

FEW_SHOT = ("You are a random number generator. Each answer is one integer between 0 and 100, chosen uniformly "
            "at random, written with digits only and nothing else.\n\n")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gf_odg.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="main", overrides=overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def long_prompt(tokenizer, min_tokens: int = 200) -> str:
    import random

    rng = random.Random(0)
    text, n = FEW_SHOT, 1
    while len(tokenizer.encode(text)) < min_tokens:
        text += f"Question {n}: give me a random integer between 0 and 100.\nAnswer: {rng.randint(0, 100)}\n\n"
        n += 1
    return text + f"Question {n}: give me a random integer between 0 and 100.\nAnswer:"


OVERRIDES: list[str] = []  # --overrides: Hydra overrides applied to every model this script loads


def load(model_name: str, device: torch.device, extra: list[str] = ()):
    from gf_odg.modelling import load_policy

    cfg = compose([f"model={model_name}", *OVERRIDES, *extra])
    model, tokenizer, _ = load_policy(cfg.model, cfg.paths, device)
    return cfg, model, tokenizer


# ----------------------------------------------------------------------------- prefill
def bench_prefill(model_name: str, device, ks: list[int], repeats: int) -> list[dict]:
    from gf_odg.constraints import ConstraintSet
    from gf_odg.prompts import PromptBatch, render_prompt
    from gf_odg.sampling import sample
    from gf_odg.scoring import score_completions

    cfg, model, tok = load(model_name, device)
    cons = ConstraintSet.from_config({"allowed": "digits", "min_new_tokens": 1}, tok, 4)
    prompts = {
        "rng (chat prompt)": render_prompt(tok, cfg.task.prompts[0], True, None),
        "few-shot (long prompt)": render_prompt(tok, long_prompt(tok), False, None),
    }
    rows = []
    for name, ids in prompts.items():
        batch = PromptBatch.build([ids], [name], tok.pad_token_id, device)
        for k in ks:
            group = torch.zeros(k, dtype=torch.long, device=device)
            traj = sample(model, tok, batch, group, cons, generator=torch.Generator(device=device).manual_seed(0))
            result = {"prompt": name, "prompt_tokens": len(ids), "K": k}
            for share in (True, False):
                def do_sample():
                    sample(model, tok, batch, group, cons, generator=torch.Generator(device=device).manual_seed(0),
                           share_prefill=share)

                def do_score():
                    model.zero_grad(set_to_none=True)
                    lp = score_completions(model, batch, group, traj.tokens, traj.lengths, cons, tok.eos_token_id,
                                           share_prefill=share)
                    lp.total().sum().backward()

                tag = "shared" if share else "per_sample"
                result[f"sample_s_{tag}"] = timed(do_sample, device, repeats)
                result[f"score_s_{tag}"] = timed(do_score, device, repeats)
            result["speedup_sample"] = result["sample_s_per_sample"] / result["sample_s_shared"]
            result["speedup_score"] = result["score_s_per_sample"] / result["score_s_shared"]
            result["speedup_step"] = ((result["sample_s_per_sample"] + result["score_s_per_sample"])
                                      / (result["sample_s_shared"] + result["score_s_shared"]))
            rows.append(result)
            print(f"  prefill {name} K={k}: step x{result['speedup_step']:.1f} "
                  f"(sample x{result['speedup_sample']:.1f}, score x{result['speedup_score']:.1f})", flush=True)
    return rows


# ----------------------------------------------------------------------------- memory
def _memory_child(variant: str, vocab: int, batch: int, width: int, device_name: str) -> dict:
    """Run in a fresh process: peak memory of one log-prob computation + backward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gf_odg.scoring import selective_logprobs

    device = torch.device(device_name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(device)
    tokens = torch.randint(0, vocab, (batch, width), device=device)
    lengths = torch.full((batch,), width, device=device)
    hidden = model.model(input_ids=tokens).last_hidden_state.detach().requires_grad_(True)
    head = model.get_output_embeddings()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _proc_status("VmRSS")
    if variant == "naive":
        logits = head(hidden).float()
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


def bench_memory(device, vocab: int, batch: int, width: int) -> dict:
    out = {"vocab": vocab, "batch": batch, "completion_tokens": width}
    for variant in ("naive", "selective"):
        cmd = [sys.executable, __file__, "--_memory-child", variant, str(vocab), str(batch), str(width), str(device)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out[f"peak_mb_{variant}"] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
    out["ratio"] = out["peak_mb_selective"] / out["peak_mb_naive"]
    print(f"  memory V={vocab} B={batch} T={width}: naive {out['peak_mb_naive']:.0f} MB, "
          f"selective {out['peak_mb_selective']:.0f} MB, ratio {out['ratio']:.3f}", flush=True)
    return out


# ----------------------------------------------------------------------------- overhead
def bench_overhead(model_name: str, device, k: int, repeats: int) -> dict:
    from gf_odg.trainer import Trainer

    cfg = compose([f"model={model_name}", *OVERRIDES, "logger=none", "trainer.progress=false",
                   f"trainer.samples_per_prompt={k}",
                   "exploration=on_policy", "trainer.max_steps=1000", "run_name=benchmark",
                   f"trainer.device={device}", f"paths.checkpoints={ROOT}/outputs/benchmark/tmp",
                   f"paths.adapted_models={ROOT}/outputs/benchmark/tmp"])
    trainer = Trainer(cfg, ROOT / "outputs" / "benchmark" / "run")
    trainer.setup()
    parts: dict[str, list] = {}

    def ours():
        batch = trainer.collect()
        metrics = trainer.train_step(batch)
        for key in ("time/sample", "time/reward", "time/score_backward"):
            parts.setdefault(key, []).append(metrics[key])

    model, tok, task = trainer.model, trainer.tokenizer, trainer.task
    ids = torch.tensor([task.prompt_tokens[0]], device=device)

    def raw():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 num_return_sequences=k, max_new_tokens=task.constraints.max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
        completions = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        task.reward([task.prompts[0]] * k, completions)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=out).logits[:, ids.shape[1] - 1: -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, out[:, ids.shape[1]:].unsqueeze(-1)).sum()
        logp.backward()
        trainer.optimizer.step()

    ours_s = timed(ours, device, repeats)
    raw_s = timed(raw, device, repeats)
    breakdown = {k2: statistics.median(v) for k2, v in parts.items()}
    result = {"K": k, "ours_step_s": ours_s, "raw_step_s": raw_s, "overhead_ratio": ours_s / raw_s, **breakdown}
    print(f"  overhead K={k}: ours {ours_s:.3f}s, raw generate+forward/backward {raw_s:.3f}s, "
          f"ratio {result['overhead_ratio']:.2f}", flush=True)
    return result


# ----------------------------------------------------------------------------- scale
def bench_scale(model_name: str, device, k: int, steps: int, variants: dict[str, list[str]]) -> list[dict]:
    """Per variant (e.g. 4-bit vs bf16): sampled tokens per second, seconds per training step, peak
    GPU memory, over `steps` steps of the rng task after one warm-up step."""
    from gf_odg.trainer import Trainer

    rows = []
    for name, extra in variants.items():
        cfg = compose([f"model={model_name}", *OVERRIDES, *extra, "logger=none", "trainer.progress=false",
                       f"trainer.samples_per_prompt={k}", "trainer.max_steps=1000", "run_name=benchmark-scale",
                       "task.max_new_tokens=16", "task.constraints.allowed=null", f"trainer.device={device}",
                       f"paths.checkpoints={ROOT}/outputs/benchmark/tmp", f"paths.adapted_models={ROOT}/outputs/benchmark/tmp"])
        trainer = Trainer(cfg, ROOT / "outputs" / "benchmark" / "run")
        trainer.setup()
        trainer.train_step(trainer.collect())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sample_s, step_s, tokens = 0.0, 0.0, 0
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            batch = trainer.collect()
            metrics = trainer.train_step(batch)
            sync(device)
            step_s += time.perf_counter() - t0
            sample_s += metrics["time/sample"]
            tokens += int(batch.traj.lengths.sum())
        params = sum(p.numel() for p in trainer.model.parameters())
        row = {"variant": name, "params": params, "K": k, "step_s": step_s / steps, "sample_tokens_per_s": tokens / sample_s,
               "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        rows.append(row)
        print(f"  scale {name}: {row['step_s']:.3f} s/step, {row['sample_tokens_per_s']:.0f} sampled tokens/s, "
              f"peak {row['peak_gpu_gb']} GB", flush=True)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report
def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; model: {report['model']}; {report['date']}", ""]
    if report.get("prefill"):
        lines += ["| prompt | prompt tokens | K | sample shared / per-sample (s) | score+backward shared / "
                  "per-sample (s) | step speed-up |", "|---|---|---|---|---|---|"]
        for r in report["prefill"]:
            lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {r['K']} | {r['sample_s_shared']:.3f} / "
                         f"{r['sample_s_per_sample']:.3f} | {r['score_s_shared']:.3f} / {r['score_s_per_sample']:.3f} |"
                         f" {r['speedup_step']:.1f}x |")
        lines.append("")
    if report.get("memory"):
        m = report["memory"]
        lines += [f"Scoring memory (V={m['vocab']}, B={m['batch']}, T={m['completion_tokens']}): full log_softmax "
                  f"{m['peak_mb_naive']:.0f} MB, selective chunked {m['peak_mb_selective']:.0f} MB, "
                  f"ratio {m['ratio']:.3f}", ""]
    if report.get("scale"):
        lines += ["| variant | parameters | K | s / step | sampled tokens / s | peak GPU memory (GiB) |",
                  "|---|---|---|---|---|---|"]
        for r in report["scale"]:
            peak = f"{r['peak_gpu_gb']:.2f}" if r["peak_gpu_gb"] is not None else "-"
            lines.append(f"| {r['variant']} | {r['params'] / 1e9:.2f} B | {r['K']} | {r['step_s']:.3f} | "
                         f"{r['sample_tokens_per_s']:.0f} | {peak} |")
        lines.append("")
    if report.get("overhead"):
        o = report["overhead"]
        lines += [f"Step (K={o['K']}): ours {o['ours_step_s']:.3f} s (sample {o.get('time/sample', 0):.3f}, reward "
                  f"{o.get('time/reward', 0):.3f}, score+backward+optimiser {o.get('time/score_backward', 0):.3f}); "
                  f"raw generate + reward + forward/backward {o['raw_step_s']:.3f} s; ratio {o['overhead_ratio']:.2f}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.get("prefill") or []
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['prompt'].split(' ')[0]} K={r['K']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["sample_s_per_sample"] + r["score_s_per_sample"] for r in rows], 0.4,
           label="per-sample prefill")
    ax.bar([i + 0.2 for i in x], [r["sample_s_shared"] + r["score_s_shared"] for r in rows], 0.4,
           label="shared prefill")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("sample + score/backward (s)")
    ax.set_title(report["machine"], fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default="prefill,memory,overhead")
    parser.add_argument("--ks", default="16,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-vocab", type=int, default=128256)
    parser.add_argument("--memory-batch", type=int, default=16)
    parser.add_argument("--memory-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--overrides", default="", help="space-separated Hydra overrides for every model loaded")
    parser.add_argument("--scale-steps", type=int, default=5)
    parser.add_argument("--_memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        variant, vocab, batch, width, device = args._memory_child
        torch.set_num_threads(1)
        print(json.dumps(_memory_child(variant, int(vocab), int(batch), int(width), device)))
        return
    torch.set_num_threads(args.threads)
    OVERRIDES.extend(args.overrides.split())
    if args.quick:
        args.ks, args.repeats, args.memory_vocab, args.memory_batch, args.memory_tokens = "4", 1, 4096, 2, 8
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    report = {"machine": machine(), "model": args.model, "date": datetime.now().isoformat(timespec="seconds")}
    print(f"benchmark on {report['machine']}", flush=True)
    if "prefill" in sections:
        report["prefill"] = bench_prefill(args.model, device, ks, args.repeats)
    if "memory" in sections:
        report["memory"] = bench_memory(device, args.memory_vocab, args.memory_batch, args.memory_tokens)
    if "overhead" in sections:
        report["overhead"] = bench_overhead(args.model, device, max(ks), args.repeats)
    if "scale" in sections:
        variants = {"4-bit NF4 + LoRA": ["model.quantization.load_in_4bit=true"],
                    "bf16 + LoRA": ["model.quantization.load_in_4bit=false", "model.dtype=bfloat16"]}
        report["scale"] = bench_scale(args.model, device, max(ks), args.scale_steps, variants)
    out = Path(args.out or ROOT / "outputs" / "benchmark" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (out / "benchmark.md").write_text(markdown(report))
    plot(report, out / "benchmark.png")
    print(markdown(report))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
