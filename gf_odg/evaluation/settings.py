"""scripts/evaluate.py's `eval:` block (schema: gf_odg.config.schema.EvalConfig) checked against the
rest of the config and its nulls resolved, before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from gf_odg.data.prompts import load_prompts
from gf_odg.errors import ConfigError
from gf_odg.evaluation.measure import METRICS, NEEDS_THRESHOLD
from gf_odg.evaluation.sampling import POLICY, Decoding, parse_decoding


@dataclass
class EvalSettings:
    """The `eval:` block checked and resolved against the rest of the config."""

    adapter: Optional[str]
    samples_per_prompt: int
    batch_size: int
    decodings: list[Decoding]  # the policy first, then the baselines
    metrics: frozenset
    threshold: Optional[float]
    same_meaning: float
    beta: float
    seed: int
    exact_limit: int
    self_bleu_max_texts: int
    plots: bool
    progress: bool


def _decodings(ecfg, problems: list[str]) -> list[Decoding]:
    decodings = [POLICY]
    for name in ecfg.baselines:
        try:
            decoding = parse_decoding(name, max(1, ecfg.best_of_n))
        except ConfigError as err:
            problems.append(str(err).rstrip("."))
            continue
        if decoding.name in {d.name for d in decodings}:
            problems.append(f"eval.baselines lists {name!r} twice")
        decodings.append(decoding)
    return decodings


def _metric_names(ecfg, problems: list[str]) -> set[str]:
    if ecfg.metrics is None:
        return set(METRICS) - (NEEDS_THRESHOLD if ecfg.threshold is None else set())
    chosen = set(ecfg.metrics)
    unknown = sorted(chosen - set(METRICS))
    if unknown:
        problems.append(f"eval.metrics: unknown {', '.join(map(repr, unknown))}; known: {', '.join(METRICS)}")
    for name in sorted(chosen & NEEDS_THRESHOLD):
        if ecfg.threshold is None:
            problems.append(f"eval.metrics asks for {name} but eval.threshold is null: set eval.threshold")
    return chosen & set(METRICS)


def check_eval_config(cfg) -> EvalSettings:
    """Check `cfg.eval` (before any model loads) and resolve its nulls; every problem in one message."""
    from gf_odg.log_reward import beta_at

    ecfg = cfg.eval
    if ecfg is None:
        raise ConfigError("eval: no `eval` block; run scripts/evaluate.py, whose configs/eval.yaml defines it.")
    problems: list[str] = []
    n = ecfg.samples_per_prompt
    if n is None:
        n = math.ceil(cfg.task.evaluation.n_samples / len(load_prompts(cfg.task, cfg.paths.root)))
    elif n <= 0:
        problems.append(f"eval.samples_per_prompt={n}: expected >= 1 completions per prompt")
    batch_size = cfg.task.evaluation.batch_size if ecfg.batch_size is None else ecfg.batch_size
    if batch_size <= 0:
        problems.append(f"eval.batch_size={batch_size}: expected >= 1")
    if ecfg.best_of_n < 1:
        problems.append(f"eval.best_of_n={ecfg.best_of_n}: expected >= 1")
    if ecfg.self_bleu_max_texts < 2:
        problems.append(f"eval.self_bleu_max_texts={ecfg.self_bleu_max_texts}: expected >= 2")
    decodings = _decodings(ecfg, problems)
    chosen = _metric_names(ecfg, problems)
    if not 0.0 < ecfg.same_meaning <= 1.0:
        problems.append(f"eval.same_meaning={ecfg.same_meaning}: expected a cosine in (0, 1]")
    if not (cfg.task.evaluation.exact if ecfg.exact is None else ecfg.exact):
        chosen.discard("exact")
    exact_limit = cfg.task.evaluation.exact_limit if ecfg.exact_limit is None else ecfg.exact_limit
    if exact_limit < 1:
        problems.append(f"eval.exact_limit={exact_limit}: expected >= 1 completions "
                        "(null: task.evaluation.exact_limit)")
    beta = beta_at(cfg.objective, cfg.trainer.max_steps) if ecfg.beta is None else float(ecfg.beta)
    if not beta > 0:
        problems.append(f"eval.beta={beta}: expected > 0 (the reward temperature)")
    if problems:
        raise ConfigError("invalid eval settings: " + "; ".join(problems))
    return EvalSettings(adapter=ecfg.adapter, samples_per_prompt=int(n), batch_size=int(batch_size),
                        decodings=decodings, metrics=frozenset(chosen), threshold=ecfg.threshold,
                        same_meaning=ecfg.same_meaning, beta=beta, seed=cfg.seed if ecfg.seed is None else ecfg.seed,
                        exact_limit=int(exact_limit), self_bleu_max_texts=ecfg.self_bleu_max_texts, plots=ecfg.plots,
                        progress=ecfg.progress)
