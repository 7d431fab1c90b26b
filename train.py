"""GF-ODG training entry point.

    uv run python train.py                                  # embedded SmolLM2, rng task, TB
    uv run python train.py model=gemma-2b objective=vargrad
    uv run python train.py -m objective=tb,vargrad seed=0,1 # a sweep
    uv run accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 train.py

Compose (Hydra) -> validate -> build the trainer -> evaluate, train, evaluate -> eval.json.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from gf_odg.startup import format_table, prepare_environment, quiet_libraries

prepare_environment()  # .env, tokenizer threads, the user's reward modules importable

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gf_odg.config.schema import register_configs  # noqa: E402
from gf_odg.distributed import Dist, collective_errors, launch_time, share_launch_time  # noqa: E402
from gf_odg.errors import GFODGError  # noqa: E402

register_configs()
log = logging.getLogger("gf_odg")


def default_run_name(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    stamp = launch_time().strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.task.name}-{cfg.objective.name}-{cfg.model.name}-{stamp}"
    if hydra_cfg.mode.name == "MULTIRUN":
        name += f"-{hydra_cfg.job.num}"
    return name


def release_memory() -> None:
    """Free the model between the jobs of an in-process sweep (Hydra's basic launcher runs them in turn)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: DictConfig, run_dir: Path) -> dict:
    from gf_odg.training.trainer import Trainer
    from gf_odg.config.validation import validate

    validate(cfg)
    trainer = Trainer(cfg, run_dir)
    exit_code = 1
    try:
        with collective_errors():  # a process out of step: one clear line, not a traceback
            trainer.setup()
            summary = trainer.train()
        exit_code = 0
    finally:
        trainer.close(exit_code)
        is_main = trainer.dist.is_main
        del trainer
        release_memory()
    if summary.get("interrupted") or not is_main:
        return summary
    result = {"run_name": cfg.run_name, "steps": summary["steps"], "adapter": summary["adapter"],
              "before": summary["before"], "after": summary["after"]}
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(run_dir / "eval.json")
    print(f"\nEvaluation of {cfg.task.name} ({cfg.task.evaluation.n_samples} samples):")
    print(format_table(summary["before"], summary["after"]))
    from gf_odg.evaluation.report import format_samples

    for tag, rows in summary.get("rows", {}).items():
        print("\n" + format_samples(rows, k=5, title=f"samples {tag}"))
    print(f"\nadapter: {summary['adapter']}\nrun dir: {run_dir}")
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="main")
def main(cfg: DictConfig):
    quiet_libraries()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.run_name is None:
        cfg.run_name = default_run_name(cfg)
    try:
        result = run(cfg, run_dir)
    except GFODGError as err:
        print(f"error: {err}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise
        sys.exit(2)
    after = result.get("after") or {}
    metric = cfg.optimize_metric.split("/", 1)[-1]
    value = after.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def prepare_processes() -> None:
    """Under `accelerate launch` / `torchrun`: join the process group, agree on one launch time (one
    Hydra run dir, one run name), and let only rank 0 write Hydra's files and the main log."""
    dist = Dist()
    if not dist.enabled:
        return
    share_launch_time(dist)
    if not dist.is_main:
        sys.argv += ["hydra.output_subdir=null",
                     f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/train_rank{dist.rank}.log"]


if __name__ == "__main__":
    prepare_processes()
    main()
