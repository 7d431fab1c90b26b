"""Evaluate a trained adapter, or the base model, on its task: scores, constraints, diversity, modes,
with decoding baselines of the same model drawn in the same run.

    uv run python scripts/evaluate.py eval.adapter=models/adapted_models/<run>
    uv run python scripts/evaluate.py eval.adapter=models/checkpoints/<run>/step_000100 eval.samples_per_prompt=1000
    uv run python scripts/evaluate.py eval.adapter=<run> eval.baselines=[temperature_0.7,nucleus_0.95,best_of_n]
    uv run python scripts/evaluate.py eval.adapter=null eval.baselines=[temperature_1,temperature_0.7]  # the base model
    uv run python scripts/evaluate.py model=gemma-2b task=... eval.adapter=<run> eval.threshold=0.5 logger=none

The config is the training one (configs/main.yaml: pass the same model=/task=/objective= overrides
the adapter was trained with) plus `eval:` (configs/eval.yaml; schema gf_odg.config.schema.EvalConfig).
Writes eval.json, samples.jsonl, exact.jsonl (enumerable tasks: every completion's exact policy and
target probability) and plots/*.png (on an enumerable task, the policy's exact distribution
against the target among them) to the run dir (outputs/eval/<date>/<time>/) and logs them to W&B as
`logger` says.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from gf_odg.startup import prepare_environment, quiet_libraries

prepare_environment()  # .env, tokenizer threads, the user's reward modules importable

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gf_odg.config.schema import register_configs  # noqa: E402
from gf_odg.errors import GFODGError  # noqa: E402
from gf_odg.io.tracking import jsonable  # noqa: E402

register_configs()  # main's schema, its `eval` node included
log = logging.getLogger("gf_odg")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    import torch

    from gf_odg.config.validation import validate
    from gf_odg.data.tasks import build_reward, build_task
    from gf_odg.evaluation.core import evaluate_decodings
    from gf_odg.evaluation.loading import load_evaluated_policy, resolve_adapter
    from gf_odg.evaluation.report import exact_rows, format_samples, make_plots, write_samples
    from gf_odg.evaluation.sampling import sample_rows
    from gf_odg.evaluation.settings import check_eval_config
    from gf_odg.log_reward import target_options
    from gf_odg.model.loading import resolve_device

    # Everything a user can mistype fails here, before a model loads.
    settings = check_eval_config(cfg)
    validate(cfg)
    adapter_dir = resolve_adapter(settings.adapter, cfg.paths) if settings.adapter else None
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(settings.seed)

    reward = build_reward(cfg.task.reward)
    model, tokenizer, base_path = load_evaluated_policy(cfg.model, cfg.paths, device, adapter_dir)
    task = build_task(cfg.task, tokenizer, cfg.model.chat_template, cfg.paths.root, reward=reward)
    if hasattr(reward, "bind"):  # rewards that score with the base model (adapters off)
        reward.bind(model, tokenizer)

    order = [p for p in range(len(task.records)) for _ in range(settings.samples_per_prompt)]
    results = evaluate_decodings(model, tokenizer, task, order, settings.decodings, settings.metrics,
                                 settings.batch_size, settings.beta, settings.seed, cfg.trainer.share_prompt_prefill,
                                 settings.threshold, settings.self_bleu_max_texts, settings.progress,
                                 settings.same_meaning, exact_limit=settings.exact_limit,
                                 target=target_options(cfg.objective, beta=settings.beta))

    rows_by_name = {name: sample_rows(task, samples) for name, (_, samples) in results.items()}
    rows = [row for part in rows_by_name.values() for row in part]
    write_samples(run_dir / "samples.jsonl", rows)
    policy_name = settings.decodings[0].name
    if results[policy_name][1].exact:
        write_samples(run_dir / "exact.jsonl", exact_rows(results[policy_name][1].exact))
    plots = []
    if settings.plots:
        # a baseline that repeats the policy's decoding (temperature_1) repeats its samples: not drawn twice
        shown = {name: (result, rows_by_name[name]) for number, (name, (result, samples)) in enumerate(results.items())
                 if number == 0 or not samples.decoding.is_policy}
        plots = make_plots(task, shown, run_dir / "plots", settings.beta, results[policy_name][1].exact)
    report = {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "base_model": base_path,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "n_prompts": len(task.records),
        "samples_per_prompt": settings.samples_per_prompt,
        "beta": settings.beta,
        "seed": settings.seed,
        "threshold": settings.threshold,
        "same_meaning": settings.same_meaning,
        "metrics": sorted(settings.metrics),
        "decodings": {d.name: {"temperature": d.temperature, "top_p": d.top_p, "best_of": d.best_of}
                      for d in settings.decodings},
        "policy": results[policy_name][0],
        "baselines": {name: result for name, (result, _) in results.items() if name != policy_name},
        "samples": "samples.jsonl",
        "plots": [str(p.relative_to(run_dir)) for p in plots],
    }
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(jsonable(report), indent=2))
    tmp.replace(run_dir / "eval.json")

    print(f"\nEvaluation of {report['adapter'] or 'the base model ' + base_path} on {task.name} "
          f"({settings.samples_per_prompt} samples x {len(task.records)} prompts per decoding):")
    print(format_table({name: result for name, (result, _) in results.items()}))
    print("\n" + format_samples(rows_by_name[policy_name], title=f"{policy_name} samples"))
    print(f"\nrun dir: {run_dir}")
    log_to_tracker(cfg, run_dir, report, rows, plots)
    return report


def log_to_tracker(cfg: DictConfig, run_dir: Path, report: dict, rows: list[dict], plots: list[Path]) -> None:
    """metrics.jsonl in the run dir, and a W&B run (offline without an API key) when `logger` asks."""
    from gf_odg.io.tracking import Tracker

    if not (cfg.logger.wandb and cfg.logger.mode != "disabled") and not cfg.logger.jsonl:
        return
    adapter = Path(report["adapter"]).name if report["adapter"] else "base"
    name = cfg.run_name or f"eval-{cfg.task.name}-{cfg.model.name}-{adapter}-{datetime.now():%Y%m%d-%H%M%S}"
    tracker = Tracker(cfg.logger, run_dir, name, OmegaConf.to_container(cfg, resolve=True))
    exit_code = 1
    try:
        flat = {f"eval/{decoding}/{key}": value
                for decoding, result in [("policy", report["policy"]), *report["baselines"].items()]
                for key, value in result.items() if isinstance(value, (int, float))}
        tracker.log(flat, step=0)
        tracker.summary(flat)
        tracker.log_samples(rows[:1000], step=0, key="eval/samples")
        if tracker.wandb_run is not None and plots:
            import wandb

            tracker.wandb_run.log({f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in plots}, step=0)
        exit_code = 0
    finally:
        tracker.finish(exit_code)


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    keys = [k for k in dict.fromkeys(k for r in results.values() for k, v in r.items() if not isinstance(v, list))
            if k != "n_samples"]  # per-prompt lists (exact_per_prompt) are eval.json's
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'metric':<32}" + "".join(f"{n:>{width}}" for n in names)]
    for key in keys:
        lines.append(f"{key:<32}" + "".join(f"{_fmt(results[n].get(key)):>{width}}" for n in names))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    for chatty in ("sentence_transformers", "matplotlib"):  # model-loading and font-cache notices
        logging.getLogger(chatty).setLevel(logging.WARNING)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir)
    except GFODGError as err:
        print("error: " + " ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise
        sys.exit(2)


if __name__ == "__main__":
    main()
