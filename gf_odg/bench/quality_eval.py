"""How the quality section evaluates a policy: gf_odg.evaluation.core on the same samples count and
seed for every method, mid-training curve points, and each evaluation's completions on disk.

Besides the evaluation's metrics, every evaluation reports `fluency`: the mean over its samples of
the per-token log p_ref (gf_odg.evaluation.fluency.per_token_log_ref, the base model with adapters
off), so that a gain in score or diversity bought with broken text shows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

METRICS = ("score", "validity", "unique_fraction", "distinct_n", "semantic_diversity", "above_threshold",
           "above_threshold_by_meaning", "modes", "exact")
CURVE_KEYS = ("score_mean", "valid_fraction", "n_above_threshold", "n_above_threshold_by_meaning", "unique_fraction",
              "semantic_diversity", "fluency", "exact_kl", "kl_to_target")


def save_samples(task, samples, samples_dir: Path | None, label: str) -> None:
    """The evaluated completions (prompt, completion, score, mode) as <samples_dir>/<label>.jsonl,
    whole or not at all."""
    if samples_dir is None:
        return
    from gf_odg.evaluation.core import sample_rows

    samples_dir.mkdir(parents=True, exist_ok=True)
    tmp = samples_dir / f"{label}.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as out:
        for row in sample_rows(task, samples):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(samples_dir / f"{label}.jsonl")


def evaluate_policy(model, tok, task, n: int, threshold: float, seed: int, batch_size: int,
                    samples_dir: Path | None = None, label: str | None = None, decoding=None) -> dict:
    """n samples of the policy (or of `decoding`, a gf_odg.evaluation.sampling.Decoding of it: a
    temperature, best of n) over the task's prompts in turn, scored by gf_odg.evaluation.core, and
    their fluency (mean per-token log p_ref)."""
    from gf_odg.evaluation.core import POLICY, evaluate_decodings
    from gf_odg.evaluation.fluency import per_token_log_ref
    from gf_odg.model.loading import reference_mode

    decoding = decoding or POLICY
    model.eval()
    order = [i % len(task.records) for i in range(n)]
    result, samples = evaluate_decodings(model, tok, task, order, [decoding], METRICS, batch_size, beta=1.0,
                                         seed=seed, threshold=threshold)[decoding.name]
    with reference_mode(model):
        result["fluency"] = float(per_token_log_ref(model, tok, task, samples.prompt_indices, samples.tokens,
                                                    batch_size).mean())
    result["top_completions"] = Counter(samples.texts).most_common(5)  # what a collapsed policy writes
    if label:
        save_samples(task, samples, samples_dir, label)
    return result


def curve_point(model, tok, task, n: int, threshold: float, seed: int, batch_size: int, step: int,
                samples_dir: Path | None = None, label: str | None = None) -> dict:
    """The policy's metrics at `step`, mid-training: the same evaluation as the final one, with the
    global RNG state and the train/eval mode put back afterwards (training continues unperturbed)."""
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        e = evaluate_policy(model, tok, task, n, threshold, seed, batch_size, samples_dir,
                            f"{label}-step{step:04d}" if label else None)
    model.train(was_training)
    return {"step": step, **{k: e.get(k) for k in CURVE_KEYS}}


def grpo_curve_callback(tok, task, n: int, threshold: float, seed: int, batch_size: int, at_step,
                        points: list[dict], samples_dir: Path | None = None, label: str | None = None):
    """A TRL callback appending a curve point after each step `at_step` accepts (not the last: the
    final evaluation is that one)."""
    from transformers import TrainerCallback

    class _Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if at_step(state.global_step) and state.global_step < state.max_steps:
                points.append(curve_point(model, tok, task, n, threshold, seed, batch_size, state.global_step,
                                          samples_dir, label))

    return _Curve()


def unmasked_task(cfg, tok):
    """The task with its `allowed` mask off (free tokens, same max length and stop rules): what an
    unconstrained sampler, TRL's, emits on its own."""
    from omegaconf import OmegaConf

    from gf_odg.data.tasks import build_task

    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    task_cfg["constraints"] = {k: v for k, v in task_cfg["constraints"].items() if k != "allowed"}
    return build_task(OmegaConf.create(task_cfg), tok, cfg.model.chat_template, cfg.paths.root)
