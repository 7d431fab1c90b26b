"""Benchmarks: shared-prompt prefill, scoring memory, and framework overhead, each against a baseline
measured in the same process and run. Figures are ratios; nothing here is a timed test.

    uv run python scripts/benchmark.py                        # embedded SmolLM2 (4-bit + LoRA), CPU
    uv run python scripts/benchmark.py --sections prefill --ks 16,32 --repeats 3
    uv run python scripts/benchmark.py --model tiny-random --quick   # seconds; what the tests run
    uv run python scripts/benchmark.py --sections trl_step --ks 16,32
    uv run python scripts/benchmark.py --sections quality --quality-tasks rng --quality-steps rng=100
    uv run python scripts/benchmark.py --sections quality --quality-tasks keywords --quality-budget time --quality-curve 2
    uv run python scripts/benchmark.py --quality-from outputs/benchmark/A/benchmark.json outputs/benchmark/B/benchmark.json

Sections:
- prefill: one training step's sampling and scoring (forward + backward) of K completions of one
  prompt, with the prompt computed once and its KV cache shared, against per-sample prefill
  (what `generate(num_return_sequences=K)` and a plain teacher-forced pass do); on the rng chat
  prompt and on a few-shot prompt of >= 200 tokens.
- memory: peak memory of scoring log-probabilities with our selective, chunked log-softmax against
  a full float32 log_softmax over [B, T, V], on a tiny model with a 128k vocabulary.
- overhead: our full step (sample + reward + score + optimiser) against the same batch through raw
  `model.generate`, the reward and one raw forward/backward, and where our step time goes.
- sharding (not in the default sections): the same training with full-precision weights + LoRA
  launched data parallel (configs/accelerate/ddp.yaml) and FSDP-sharded (configs/accelerate/fsdp.yaml),
  `--shard-processes` processes each: parameter memory held per process, peak memory, seconds per
  step, loss and gradient norm (which should agree between the two).
- trl_step: our training step (TB) against one optimiser step of TRL's GRPOTrainer on the same batch:
  the rng chat prompt, K = num_generations completions, the same max new tokens, model load and
  LoRA, no reference model on either side (GRPO beta = 0), both in this process, median after a
  warm-up step. Ours is timed under the rng constraint mask and without it (TRL samples unmasked).
- quality: on rng and keywords, the base model, our tb / vargrad / rloo and TRL GRPO trained for
  the same number of steps on the same prompts and batch, evaluated by gf_odg.evaluation.core on the
  same samples: score, validity, distinct high-reward completions, semantic diversity, KL to the
  target (rng, sampled and exact), seconds per step (`--quality-steps rng=100,keywords=20`, or
  `keywords=40,keywords.grpo=14` for a method's own step count,
  `--quality-eval`, `--quality-methods`, `--quality-overrides`). GRPO's LoRA is evaluated in
  memory by the same code (`gf_odg/grpo_baseline.py` says how GRPO is set up).
  `--quality-budget time`: GRPO trains its steps first and every other method gets the same
  training seconds (as many steps as fit at its own probed step time). `--quality-curve N`: also
  evaluate every N steps; with GRPO's path, each of our methods is compared with GRPO at the same
  mean score (its distinct high-reward count where GRPO's path crosses our final score; every
  crossing). `--quality-curve-at 8,10,12`: evaluate at those steps. `--quality-jobs 2`: up to 2
  methods at once, each in its own process with --threads threads (the same rows as one process
  running them in turn). `--quality-from A/benchmark.json B/benchmark.json`: no training, the quality
  rows of earlier runs in one table, matched against the one GRPO path among them (a variant
  measured later against a GRPO run measured once; same --quality-eval required).

Writes benchmark.md, benchmark.json and benchmark*.png to --out (default outputs/benchmark/<time>).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gf_odg.io.tracking import jsonable  # noqa: E402

FEW_SHOT = ("You are a random number generator. Each answer is one integer between 0 and 100, chosen uniformly "
            "at random, written with digits only and nothing else.\n\n")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gf_odg.config.schema import register_configs

    from hydra.errors import HydraException

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        try:
            return hydra_compose(config_name="main", overrides=overrides)
        except HydraException as err:  # a mistyped --overrides / --quality-overrides: one line, not a traceback
            raise SystemExit(f"config: {err} (overrides: {' '.join(overrides)})") from None


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
    from gf_odg.model.loading import load_policy

    cfg = compose([f"model={model_name}", *OVERRIDES, *extra])
    model, tokenizer, _ = load_policy(cfg.model, cfg.paths, device)
    return cfg, model, tokenizer


# ----------------------------------------------------------------------------- prefill
def bench_prefill(model_name: str, device, ks: list[int], repeats: int) -> list[dict]:
    from gf_odg.data.constraints import ConstraintSet
    from gf_odg.data.prompts import PromptBatch, render_prompt
    from gf_odg.generation.sampling import sample
    from gf_odg.generation.scoring import score_completions

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

    from gf_odg.generation.scoring import selective_logprobs

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
    from gf_odg.training.trainer import Trainer

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
    from gf_odg.training.trainer import Trainer

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


# ----------------------------------------------------------------------------- sharding
def _shard_child(spec: dict) -> None:
    """One process of bench_sharding, under `accelerate launch`: set up the trainer, run a warm-up
    step and `steps` timed steps, print this process's figures as one `SHARD {json}` line."""
    import resource
    import tempfile

    from torch.distributed.tensor import DTensor

    from gf_odg.training.trainer import Trainer

    local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="gfodg-shard-") as tmpdir:
        cfg = compose([f"model={spec['model']}", *spec["overrides"], "logger=none", "trainer.progress=false",
                       "trainer.threads=1", f"trainer.samples_per_prompt={spec['k']}", "trainer.max_steps=1000",
                       "run_name=benchmark-shard", f"paths.checkpoints={tmpdir}/c", f"paths.adapted_models={tmpdir}/a"])
        trainer = Trainer(cfg, Path(tmpdir) / "run")
        trainer.setup()
        cuda = trainer.device.type == "cuda"
        held = sum(local(p).numel() * local(p).element_size() for p in trainer.model.parameters())
        trainer.step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, metrics = [], {}
        for _ in range(spec["steps"]):
            sync(trainer.device)
            t0 = time.perf_counter()
            metrics = trainer.step()
            sync(trainer.device)
            times.append(time.perf_counter() - t0)
        row = {"rank": trainer.dist.rank, "world_size": trainer.dist.world_size, "sharded": trainer.dist.sharded,
               "param_mb_held": held / 2**20, "step_s": statistics.median(times), "loss": metrics["loss"],
               "grad_norm": metrics["grad_norm"],
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        trainer.close()
    print("SHARD " + json.dumps(row), flush=True)


def bench_sharding(model_name: str, device, k: int, steps: int, processes: int) -> list[dict]:
    """The same training (full-precision weights + LoRA) launched data parallel (configs/accelerate/ddp.yaml)
    and with the decoder layers sharded (configs/accelerate/fsdp.yaml), `processes` processes each: parameter
    memory each process holds after sharding, peak memory, seconds per step, and the first process's
    loss and gradient norm after the same steps (they should agree: the same computation)."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    overrides = [*OVERRIDES, "model.quantization.load_in_4bit=false", f"model.dtype={dtype}"]
    rows = []
    for name in ("ddp", "fsdp"):
        spec = {"model": model_name, "overrides": overrides, "k": k, "steps": steps}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{name}.yaml"),
               "--num_processes", str(processes), str(Path(__file__).resolve()), "--_shard-child", json.dumps(spec)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"sharding benchmark, {name}.yaml: the launch failed:\n{result.stderr[-3000:]}")
        ranks = sorted((json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("SHARD ")),
                       key=lambda r: r["rank"])
        first = ranks[0]
        row = {"launch": f"{name}.yaml", "processes": len(ranks), "dtype": dtype, "K": k,
               "sharded": first["sharded"], "param_mb_held": max(r["param_mb_held"] for r in ranks),
               "peak_gpu_mb": first["peak_gpu_mb"] and max(r["peak_gpu_mb"] for r in ranks),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "step_s": max(r["step_s"] for r in ranks),
               "loss_rank0": first["loss"], "grad_norm": first["grad_norm"]}
        rows.append(row)
        print(f"  sharding {name}: {row['param_mb_held']:.0f} MB of parameters per process, "
              f"{row['step_s']:.2f} s/step, grad norm {row['grad_norm']:.4f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- trl_step
def _our_trainer(model_name: str, device, extra: list[str], tmp: Path):
    from gf_odg.training.trainer import Trainer

    cfg = compose([f"model={model_name}", *OVERRIDES, "logger=none", "trainer.progress=false",
                   "trainer.max_steps=100000", "run_name=benchmark-trl", f"trainer.device={device}",
                   f"paths.checkpoints={tmp}/checkpoints", f"paths.adapted_models={tmp}/adapted", *extra])
    trainer = Trainer(cfg, tmp / "run")
    trainer.setup()
    return trainer


def _time_ours(trainer, repeats: int) -> tuple[float, float]:
    """Median seconds of one step (sample + reward + score/backward + optimiser) after a warm-up
    step, and the mean completion length (tokens, EOS included) over the timed steps."""
    times, lengths = [], []
    for i in range(repeats + 1):
        sync(trainer.device)
        t0 = time.perf_counter()
        trainer.step()
        batch = trainer.last_batch
        sync(trainer.device)
        if i:
            times.append(time.perf_counter() - t0)
            lengths += batch.traj.lengths.tolist()
    return statistics.median(times), statistics.fmean(lengths)


def _time_trl(model_name: str, device, k: int, repeats: int, tmp: Path,
              lora_fp32: bool = True) -> tuple[float, float, dict]:
    """Median seconds of one GRPOTrainer optimiser step (generate, reward, forward/backward,
    optimiser) after a warm-up step, on the rng chat prompt with K = num_generations."""
    from gf_odg.baselines.grpo import build_grpo_trainer, grpo_args
    from gf_odg.data.tasks import build_task

    cfg, model, tok = load(model_name, device, [f"trainer.device={device}"])
    task = build_task(cfg.task, tok, cfg.model.chat_template, cfg.paths.root)
    args = grpo_args(tmp / "trl", k=k, prompts_per_step=1, max_new_tokens=task.constraints.max_new_tokens,
                     max_steps=repeats + 1, lr=cfg.trainer.lr, grad_clip=cfg.trainer.grad_clip, seed=cfg.seed,
                     device=device)
    trainer, reward, timer, info = build_grpo_trainer(model, tok, task, args, cfg.objective.log_reward_min, lora_fp32)
    trainer.train()
    lengths = [n for call in reward.calls[1:] for n in (call["lengths"] or [])]
    info["trl_valid_fraction"] = statistics.fmean(
        math.isfinite(s) for call in reward.calls[1:] for s in call["scores"]) if reward.calls[1:] else math.nan
    del trainer, model
    return statistics.median(timer.times[1:]), statistics.fmean(lengths) if lengths else math.nan, info


def bench_trl_step(model_name: str, device, ks: list[int], repeats: int) -> list[dict]:
    """Our training step against one TRL GRPOTrainer optimiser step on the same batch: the rng chat
    prompt, K completions, the same max new tokens, model load (4-bit + LoRA as the model config
    says), LoRA, learning rate and clipping, no reference model on either side (TB with
    ref_weight = 0; GRPO with beta = 0). Ours is timed twice: on the rng task as trained (under its
    constraint mask: digits, EOS after at most 3) and without the mask (free tokens, the work TRL does)."""
    import tempfile

    rows = []
    for k in ks:
        with tempfile.TemporaryDirectory(prefix="gfodg-trl-step-") as tmpdir:
            tmp = Path(tmpdir)
            row: dict = {"prompt": "rng (chat prompt)", "K": k, "objective": "tb", "repeats": repeats}
            common = [f"trainer.samples_per_prompt={k}", "exploration=on_policy", "objective=tb"]
            for tag, extra in (("masked", []), ("unmasked", ["task.constraints.allowed=null"])):
                trainer = _our_trainer(model_name, device, common + extra, tmp / tag)
                row["prompt_tokens"] = len(trainer.task.prompt_tokens[0])
                row["max_new_tokens"] = trainer.task.constraints.max_new_tokens
                row["lora"] = {"r": trainer.cfg.model.lora.r, "alpha": trainer.cfg.model.lora.alpha,
                               "targets": list(trainer.cfg.model.lora.target_modules),
                               "load_in_4bit": bool(trainer.cfg.model.quantization.load_in_4bit)}
                row[f"ours_{tag}_step_s"], row[f"ours_{tag}_length_mean"] = _time_ours(trainer, repeats)
                del trainer
            row["trl_step_s"], row["trl_length_mean"], info = _time_trl(model_name, device, k, repeats, tmp)
            row.update(info)
            row["ratio_masked"] = row["ours_masked_step_s"] / row["trl_step_s"]
            row["ratio_unmasked"] = row["ours_unmasked_step_s"] / row["trl_step_s"]
        rows.append(row)
        print(f"  trl_step K={k}: ours {row['ours_masked_step_s']:.3f}s masked / {row['ours_unmasked_step_s']:.3f}s "
              f"unmasked, TRL GRPO {row['trl_step_s']:.3f}s; ratio {row['ratio_masked']:.2f} / "
              f"{row['ratio_unmasked']:.2f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- quality
QUALITY_TASKS = {
    # task -> (Hydra overrides for every method, threshold of a "high-reward" completion)
    # rng: every valid integer scores log(1/101), so the high-reward completions are the valid ones.
    "rng": (["experiment=rng_tb"], math.log(1 / 101) - 1e-6),
    # keywords: 4 x fraction of the concepts + length band + 0.5 x fluency; 2.0 needs, e.g., all four
    # concepts at a fluency above -4 nats per token, or three at one above -2.
    "keywords": (["experiment=keywords"], 2.0),
}
QUALITY_METHODS = ("base", "tb", "vargrad", "rloo", "grpo")
QUALITY_METRICS = ("score", "validity", "unique_fraction", "distinct_n", "semantic_diversity", "above_threshold",
                   "above_threshold_by_meaning", "modes", "exact")
SAMPLES_DIR: Path | None = None  # where each quality evaluation's completions go (one .jsonl each); None: nowhere


def _save_samples(task, samples, label: str) -> None:
    """The evaluated completions (prompt, completion, score, mode) as SAMPLES_DIR/<label>.jsonl, whole or not at all."""
    if SAMPLES_DIR is None:
        return
    from gf_odg.evaluation.core import sample_rows

    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    tmp = SAMPLES_DIR / f"{label}.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as out:
        for row in sample_rows(task, samples):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(SAMPLES_DIR / f"{label}.jsonl")


def _evaluate_policy(model, tok, task, n: int, threshold: float, seed: int, batch_size: int,
                     label: str | None = None) -> dict:
    from gf_odg.evaluation.core import evaluate_decodings, POLICY

    model.eval()
    order = [i % len(task.records) for i in range(n)]
    result, samples = evaluate_decodings(model, tok, task, order, [POLICY], QUALITY_METRICS, batch_size, beta=1.0,
                                         seed=seed, threshold=threshold)[POLICY.name]
    from collections import Counter

    result["top_completions"] = Counter(samples.texts).most_common(5)  # what a collapsed policy writes
    if label:
        _save_samples(task, samples, label)
    return result


def _unmasked_task(cfg, tok):
    """The task with its `allowed` mask off (free tokens, same max length and stop rules): what an
    unconstrained sampler, TRL's, emits on its own."""
    from omegaconf import OmegaConf

    from gf_odg.data.tasks import build_task

    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task_cfg["constraints"] = {k: v for k, v in task_cfg["constraints"].items() if k != "allowed"}
    return build_task(OmegaConf.create(task_cfg), tok, cfg.model.chat_template, cfg.paths.root)


CURVE_KEYS = ("score_mean", "valid_fraction", "n_above_threshold", "n_above_threshold_by_meaning", "unique_fraction",
              "semantic_diversity", "exact_kl", "kl_to_target")


def _curve_point(model, tok, task, n: int, threshold: float, seed: int, batch_size: int, step: int,
                 label: str | None = None) -> dict:
    """The policy's metrics at `step`, mid-training: the same evaluation as the final one, with the
    global RNG state and the train/eval mode put back afterwards (training continues unperturbed)."""
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        e = _evaluate_policy(model, tok, task, n, threshold, seed, batch_size,
                             f"{label}-step{step:04d}" if label else None)
    model.train(was_training)
    return {"step": step, **{k: e.get(k) for k in CURVE_KEYS}}


def _grpo_curve_callback(tok, task, n: int, threshold: float, seed: int, batch_size: int, at_step,
                         points: list[dict], label: str | None = None):
    from transformers import TrainerCallback

    class _Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if at_step(state.global_step) and state.global_step < state.max_steps:
                points.append(_curve_point(model, tok, task, n, threshold, seed, batch_size, state.global_step,
                                           label))

    return _Curve()


def _probe_step_s(model_name: str, device, overrides: list[str], steps: int = 3) -> float:
    """Median seconds of one of our steps after a warm-up step (a throwaway trainer)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gfodg-probe-") as tmpdir:
        trainer = _our_trainer(model_name, device, [*overrides, f"trainer.max_steps={steps + 1}"], Path(tmpdir))
        step_s, _ = _time_ours(trainer, steps)
        del trainer
    return step_s


def bench_quality(model_name: str, device, tasks: list[str], steps: dict[str, int], n_eval: dict[str, int],
                  methods: list[str], extra: list[str] = (), budget: str = "steps", curve_every: int = 0,
                  curve_methods: tuple[str, ...] = ("tb", "vargrad", "rloo", "grpo"), curve_at: tuple[int, ...] = (),
                  jobs: int = 1, threads: int = 1) -> list[dict]:
    """Per task, each method trained on the same prompts and batch (K per prompt, prompts per step,
    learning rate and schedule of the task's experiment config), then evaluated by gf_odg.evaluation.core
    on the same n samples from the same seed, under the task's constraint mask. `grpo` is TRL's
    GRPOTrainer on the same model load, LoRA and reward (sampling without our mask); `base` the
    untrained model.

    budget "steps": every trained method takes `steps[task]` steps. budget "time": GRPO runs first for
    `steps[task]` steps and the seconds its steps took are the budget; each of our methods then takes
    as many steps as fit in it at its own step time (probed on a throwaway trainer: median of 3 after
    a warm-up), so the learning-rate schedule runs to its end on both sides.
    curve_every > 0: each trained method in `curve_methods` is also evaluated every that many steps
    (same samples count and seed), which gives the score-diversity path of training and, for GRPO,
    the matched-score comparison; curve_at: evaluate at exactly these steps (as well).
    jobs > 1: each (task, method) trains and evaluates in its own process (`threads` torch threads
    each), at most `jobs` at a time; every method seeds itself, so the rows are those of one process
    running them in turn (up to floating-point summation order)."""
    import tempfile

    from gf_odg.baselines.grpo import build_grpo_trainer, grpo_args
    from gf_odg.training.trainer import build_policy_and_task, seed_everything

    if budget not in ("steps", "time"):
        raise SystemExit(f"--quality-budget must be 'steps' or 'time', got {budget!r}")
    if budget == "time":
        if "grpo" not in methods:
            raise SystemExit("--quality-budget time takes its budget from GRPO's run: add grpo to --quality-methods")
        methods = ["grpo", *[m for m in methods if m != "grpo"]]
    if jobs > 1:
        if budget == "time":
            raise SystemExit("--quality-jobs > 1 needs --quality-budget steps (a time budget comes from GRPO's run first)")
        rows = _quality_in_processes(model_name, device, tasks, steps, n_eval, methods, list(extra), curve_every,
                                     curve_methods, curve_at, jobs, threads)
        matched_score(rows)
        return rows

    def at_step(step: int) -> bool:
        return bool(curve_every and step % curve_every == 0) or step in curve_at

    rows = []
    for task_name in tasks:
        task_overrides, threshold = QUALITY_TASKS[task_name]
        n = n_eval[task_name]
        budget_s = None
        for method in methods:
            objective = {"grpo": "rloo", "base": "tb"}.get(method, method)
            base_overrides = [*task_overrides, f"objective={objective}", *extra]
            if objective == "rloo":  # a pure maximiser of the score: no p_ref in its reward, no reference pass
                base_overrides.append("objective.ref_weight=0")
            n_steps = steps.get(f"{task_name}.{method}", steps[task_name])
            row: dict = {"task": task_name, "method": method, "eval_samples": n, "threshold": threshold,
                         "budget": budget}
            if budget == "time" and method in ("tb", "vargrad", "rloo"):
                row["probe_step_s"] = _probe_step_s(model_name, device, base_overrides)
                row["budget_s"] = budget_s
                n_steps = max(1, int(budget_s // row["probe_step_s"]))
                print(f"  quality {task_name} {method}: {row['probe_step_s']:.2f} s/step probed -> {n_steps} steps "
                      f"in {budget_s:.0f} s", flush=True)
            row["steps"] = n_steps if method != "base" else 0
            overrides = [*base_overrides, f"trainer.max_steps={n_steps}"]
            curve: list[dict] = []
            label = f"{task_name}-{method}"  # the samples files: <label>-step<N>.jsonl
            every = method in curve_methods and bool(curve_every or curve_at)
            with tempfile.TemporaryDirectory(prefix=f"gfodg-quality-{task_name}-{method}-") as tmpdir:
                tmp = Path(tmpdir)
                t_start = time.perf_counter()
                curve_s = 0.0
                if method in ("tb", "vargrad", "rloo"):
                    trainer = _our_trainer(model_name, device, overrides, tmp)
                    cfg, model, tok, task = trainer.cfg, trainer.model, trainer.tokenizer, trainer.task
                    times, valid = [], []
                    while trainer.global_step < cfg.trainer.max_steps:
                        t0 = time.perf_counter()
                        metrics = trainer.step()
                        batch = trainer.last_batch
                        times.append(time.perf_counter() - t0)
                        valid.append(metrics["reward/valid_fraction"])
                        if every and at_step(trainer.global_step) and trainer.global_step < cfg.trainer.max_steps:
                            t0 = time.perf_counter()
                            curve.append(_curve_point(model, tok, task, n, threshold, cfg.seed + 1000,
                                                      cfg.task.evaluation.batch_size, trainer.global_step, label))
                            curve_s += time.perf_counter() - t0
                    row["train_valid_fraction"] = statistics.fmean(valid[-10:])
                    row["sampled_with_constraint_mask"] = True
                else:
                    cfg = compose([f"model={model_name}", *OVERRIDES, f"trainer.device={device}", *overrides])
                    seed_everything(cfg.seed)
                    _, model, tok, _, task = build_policy_and_task(cfg, device)
                    times = []
                    if method == "grpo":
                        t = cfg.trainer
                        args = grpo_args(tmp / "trl", k=t.samples_per_prompt, prompts_per_step=t.prompts_per_step,
                                         max_new_tokens=task.constraints.max_new_tokens, max_steps=t.max_steps,
                                         lr=t.lr, warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule,
                                         min_lr_ratio=t.min_lr_ratio, grad_clip=t.grad_clip, seed=cfg.seed,
                                         device=device)
                        trainer, trl_reward, timer, info = build_grpo_trainer(model, tok, task, args,
                                                                              cfg.objective.log_reward_min)
                        if every:  # after the timer: evaluation time is not step time
                            trainer.add_callback(_grpo_curve_callback(tok, task, n, threshold, cfg.seed + 1000,
                                                                      cfg.task.evaluation.batch_size, at_step, curve,
                                                                      label))
                        trainer.train()
                        times = timer.times
                        row.update(info)
                        last = [s for call in trl_reward.calls[-10:] for s in call["scores"]]
                        row["train_valid_fraction"] = statistics.fmean(math.isfinite(s) for s in last)
                        row["sampled_with_constraint_mask"] = False
                        model = trainer.model
                        del trainer
                        if budget == "time":
                            budget_s = sum(times)
                row["train_s"] = time.perf_counter() - t_start
                row["train_step_s_total"] = sum(times)
                row["step_s"] = statistics.median(times) if times else None
                row["step_s_mean"] = statistics.fmean(times) if times else None
                row["K"], row["prompts_per_step"] = cfg.trainer.samples_per_prompt, cfg.trainer.prompts_per_step
                t0 = time.perf_counter()
                row["eval"] = _evaluate_policy(model, tok, task, n, threshold, cfg.seed + 1000,
                                               cfg.task.evaluation.batch_size, f"{label}-step{row['steps']:04d}")
                if every and method != "base":
                    row["curve"] = [*curve, {"step": row["steps"], **{k: row["eval"].get(k) for k in CURVE_KEYS}}]
                    row["curve_eval_s"] = curve_s
                if task_name == "rng":  # the same policy without the mask: what it writes on its own
                    free = _unmasked_task(cfg, tok)
                    free_eval = _evaluate_policy(model, tok, free, n, threshold, cfg.seed + 1000,
                                                 cfg.task.evaluation.batch_size)
                    row["eval_unmasked"] = {k: free_eval.get(k) for k in ("valid_fraction", "distinct", "kl_to_target",
                                                                          "n_above_threshold", "score_mean")}
                row["eval_s"] = time.perf_counter() - t0
                del model
            rows.append(row)
            e = row["eval"]
            print(f"  quality {task_name} {method}: {row['steps']} steps, score {e.get('score_mean', math.nan):.3f}, "
                  f"valid {e.get('valid_fraction', math.nan):.3f}, distinct high-reward {e.get('n_above_threshold')}, "
                  f"semantic diversity {e.get('semantic_diversity', math.nan):.3f}, exact KL {e.get('exact_kl', '-')}, "
                  f"{row['step_s'] or 0:.2f} s/step", flush=True)
    matched_score(rows)
    return rows


def _quality_in_processes(model_name: str, device, tasks: list[str], steps: dict[str, int], n_eval: dict[str, int],
                          methods: list[str], extra: list[str], curve_every: int, curve_methods: tuple[str, ...],
                          curve_at: tuple[int, ...], jobs: int, threads: int) -> list[dict]:
    """bench_quality's rows, each (task, method) in a child process of this script, `jobs` at a time."""
    import tempfile

    work = [(t, m) for t in tasks for m in methods]
    rows: dict[tuple[str, str], list[dict]] = {}
    running: list[tuple[tuple[str, str], subprocess.Popen, Path]] = []
    with tempfile.TemporaryDirectory(prefix="gfodg-quality-jobs-") as tmpdir:
        def reap(block: bool) -> None:
            for item in list(running):
                key, proc, out = item
                if block or proc.poll() is not None:
                    if proc.wait() != 0:
                        for _, other, _ in running:
                            other.kill()
                        raise SystemExit(f"quality {key[0]} {key[1]}: its process exited with {proc.returncode} "
                                         "(its output is above)")
                    rows[key] = json.loads(out.read_text())
                    running.remove(item)
                    return

        for key in work:
            while len(running) >= jobs:
                reap(block=False)
                if len(running) >= jobs:
                    time.sleep(1.0)
            out = Path(tmpdir) / f"{key[0]}-{key[1]}.json"
            spec = {"model": model_name, "device": str(device), "task": key[0], "method": key[1], "steps": steps,
                    "n_eval": n_eval, "extra": extra, "curve_every": curve_every, "curve_methods": list(curve_methods),
                    "curve_at": list(curve_at), "threads": threads, "overrides": OVERRIDES, "out": str(out),
                    "samples_dir": str(SAMPLES_DIR) if SAMPLES_DIR else None}
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_quality-child", json.dumps(spec)])
            running.append((key, proc, out))
        while running:
            reap(block=True)
    return [row for key in work for row in rows[key]]


def _quality_child(spec: dict) -> None:
    global SAMPLES_DIR
    OVERRIDES.extend(spec["overrides"])
    SAMPLES_DIR = Path(spec["samples_dir"]) if spec.get("samples_dir") else None
    rows = bench_quality(spec["model"], torch.device(spec["device"]), [spec["task"]], spec["steps"], spec["n_eval"],
                         [spec["method"]], spec["extra"], "steps", spec["curve_every"], tuple(spec["curve_methods"]),
                         tuple(spec["curve_at"]))
    Path(spec["out"]).write_text(json.dumps(jsonable(rows)))


MEANING = "n_above_threshold_by_meaning"


def _by_meaning(ours, theirs) -> dict:
    """GRPO's by-meaning count and our ratio to it; nothing where either side lacks the count (a report
    from before the metric existed)."""
    if ours is None or theirs is None:
        return {}
    return {"grpo_n_above_threshold_by_meaning": theirs, "ratio_by_meaning": ours / theirs if theirs else math.inf}


def matched_score(rows: list[dict]) -> None:
    """For each of our trained methods, GRPO's distinct high-reward count at the same mean score,
    read off GRPO's training path (the base model as step 0, its curve points, its final policy) by
    linear interpolation in the score between two consecutive points that bracket ours. Every
    crossing is kept in row["matched_all"] (a path that rises and then falls, as GRPO's does once it
    collapses, crosses a score twice); row["matched"] is the first. Where our score lies above GRPO's
    whole path, row["above_grpo_path"] holds GRPO's best-scoring point (the nearest in score; its
    distinct high-reward count there), with our score higher: the comparison the matched one would
    have been, had GRPO got that far. Where ours lies below the whole path, nothing."""
    for task in dict.fromkeys(r["task"] for r in rows):
        grpo = next((r for r in rows if r["task"] == task and r["method"] == "grpo" and r.get("curve")), None)
        if grpo is None:
            continue
        base = next((r for r in rows if r["task"] == task and r["method"] == "base"), None)
        path = ([{"step": 0, **{k: base["eval"].get(k) for k in CURVE_KEYS}}] if base else []) + grpo["curve"]
        scores = [p["score_mean"] for p in path]
        if max(scores) - min(scores) < 1e-6:  # no score signal to match on (rng: every valid integer scores alike)
            continue
        for r in rows:
            if r["task"] != task or r["method"] in ("grpo", "base"):
                continue
            score, ours = r["eval"].get("score_mean"), r["eval"].get("n_above_threshold")
            ours_meaning = r["eval"].get(MEANING)
            crossings = []
            for a, b in zip(path, path[1:]):
                lo, hi = sorted((a["score_mean"], b["score_mean"]))
                if lo <= score <= hi:
                    w = 0.0 if hi == lo else (score - a["score_mean"]) / (b["score_mean"] - a["score_mean"])
                    theirs = a["n_above_threshold"] + w * (b["n_above_threshold"] - a["n_above_threshold"])
                    sem = a["semantic_diversity"] + w * (b["semantic_diversity"] - a["semantic_diversity"])
                    meaning = (None if a.get(MEANING) is None or b.get(MEANING) is None
                               else a[MEANING] + w * (b[MEANING] - a[MEANING]))
                    crossings.append({"score": score, "grpo_steps": [a["step"], b["step"]],
                                      "grpo_n_above_threshold": theirs, "grpo_semantic_diversity": sem,
                                      "ratio": ours / theirs if theirs else math.inf,
                                      **_by_meaning(ours_meaning, meaning)})
            if crossings:
                r["matched"], r["matched_all"] = crossings[0], crossings
            elif score > max(scores):
                best = max(path, key=lambda p: p["score_mean"])
                theirs = best["n_above_threshold"]
                r["above_grpo_path"] = {"score": score, "grpo_score": best["score_mean"], "grpo_step": best["step"],
                                        "grpo_n_above_threshold": theirs,
                                        "grpo_semantic_diversity": best["semantic_diversity"],
                                        "ratio": ours / theirs if theirs else math.inf,
                                        **_by_meaning(ours_meaning, best.get(MEANING))}


# ----------------------------------------------------------------------------- report
def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, then a blank line."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


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
    if report.get("trl_step"):
        lines += ["Our step against TRL GRPOTrainer's on the same batch (rng chat prompt, ours: TB; GRPO: beta = 0; "
                  "median of the timed steps after a warm-up; TRL samples without our constraint mask):", ""]
        lines += _table(["K", "prompt tokens", "max new tokens", "ours, masked (s)", "ours, unmasked (s)",
                         "TRL GRPO (s)", "ratio ours/TRL masked", "unmasked", "mean length ours masked / unmasked / TRL"],
                        [[r["K"], r["prompt_tokens"], r["max_new_tokens"], f"{r['ours_masked_step_s']:.3f}",
                          f"{r['ours_unmasked_step_s']:.3f}", f"{r['trl_step_s']:.3f}", f"{r['ratio_masked']:.2f}x",
                          f"{r['ratio_unmasked']:.2f}x", f"{r['ours_masked_length_mean']:.2f} / "
                          f"{r['ours_unmasked_length_mean']:.2f} / {r['trl_length_mean']:.2f}"] for r in report["trl_step"]])
    if report.get("sharding"):
        lines += _table(["launch", "processes", "dtype", "K", "parameter MB held per process", "peak GPU MB",
                         "peak RSS MB", "s / step", "loss (rank 0)", "grad norm"],
                        [[r["launch"], r["processes"], r["dtype"], r["K"], f"{r['param_mb_held']:.0f}",
                          _num(r["peak_gpu_mb"], ".0f"), f"{r['peak_rss_mb']:.0f}", f"{r['step_s']:.2f}",
                          f"{r['loss_rank0']:.4f}", f"{r['grad_norm']:.4f}"] for r in report["sharding"]])
    if report.get("quality"):
        lines += quality_table(report["quality"])
    if report.get("overhead"):
        o = report["overhead"]
        lines += [f"Step (K={o['K']}): ours {o['ours_step_s']:.3f} s (sample {o.get('time/sample', 0):.3f}, reward "
                  f"{o.get('time/reward', 0):.3f}, score+backward+optimiser {o.get('time/score_backward', 0):.3f}); "
                  f"raw generate + reward + forward/backward {o['raw_step_s']:.3f} s; ratio {o['overhead_ratio']:.2f}"]
    return "\n".join(lines) + "\n"


def _num(value, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else str(value)
    return format(value, fmt) if isinstance(value, float) else str(value)


def _meaning_cells(row: dict, match: dict) -> str:
    """'ours / GRPO | ratio' of the by-meaning count, or '- | -' where a report has none."""
    if "ratio_by_meaning" not in match:
        return "- | -"
    return (f"{row['eval'][MEANING]} / {_num(match['grpo_n_above_threshold_by_meaning'], '.1f')} | "
            f"{match['ratio_by_meaning']:.2f}x")


def quality_table(rows: list[dict]) -> list[str]:
    budget = ("the same training seconds (GRPO's; steps differ)" if rows and rows[0].get("budget") == "time"
              else "the same number of steps")
    lines = [f"Quality after {budget} on the same prompts and batch; evaluated by "
             "gf_odg.evaluation.core under the task's constraint mask (same samples count and seed for every method):", "",
             "| task | method | steps | K x prompts | score mean | valid | distinct high-reward | by meaning | "
             "unique fraction | semantic diversity | KL to target, sampled | KL, exact | train valid (last 10 steps) | "
             "s / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["eval"]
        lines.append(f"| {r['task']} | {r['method']} | {r['steps']} | {r['K']} x {r['prompts_per_step']} | "
                     f"{_num(e.get('score_mean'))} | {_num(e.get('valid_fraction'))} | {_num(e.get('n_above_threshold'))} | "
                     f"{_num(e.get(MEANING))} | {_num(e.get('unique_fraction'))} | {_num(e.get('semantic_diversity'))} | "
                     f"{_num(e.get('kl_to_target'))} | {_num(e.get('exact_kl'))} | {_num(r.get('train_valid_fraction'))} | "
                     f"{_num(r.get('step_s'), '.2f')} |")
    unmasked = [r for r in rows if r.get("eval_unmasked")]
    if unmasked:
        lines += ["", "The same policies sampled without the constraint mask (free tokens, same length limit):", "",
                  "| task | method | valid | distinct valid | KL to target, sampled |", "|---|---|---|---|---|"]
        for r in unmasked:
            u = r["eval_unmasked"]
            lines.append(f"| {r['task']} | {r['method']} | {_num(u.get('valid_fraction'))} | {_num(u.get('distinct'))} | "
                         f"{_num(u.get('kl_to_target'))} |")
    matched = [r for r in rows if r.get("matched")]
    if matched:
        lines += ["", "At matched mean score: GRPO's distinct high-reward completions and semantic diversity where "
                  "its training path (base model, every curve point, final) crosses our final mean score, one line per crossing "
                  "(linear in the score between the two GRPO points that bracket it):", "",
                  "| task | method | score mean | distinct high-reward, ours / GRPO | ratio | by meaning, ours / GRPO | "
                  "ratio | semantic diversity, ours / GRPO | GRPO between steps |", "|---|---|---|---|---|---|---|---|---|"]
        for r, m in ((r, m) for r in matched for m in r.get("matched_all", [r["matched"]])):
            lines.append(f"| {r['task']} | {r['method']} | {m['score']:.3f} | {r['eval']['n_above_threshold']} / "
                         f"{m['grpo_n_above_threshold']:.1f} | {m['ratio']:.2f}x | {_meaning_cells(r, m)} | "
                         f"{_num(r['eval'].get('semantic_diversity'))} / {m['grpo_semantic_diversity']:.3f} | "
                         f"{m['grpo_steps'][0]}-{m['grpo_steps'][1]} |")
    above = [r for r in rows if r.get("above_grpo_path")]
    if above:
        lines += ["", "Our mean score above every point of GRPO's training path: against GRPO's best-scoring point "
                  "(the nearest in score, ours higher):", "",
                  "| task | method | score mean, ours / GRPO | distinct high-reward, ours / GRPO | ratio | "
                  "by meaning, ours / GRPO | ratio | semantic diversity, ours / GRPO | GRPO step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in above:
            m = r["above_grpo_path"]
            lines.append(f"| {r['task']} | {r['method']} | {m['score']:.3f} / {m['grpo_score']:.3f} | "
                         f"{r['eval']['n_above_threshold']} / {m['grpo_n_above_threshold']} | {m['ratio']:.2f}x | "
                         f"{_meaning_cells(r, m)} | {_num(r['eval'].get('semantic_diversity'))} / {_num(m['grpo_semantic_diversity'])} | "
                         f"{m['grpo_step']} |")
    lines.append("")
    return lines


def plot_extra(report: dict, out: Path) -> list[Path]:
    """benchmark_trl_step.png and benchmark_quality.png, where those sections ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = report.get("trl_step") or []
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = list(range(len(rows)))
        for offset, key, label in ((-0.27, "ours_masked_step_s", "ours (masked)"),
                                   (0.0, "ours_unmasked_step_s", "ours (unmasked)"),
                                   (0.27, "trl_step_s", "TRL GRPOTrainer")):
            ax.bar([i + offset for i in x], [r[key] for r in rows], 0.27, label=label)
        ax.set_xticks(x, [f"K={r['K']}" for r in rows])
        ax.set_ylabel("seconds per training step")
        ax.set_title(report["machine"], fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / "benchmark_trl_step.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    rows = report.get("quality") or []
    if rows:
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for r in (r for r in rows if r["task"] == task):
                e = r["eval"]
                y = e.get("n_above_threshold") or 0
                if r.get("curve"):  # the training path, final point last
                    ax.plot([p["score_mean"] for p in r["curve"]], [p["n_above_threshold"] or 0 for p in r["curve"]],
                            marker=".", lw=1, alpha=0.6)
                ax.scatter([e.get("score_mean", math.nan)], [y], s=40)
                ax.annotate(r["method"], (e.get("score_mean", math.nan), y), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel("score mean")
            ax.set_ylabel("distinct high-reward completions")
            ax.set_title(f"{task} ({rows[0]['eval_samples'] if len(tasks) == 1 else 'same'} samples each)", fontsize=9)
        fig.suptitle(report["machine"], fontsize=8)
        fig.tight_layout()
        made.append(out / "benchmark_quality.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


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


def merge_quality(paths: list[str], out_dir: str | None) -> None:
    """--quality-from: one report of the quality rows of earlier runs. Rows of one task must share
    the evaluation (samples count, threshold), or their counts are not comparable."""
    rows, machines, models = [], [], []
    for path in paths:
        try:  # "nan"/"inf" strings (jsonable's convention) back to floats
            report = json.loads(Path(path).read_text(), object_hook=lambda d: {
                k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in d.items()})
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"--quality-from: cannot read {path}: {err}")
        if not report.get("quality"):
            raise SystemExit(f"--quality-from: {path} has no quality section (run with --sections quality)")
        for r in report["quality"]:
            for key in ("matched", "matched_all", "above_grpo_path"):
                r.pop(key, None)
            r["source"] = str(path)
            r["quality_overrides"] = report.get("quality_overrides", [])
            rows.append(r)
        machines.append(report["machine"])
        models.append(report.get("model", "?"))
    for task in dict.fromkeys(r["task"] for r in rows):
        evals = {(r["eval_samples"], r["threshold"]) for r in rows if r["task"] == task}
        if len(evals) > 1:
            raise SystemExit(f"--quality-from: {task} rows were evaluated differently (samples, threshold): "
                             f"{sorted(evals)}; merge only runs with the same --quality-eval")
    for task in dict.fromkeys(r["task"] for r in rows):  # one method from two runs: named by what differs
        mine = [r for r in rows if r["task"] == task]
        if sum(r["method"] == "grpo" for r in mine) > 1:
            raise SystemExit(f"--quality-from: more than one GRPO run for {task}; give one (its path is what "
                             "the others are matched against)")
        common = set.intersection(*(set(r["quality_overrides"]) for r in mine))
        twice = {r["method"] for r in mine if sum(o["method"] == r["method"] for o in mine) > 1}
        for r in mine:
            if r["method"] in twice:
                own = [o for o in r["quality_overrides"] if o not in common]
                r["method"] = f"{r['method']} ({' '.join(own) or r['source']})"
    matched_score(rows)
    report = {"machine": " | ".join(dict.fromkeys(machines)), "model": ", ".join(dict.fromkeys(models)),
              "date": datetime.now().isoformat(timespec="seconds"), "quality": rows, "quality_from": list(paths)}
    out = Path(out_dir or ROOT / "outputs" / "benchmark" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(jsonable(report), indent=2))
    text = markdown(report) + "\nRows from: " + "; ".join(
        f"{r['method']} <- {r['source']} ({' '.join(r['quality_overrides']) or 'no overrides'})" for r in rows) + "\n"
    (out / "benchmark.md").write_text(text)
    plot_extra(report, out)
    print(text)
    print(f"written to {out}")


def main() -> None:
    global SAMPLES_DIR
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
    parser.add_argument("--quality-tasks", default="rng,keywords")
    parser.add_argument("--quality-steps", default="rng=100,keywords=20",
                        help="training steps per task; TASK.METHOD=N gives one method its own (keywords.grpo=14)")
    parser.add_argument("--quality-eval", default="rng=512,keywords=128", help="evaluation samples per task")
    parser.add_argument("--quality-methods", default=",".join(QUALITY_METHODS))
    parser.add_argument("--quality-overrides", default="", help="space-separated Hydra overrides for the quality runs")
    parser.add_argument("--quality-budget", default="steps", choices=("steps", "time"),
                        help="steps: the same steps for every method; time: GRPO's training seconds for every method")
    parser.add_argument("--quality-curve", type=int, default=0,
                        help="also evaluate every N steps (the training path; matched-score comparison with GRPO)")
    parser.add_argument("--quality-curve-at", default="",
                        help="also evaluate at exactly these steps (6,8,10,12), with or without --quality-curve")
    parser.add_argument("--quality-jobs", type=int, default=1,
                        help="train and evaluate up to N methods at once, each in its own process (--threads each)")
    parser.add_argument("--quality-curve-methods", default="tb,vargrad,rloo,grpo",
                        help="the trained methods that --quality-curve evaluates along the way")
    parser.add_argument("--quality-from", nargs="+", default=None, metavar="BENCHMARK_JSON",
                        help="no training: the quality rows of these earlier benchmark.json files in one table, "
                             "matched-score comparison recomputed (e.g. a new variant against a GRPO path run before)")
    parser.add_argument("--shard-processes", type=int, default=2)
    parser.add_argument("--_memory-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--_shard-child", help=argparse.SUPPRESS)
    parser.add_argument("--_quality-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        variant, vocab, batch, width, device = args._memory_child
        torch.set_num_threads(1)
        print(json.dumps(_memory_child(variant, int(vocab), int(batch), int(width), device)))
        return
    if args._shard_child:
        torch.set_num_threads(1)
        _shard_child(json.loads(args._shard_child))
        return
    if args._quality_child:
        spec = json.loads(args._quality_child)
        torch.set_num_threads(spec["threads"])
        import transformers

        transformers.logging.set_verbosity_error()
        _quality_child(spec)
        return
    if args.quality_from:
        merge_quality(args.quality_from, args.out)
        return
    torch.set_num_threads(args.threads)
    OVERRIDES.extend(args.overrides.split())
    if args.quick:
        args.ks, args.repeats, args.memory_vocab, args.memory_batch, args.memory_tokens = "4", 1, 4096, 2, 8
        # tiny counts, unless given on the command line
        if args.quality_steps == parser.get_default("quality_steps"):
            args.quality_steps = ",".join(f"{t}=2" for t in QUALITY_TASKS)
        if args.quality_eval == parser.get_default("quality_eval"):
            args.quality_eval = ",".join(f"{t}=16" for t in QUALITY_TASKS)
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    if "quality" in sections:  # its flags are checked before any section runs
        def per_task(text: str, flag: str, methods: bool = False) -> dict[str, int]:
            """'rng=100,keywords=20' (and, with methods, 'keywords.grpo=14': that method's own count)."""
            known = set(QUALITY_TASKS) | ({f"{t}.{m}" for t in QUALITY_TASKS for m in QUALITY_METHODS} if methods else set())
            out = {}
            for item in filter(None, text.split(",")):
                key, _, value = item.partition("=")
                if key not in known or not value.isdigit() or int(value) <= 0:
                    raise SystemExit(f"{flag}: {item!r} is not TASK=N with N > 0"
                                     + (" (or TASK.METHOD=N)" if methods else "") + f"; tasks: {', '.join(QUALITY_TASKS)}")
                out[key] = int(value)
            return out

        bad_tasks = set(args.quality_tasks.split(",")) - set(QUALITY_TASKS)
        if bad_tasks:
            raise SystemExit(f"--quality-tasks: unknown {', '.join(sorted(bad_tasks))}; known: {', '.join(QUALITY_TASKS)}")
        quality_steps = per_task(args.quality_steps, "--quality-steps", methods=True)
        quality_eval = per_task(args.quality_eval, "--quality-eval")
        for flag, counts in (("--quality-steps", quality_steps), ("--quality-eval", quality_eval)):
            missing = [t for t in args.quality_tasks.split(",") if t not in counts]
            if missing:
                raise SystemExit(f"{flag} gives no count for {', '.join(missing)}: add {missing[0]}=N")
        unknown = set(args.quality_methods.split(",")) - set(QUALITY_METHODS)
        if unknown:
            raise SystemExit(f"--quality-methods: unknown {', '.join(sorted(unknown))}; known: {', '.join(QUALITY_METHODS)}")
        extra = args.quality_overrides.split()
        curve_at = args.quality_curve_at.split(",") if args.quality_curve_at else []
        if not all(x.isdigit() and int(x) > 0 for x in curve_at):
            raise SystemExit(f"--quality-curve-at: {args.quality_curve_at!r} is not a comma-separated list of steps > 0")
        if args.quality_jobs < 1:
            raise SystemExit(f"--quality-jobs must be >= 1, got {args.quality_jobs}")
        if args.quality_jobs > 1 and args.quality_budget == "time":
            raise SystemExit("--quality-jobs > 1 needs --quality-budget steps (a time budget comes from GRPO's run first)")
        if args.quick:
            extra = [*extra, "trainer.samples_per_prompt=4", "trainer.prompts_per_step=1"]
    report = {"machine": machine(), "model": args.model, "date": datetime.now().isoformat(timespec="seconds")}
    out = Path(args.out or ROOT / "outputs" / "benchmark" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if "quality" in sections:  # a run that fails leaves them under this name, not as finished results
        SAMPLES_DIR = out / "quality_samples.partial"
        shutil.rmtree(SAMPLES_DIR, ignore_errors=True)
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
    if "sharding" in sections:
        report["sharding"] = bench_sharding(args.model, device, min(ks), args.scale_steps, args.shard_processes)
    if "trl_step" in sections:
        report["trl_step"] = bench_trl_step(args.model, device, ks, args.repeats)
    if "quality" in sections:
        report["quality"] = bench_quality(args.model, device, args.quality_tasks.split(","),
                                          quality_steps, quality_eval,
                                          args.quality_methods.split(","), extra, args.quality_budget,
                                          args.quality_curve, tuple(args.quality_curve_methods.split(",")),
                                          tuple(int(x) for x in curve_at), args.quality_jobs, args.threads)
        report["quality_overrides"] = extra
        report["quality_budget"] = args.quality_budget
    out.mkdir(parents=True, exist_ok=True)
    if SAMPLES_DIR is not None and SAMPLES_DIR.is_dir():
        report["quality_samples"] = "quality_samples/"
        shutil.rmtree(out / "quality_samples", ignore_errors=True)
        SAMPLES_DIR.rename(out / "quality_samples")
    (out / "benchmark.json").write_text(json.dumps(jsonable(report), indent=2))
    (out / "benchmark.md").write_text(markdown(report))
    plot(report, out / "benchmark.png")
    plot_extra(report, out)
    print(markdown(report))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
