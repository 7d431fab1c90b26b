"""Percentiles of the base model's own fluency on a task, to pick `objective.fluency_floor`.

    uv run python scripts/fluency_floor.py task=keywords task.evaluation.n_samples=64 trainer.threads=1 logger=none

Draws `task.evaluation.n_samples` completions from the base model (adapters off, temperature 1,
under the task's constraint mask), spread evenly over the task's prompts, and prints p5, p25, p50 and
p75 of their mean per-token log p_ref (the base model's own log-probability, whole vocabulary, EOS
included, divided by the generated tokens including EOS: what the floor compares). Writes
fluency.json (the summary and every sample's value) to the run dir. The config is the training one
(configs/main.yaml); `seed` seeds the draws, `task.evaluation.batch_size` sets the batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gf_odg.startup import prepare_environment, quiet_libraries

prepare_environment()  # .env, tokenizer threads, the user's reward modules importable

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gf_odg.config.schema import register_configs  # noqa: E402
from gf_odg.errors import GFODGError  # noqa: E402

register_configs()


def run(cfg: DictConfig, run_dir: Path) -> dict:
    import torch

    from gf_odg.config.validation import validate
    from gf_odg.data.tasks import build_reward, build_task
    from gf_odg.evaluation.fluency import base_fluency
    from gf_odg.evaluation.loading import load_evaluated_policy
    from gf_odg.model.loading import resolve_device

    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    reward = build_reward(cfg.task.reward)
    model, tokenizer, base_path = load_evaluated_policy(cfg.model, cfg.paths, device, None)
    task = build_task(cfg.task, tokenizer, cfg.model.chat_template, cfg.paths.root, reward=reward)
    if hasattr(reward, "bind"):  # rewards that score with the base model (adapters off)
        reward.bind(model, tokenizer)
    ecfg = cfg.task.evaluation
    summary, values, samples = base_fluency(model, tokenizer, task, ecfg.n_samples, ecfg.batch_size, cfg.seed,
                                            cfg.trainer.share_prompt_prefill)
    report = {"task": cfg.task.name, "model": cfg.model.name, "base_model": base_path, "seed": cfg.seed, **summary,
              "samples": [{"prompt": task.prompts[p], "completion": t, "per_token_log_ref": float(v)}
                          for p, t, v in zip(samples.prompt_indices, samples.texts, values.tolist())]}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "fluency.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(run_dir / "fluency.json")
    percentiles = "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("p"))
    print(f"mean per-token log p_ref of {summary['n']} base-model samples on {task.name}: {percentiles}  "
          f"(mean {summary['mean']:.3f}, valid {summary['valid_fraction']:.2f})")
    print(f"objective.fluency_floor={summary['p25']:.2f} would floor about a quarter of them. run dir: {run_dir}")
    return report


@hydra.main(version_base="1.3", config_path="../configs", config_name="main")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except GFODGError as err:
        print("error: " + " ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
