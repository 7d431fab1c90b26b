"""sharding (not in the default sections): the same training with full-precision weights + LoRA
launched data parallel (configs/accelerate/ddp.yaml) and FSDP-sharded (configs/accelerate/fsdp.yaml),
--shard-processes processes each: parameter memory held per process, peak memory, seconds per
step, and rank 0's loss and gradient norm after the same steps (they should agree: the same
computation). Each process runs `python -m gf_odg.bench.sharding SPEC_JSON` under
`accelerate launch` and prints its figures as one `SHARD {json}` line."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gf_odg.bench.common import CONFIG_DIR, Context, child_env, compose, sync
from gf_odg.bench.report import num, table
from gf_odg.errors import GFODGError
from gf_odg.startup import ROOT

LAUNCHES = ("ddp", "fsdp")


def add_arguments(group) -> None:
    group.add_argument("--shard-processes", type=int, default=2, help="processes of each launch")


def run(ctx: Context) -> list[dict]:
    dtype = "bfloat16" if ctx.device.type == "cuda" else "float32"
    spec = {"model": ctx.model, "k": min(ctx.ks), "steps": ctx.options.scale_steps,
            "overrides": [*ctx.overrides, "model.quantization.load_in_4bit=false", f"model.dtype={dtype}"]}
    rows = []
    for name in LAUNCHES:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIG_DIR / "accelerate" / f"{name}.yaml"), "--num_processes", str(ctx.options.shard_processes),
               "-m", "gf_odg.bench.sharding", json.dumps(spec)]
        result = subprocess.run(cmd, cwd=ROOT, env=child_env(1), capture_output=True, text=True)
        if result.returncode != 0:
            raise GFODGError(f"sharding benchmark, {name}.yaml: the launch failed:\n{result.stderr[-3000:]}")
        ranks = sorted((json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("SHARD ")),
                       key=lambda r: r["rank"])
        rows.append(combine(name, ranks, dtype, spec["k"]))
        print(f"  sharding {name}: {rows[-1]['param_mb_held']:.0f} MB of parameters per process, "
              f"{rows[-1]['step_s']:.2f} s/step, grad norm {rows[-1]['grad_norm']:.4f}", flush=True)
    return rows


def combine(name: str, ranks: list[dict], dtype: str, k: int) -> dict:
    """One launch's row from its processes' rows: the most any process held or took, rank 0's loss."""
    first = ranks[0]
    return {"launch": f"{name}.yaml", "processes": len(ranks), "dtype": dtype, "K": k,
            "sharded": first["sharded"], "param_mb_held": max(r["param_mb_held"] for r in ranks),
            "peak_gpu_mb": first["peak_gpu_mb"] and max(r["peak_gpu_mb"] for r in ranks),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "step_s": max(r["step_s"] for r in ranks),
            "loss_rank0": first["loss"], "grad_norm": first["grad_norm"]}


def process_row(spec: dict) -> dict:
    """One process of a launch: set up the trainer, a warm-up step, `steps` timed steps."""
    import resource
    import tempfile

    from torch.distributed.tensor import DTensor

    from gf_odg.training.trainer import Trainer

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p

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
    return row


def markdown(rows: list[dict]) -> list[str]:
    return table(["launch", "processes", "dtype", "K", "parameter MB held per process", "peak GPU MB",
                  "peak RSS MB", "s / step", "loss (rank 0)", "grad norm"],
                 [[r["launch"], r["processes"], r["dtype"], r["K"], f"{r['param_mb_held']:.0f}",
                   num(r["peak_gpu_mb"], ".0f"), f"{r['peak_rss_mb']:.0f}", f"{r['step_s']:.2f}",
                   f"{r['loss_rank0']:.4f}", f"{r['grad_norm']:.4f}"] for r in rows])


if __name__ == "__main__":  # one process of a launch
    torch.set_num_threads(1)
    print("SHARD " + json.dumps(process_row(json.loads(sys.argv[1]))), flush=True)
