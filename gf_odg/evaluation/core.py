"""Evaluating a sampler: draw completions under the constraint mask with a decoding, and measure them.

One code path serves the end-of-training evaluation (`evaluate`, called by the trainer) and the
standalone `scripts/evaluate.py` (`evaluate_decodings` on a base model plus an adapter, with decoding
baselines of the same model beside the policy):

    draw_samples   completions of one decoding (temperature T, nucleus p, best of n), scored once
    measure        scores, validity, diversity, modes: `metrics` picks which (METRICS)
    exact_metrics  the policy's exact mode distribution, where the completion space is enumerable

For tasks with modes (`rng`: the integers) each prompt's empirical distribution is compared with the
target
    p*(m | x) ∝ exp(score(x, m) / beta)        over the reward's listed modes (`modes()`)
(KL(p_hat || p*) over valid samples, TV including the invalid mass), and the figures are averaged
over prompts. Where the completion space is enumerable under the constraint mask (`rng`: 1,110
digit strings), the policy's *exact* distribution is computed by scoring every terminal completion,
and reported beside the sampled figures: the plug-in KL of a perfect sampler is biased by about
(k - 1) / (2n) nats (`kl_floor`). The target is the reward's alone: with `objective.ref_weight` != 0
the trained target also weighs in p_ref, which these figures do not.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from gf_odg.evaluation import metrics
from gf_odg.errors import ConfigError, GFODGError
from gf_odg.data.prompts import PromptBatch, load_prompts
from gf_odg.rewards.base import call_reward
from gf_odg.generation.sampling import sample
from gf_odg.generation.scoring import score_completions

# What `measure` can report, by name (`eval.metrics=[...]`); each name yields the keys listed.
METRICS = {
    "score": "score_mean, score_median, score_max, score_min, score_std; terms/<term>/{mean,median,max}",
    "validity": "valid_fraction, valid_percent (finite score), constraints_satisfied_percent",
    "unique_fraction": "unique_fraction",
    "distinct_n": "distinct_1, distinct_2, distinct_3",
    "self_bleu": "self_bleu",
    "semantic_diversity": "semantic_diversity (1 - mean pairwise cosine of MiniLM embeddings)",
    "above_threshold": "n_above_threshold: distinct completions scoring >= eval.threshold",
    "above_threshold_by_meaning": "n_above_threshold_by_meaning: the same, near-paraphrases (MiniLM cosine >= "
                                  "eval.same_meaning) counted once",
    "modes": "distinct, n_modes, mode_coverage, mode_entropy, target_entropy, kl_to_target, tv_to_target, kl_floor",
    "exact": "exact_kl, exact_tv, exact_valid_mass",
}
# MiniLM embeddings, quadratic BLEU: off while training
SLOW_METRICS = frozenset({"self_bleu", "semantic_diversity", "above_threshold_by_meaning"})
NEEDS_THRESHOLD = frozenset({"above_threshold", "above_threshold_by_meaning"})
SELF_BLEU_MAX_TEXTS = 200  # per prompt: 200 texts take about 1 s on a CPU core, 500 about 5 s


# ---------------------------------------------------------------- decodings


@dataclass(frozen=True)
class Decoding:
    """How completions are drawn: softmax(l / temperature) over the allowed tokens, cut to the
    nucleus holding `top_p` of the mass, best-scoring of `best_of` draws. The policy is (1, 1, 1)."""

    name: str
    temperature: float = 1.0
    top_p: float = 1.0
    best_of: int = 1

    @property
    def is_policy(self) -> bool:
        return self.temperature == 1.0 and self.top_p == 1.0 and self.best_of == 1


POLICY = Decoding("policy")
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_decoding(name: str, best_of_n: int) -> Decoding:
    """`temperature_<T>`, `nucleus_<p>`, `best_of_n` (n = eval.best_of_n) or `best_of_<n>`."""
    text = str(name)
    if match := re.fullmatch(rf"temperature_{_NUMBER}", text):
        temperature = float(match.group(1))
        if temperature > 0:
            return Decoding(text, temperature=temperature)
    elif match := re.fullmatch(rf"nucleus_{_NUMBER}", text):
        top_p = float(match.group(1))
        if 0 < top_p <= 1:
            return Decoding(text, top_p=top_p)
    elif text == "best_of_n":
        return Decoding(text, best_of=best_of_n)
    elif match := re.fullmatch(r"best_of_(\d+)", text):
        if int(match.group(1)) >= 1:
            return Decoding(text, best_of=int(match.group(1)))
    raise ConfigError(
        f"eval.baselines: {text!r} is not a decoding; use temperature_<T> (T > 0, e.g. temperature_0.7), "
        "nucleus_<p> (0 < p <= 1, e.g. nucleus_0.95), best_of_n (n = eval.best_of_n) or best_of_<n>."
    )


# ---------------------------------------------------------------- the standalone evaluation's settings


@dataclass
class EvalConfig:
    """`eval:` block of configs/eval.yaml (scripts/evaluate.py)."""

    adapter: Optional[str] = None  # adapter folder, checkpoint step_* folder, or a run name; null: the base model
    samples_per_prompt: Optional[int] = None  # null: task.evaluation.n_samples spread over the prompts
    batch_size: Optional[int] = None  # null: task.evaluation.batch_size
    baselines: list[str] = field(default_factory=list)  # temperature_<T>, nucleus_<p>, best_of_n, best_of_<n>
    best_of_n: int = 4
    metrics: Optional[list[str]] = None  # null: every metric that applies (see gf_odg.evaluation.core.METRICS)
    threshold: Optional[float] = None  # score a completion must reach to count in n_above_threshold
    same_meaning: float = 0.9  # n_above_threshold_by_meaning: MiniLM cosine at which two completions count once
    beta: Optional[float] = None  # reward temperature of the target; null: the objective's final beta
    seed: Optional[int] = None  # null: the top-level seed
    exact: Optional[bool] = None  # null: task.evaluation.exact
    self_bleu_max_texts: int = SELF_BLEU_MAX_TEXTS  # self-BLEU is quadratic: a random subset per prompt
    plots: bool = True
    progress: bool = True


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
    self_bleu_max_texts: int
    plots: bool
    progress: bool


def register_eval_config() -> None:
    """Register the schema of configs/eval.yaml: main's schema plus a typed `eval` node.

    It is stored under main's schema name, so that `main.yaml`'s own defaults list (which eval.yaml
    includes) picks it up and a mistyped `eval.*` key fails at compose time like any other.
    Call it after `gf_odg.config.schema.register_configs()`, which stores the plain training schema.
    """
    from hydra.core.config_store import ConfigStore

    from gf_odg.config.schema import MainConfig

    @dataclass
    class EvalRunConfig(MainConfig):
        eval: EvalConfig = field(default_factory=EvalConfig)

    ConfigStore.instance().store(name="gf_odg_schema", node=EvalRunConfig)


def check_eval_config(cfg) -> EvalSettings:
    """Check `cfg.eval` (before any model loads) and resolve its nulls; every problem in one message."""
    from gf_odg.log_reward import beta_at

    ecfg = cfg.eval
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
    if ecfg.metrics is None:
        chosen = set(METRICS) - (NEEDS_THRESHOLD if ecfg.threshold is None else set())
    else:
        chosen = set(ecfg.metrics)
        unknown = sorted(chosen - set(METRICS))
        if unknown:
            problems.append(f"eval.metrics: unknown {', '.join(map(repr, unknown))}; known: {', '.join(METRICS)}")
        for name in sorted(chosen & NEEDS_THRESHOLD):
            if ecfg.threshold is None:
                problems.append(f"eval.metrics asks for {name} but eval.threshold is null: set eval.threshold")
    if not 0.0 < ecfg.same_meaning <= 1.0:
        problems.append(f"eval.same_meaning={ecfg.same_meaning}: expected a cosine in (0, 1]")
    exact = cfg.task.evaluation.exact if ecfg.exact is None else ecfg.exact
    if not exact:
        chosen.discard("exact")
    beta = beta_at(cfg.objective, cfg.trainer.max_steps) if ecfg.beta is None else float(ecfg.beta)
    if not beta > 0:
        problems.append(f"eval.beta={beta}: expected > 0 (the reward temperature)")
    if problems:
        raise ConfigError("invalid eval settings: " + "; ".join(problems))
    return EvalSettings(adapter=ecfg.adapter, samples_per_prompt=int(n), batch_size=int(batch_size),
                        decodings=decodings, metrics=frozenset(chosen & set(METRICS)), threshold=ecfg.threshold,
                        same_meaning=ecfg.same_meaning, beta=beta, seed=cfg.seed if ecfg.seed is None else ecfg.seed,
                        self_bleu_max_texts=ecfg.self_bleu_max_texts, plots=ecfg.plots, progress=ecfg.progress)


# ---------------------------------------------------------------- loading a trained policy


def resolve_adapter(adapter: str, paths) -> Path:
    """The folder holding adapter_config.json: `adapter` itself, its `adapter/` (a checkpoint's
    step_* folder), the step named by its `latest` file (a checkpoint run folder); a relative path
    from the working directory, else from `paths.root`, else under `paths.adapted_models` (a run name)."""
    tried = []
    for root in dict.fromkeys((Path(adapter).expanduser(), Path(paths.root) / adapter,
                               Path(paths.adapted_models) / adapter)):
        candidates = [root, root / "adapter"]
        if (root / "latest").is_file():
            candidates.append(root / (root / "latest").read_text().strip() / "adapter")
        for folder in candidates:
            if (folder / "adapter_config.json").is_file():
                return folder.resolve()
        tried.append(str(root))
    raise GFODGError(
        f"eval.adapter={adapter!r}: no adapter at {' or '.join(tried)} (expected a folder with "
        "adapter_config.json: models/adapted_models/<run>, or a checkpoint models/checkpoints/<run>/step_*)."
    )


def _base_name(path: str) -> str:
    """`.../models/base_models/google--gemma-2b`, `google/gemma-2b` -> `gemma-2b`."""
    return Path(path.rstrip("/")).name.split("--")[-1]


def _same_base(recorded: str, base_path: str) -> bool:
    """Whether an adapter's recorded base model is `base_path`: the same folder, or one of the same
    name (a moved repository; a hub id `org/name` prepared as `org--name`). Same-named models of
    other shapes are caught when the weights load."""
    if not recorded:
        return True  # nothing recorded: the shape check on loading is all there is
    if Path(recorded).exists() and Path(base_path).exists() and Path(recorded).resolve() == Path(base_path).resolve():
        return True
    return _base_name(recorded) == _base_name(base_path)


def load_evaluated_policy(model_cfg, paths, device: torch.device, adapter_dir: Optional[Path]):
    """(model, tokenizer, base_path): the base model with the trained adapter, or with fresh LoRA
    (B = 0: exactly the base model, and `reference_mode` still works) when `adapter_dir` is None."""
    from gf_odg.model.loading import base_model_path, load_base_model, load_policy, load_tokenizer

    if adapter_dir is None:
        model, tokenizer, base_path = load_policy(model_cfg, paths, device)
        return model.eval(), tokenizer, base_path
    base_path = base_model_path(model_cfg, paths)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not _same_base(recorded, base_path):
        raise GFODGError(
            f"adapter {adapter_dir} was trained on base model {recorded!r}, but model={model_cfg.name} resolves "
            f"to {base_path!r}; evaluate it with the model it was trained on (model=... overrides).")
    from peft import PeftModel, prepare_model_for_kbit_training  # a slow import: after the cheap checks

    tokenizer = load_tokenizer(base_path, model_cfg, paths.hf_cache)
    model = load_base_model(base_path, model_cfg, paths.hf_cache, device)
    if model_cfg.quantization.load_in_4bit:  # the numerics the adapter was trained under
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        detail = detail[:240].rstrip(".")
        raise GFODGError(
            f"adapter {adapter_dir} does not fit base model {base_path!r} (model={model_cfg.name}; the adapter "
            f"records {recorded!r}): {detail}. It was made for another base model; evaluate it with that one."
        ) from None
    return model.eval(), tokenizer, base_path


# ---------------------------------------------------------------- sampling


@dataclass
class Samples:
    """Completions of one decoding, in the order of `prompt_indices`, scored once."""

    decoding: Decoding
    prompt_indices: list[int]  # task prompt index of each completion
    texts: list[str]
    tokens: list[list[int]]  # completion tokens, EOS included
    scores: torch.Tensor  # [N] float32, -inf for a hard violation
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # reward term -> [N] raw scores

    def by_prompt(self) -> dict[int, list[int]]:
        """Positions of each prompt's completions."""
        groups: dict[int, list[int]] = {}
        for position, prompt in enumerate(self.prompt_indices):
            groups.setdefault(prompt, []).append(position)
        return groups


def draw_samples(model, tokenizer, task, prompt_order: list[int], decoding: Decoding, batch_size: int,
                 generator: torch.Generator, share_prefill: bool = True, progress: bool = False) -> Samples:
    """One completion per entry of `prompt_order` (task prompt indices) under `decoding`.

    best_of n draws n completions per entry and keeps the highest-scoring one (the first on a tie).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    n = decoding.best_of
    slots = [p for p in prompt_order for _ in range(n)]
    extra = {"top_p": decoding.top_p} if decoding.top_p < 1.0 else {}  # the policy needs no nucleus support
    texts, tokens = [], []
    bar = tqdm(total=len(slots), desc=f"sample {decoding.name}", disable=not progress, dynamic_ncols=True, leave=False)
    for start in range(0, len(slots), batch_size):
        chunk = slots[start: start + batch_size]
        used = sorted(set(chunk))
        local = {p: j for j, p in enumerate(used)}
        prompts = PromptBatch.build([task.prompt_tokens[p] for p in used], [task.prompts[p] for p in used],
                                    tokenizer.pad_token_id, device)
        group = torch.tensor([local[p] for p in chunk], device=device)
        traj = sample(model, tokenizer, prompts, group, task.constraints, temperature=decoding.temperature,
                      generator=generator, share_prefill=share_prefill, **extra)
        texts += traj.texts
        tokens += traj.token_lists()
        bar.update(len(chunk))
    bar.close()
    scores = call_reward(task.reward, [task.prompts[p] for p in slots], texts, **task.reward_kwargs(slots))
    terms = {name: torch.as_tensor(values, dtype=torch.float32).reshape(-1)
             for name, values in (getattr(task.reward, "last_terms", None) or {}).items()}
    if n > 1:
        keep = (scores.view(-1, n).argmax(dim=1) + torch.arange(0, len(slots), n)).tolist()  # [len(prompt_order)]
        texts, tokens = [texts[i] for i in keep], [tokens[i] for i in keep]
        scores = scores[keep]
        terms = {name: values[keep] for name, values in terms.items()}
    return Samples(decoding, list(prompt_order), texts, tokens, scores, terms)


def sample_task(model, tokenizer, task, n_samples: int, batch_size: int, generator: torch.Generator,
                share_prefill: bool = True, temperature: float = 1.0):
    """n_samples completions spread evenly over the task's prompts -> (texts, prompt_indices, token lists)."""
    order = [i % len(task.records) for i in range(n_samples)]
    samples = draw_samples(model, tokenizer, task, order, Decoding("sample", temperature=temperature), batch_size,
                           generator, share_prefill)
    return samples.texts, samples.prompt_indices, samples.tokens


# ---------------------------------------------------------------- modes and their target


def mode_targets(task, beta: float) -> Optional[dict[int, dict[str, float]]]:
    """p*(m | x) ∝ exp(score(x, m) / beta) over the reward's listed modes, per prompt index;
    None when the reward lists no modes (`modes()` and `mode_of()`)."""
    reward = task.reward
    if not (hasattr(reward, "modes") and hasattr(reward, "mode_of")):
        return None
    modes = [str(m) for m in reward.modes()]
    if not modes:
        return None
    targets = {}
    for p in range(len(task.records)):
        scores = call_reward(reward, [task.prompts[p]] * len(modes), modes, **task.reward_kwargs([p] * len(modes)))
        if torch.isfinite(scores).any():
            # float64: a peaked target (Binomial tails near 1e-50) must not underflow to a zero mass
            targets[p] = {m: float(w) for m, w in zip(modes, torch.softmax(scores.double() / beta, dim=0))}
    return targets or None


def mode_of(task, text: str) -> Optional[str]:
    mode = task.reward.mode_of(text) if hasattr(task.reward, "mode_of") else None
    return None if mode is None else str(mode)


def _tv_with_invalid(p: dict, target: dict, invalid_mass: float) -> float:
    """½ (Σ_m |p(m) − p*(m)| + invalid mass): p holds the valid modes' absolute frequencies."""
    keys = set(p) | set(target)
    return 0.5 * (sum(abs(p.get(k, 0.0) - target.get(k, 0.0)) for k in keys) + invalid_mass)


def _entropy(p: dict) -> float:
    return -sum(v * math.log(v) for v in p.values() if v > 0)


def _mode_metrics(task, samples: Samples, targets: dict[int, dict[str, float]]) -> dict:
    """Per prompt: the sampled mode distribution against that prompt's target; averaged over prompts."""
    per_prompt = []
    for prompt, positions in samples.by_prompt().items():
        target = targets.get(prompt)
        if target is None:
            continue
        modes = [mode_of(task, samples.texts[i]) for i in positions]
        hist = metrics.mode_histogram(modes)
        empirical = metrics.empirical_distribution(modes)
        support = [m for m, w in target.items() if w > 0]
        n_valid = sum(hist.values())
        per_prompt.append({
            "distinct": len(hist),
            "n_modes": len(target),
            "mode_coverage": metrics.mode_coverage(hist, support),
            "mode_entropy": metrics.mode_entropy(hist),
            "target_entropy": _entropy(target),
            "kl_to_target": metrics.kl_divergence(empirical, target) if empirical else math.inf,
            "tv_to_target": _tv_with_invalid({m: c / len(modes) for m, c in hist.items()}, target,
                                             1.0 - n_valid / len(modes)),
            "kl_floor": metrics.plug_in_kl_expected(len(support), n_valid) if n_valid else math.nan,
        })
    if not per_prompt:
        return {}
    result = {key: _mean(row[key] for row in per_prompt) for key in per_prompt[0]}
    for key in ("distinct", "n_modes"):  # counts stay integers with a single prompt, as ever
        if len(per_prompt) == 1:
            result[key] = int(result[key])
    return result


# ---------------------------------------------------------------- measuring a set of samples


def _mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values (inf kept); NaN if there are none."""
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else math.nan


def measure(task, samples: Samples, metric_names: Iterable[str], targets: Optional[dict] = None,
            threshold: Optional[float] = None, embed_fn: Optional[Callable] = None,
            self_bleu_max_texts: int = SELF_BLEU_MAX_TEXTS, same_meaning: float = 0.9) -> dict:
    """The metrics named in `metric_names` (keys of METRICS, `exact` excepted) of one set of samples.

    Diversity figures (unique fraction, distinct-n, self-BLEU, semantic diversity) are computed
    within each prompt's completions and averaged over prompts: texts for different prompts differ
    for reasons that say nothing about the sampler.
    """
    names = set(metric_names)
    texts, scores = samples.texts, samples.scores
    groups = list(samples.by_prompt().values())
    per_prompt = [[texts[i] for i in positions] for positions in groups]
    result: dict = {"n_samples": len(texts)}
    if "score" in names:
        summary = metrics.score_summary(scores.tolist())
        result.update({f"score_{key}": summary[key] for key in ("mean", "median", "max", "min", "std")})
        for term, values in samples.terms.items():
            term_summary = metrics.score_summary(values.tolist())
            result.update({f"terms/{term}/{key}": term_summary[key] for key in ("mean", "median", "max")})
    if "validity" in names:
        valid = float(torch.isfinite(scores).float().mean()) if len(texts) else math.nan
        satisfied = [not task.constraints.violations(tokens) for tokens in samples.tokens]
        result.update({
            "valid_fraction": valid,
            "valid_percent": 100.0 * valid,
            "constraints_satisfied_percent": 100.0 * statistics.fmean(satisfied) if satisfied else math.nan,
        })
    if "unique_fraction" in names:
        result["unique_fraction"] = _mean(metrics.unique_fraction(group) for group in per_prompt)
    if "distinct_n" in names:
        for n in (1, 2, 3):
            result[f"distinct_{n}"] = _mean(metrics.distinct_n(group, n) for group in per_prompt)
    if "self_bleu" in names:
        result["self_bleu"] = _mean(metrics.self_bleu(group, max_texts=self_bleu_max_texts) for group in per_prompt)
    if embed_fn is None and names & {"semantic_diversity", "above_threshold_by_meaning"}:
        from gf_odg.rewards.embedding import embed as embed_fn
    if "semantic_diversity" in names:
        result["semantic_diversity"] = _mean(metrics.semantic_diversity(group, embed_fn) for group in per_prompt)
    if "above_threshold" in names and threshold is not None:
        result["n_above_threshold"] = sum(
            metrics.count_above([texts[i] for i in positions], [float(scores[i]) for i in positions], threshold)
            for positions in groups)
    if "above_threshold_by_meaning" in names and threshold is not None:
        result["n_above_threshold_by_meaning"] = sum(
            metrics.count_above_by_meaning([texts[i] for i in positions], [float(scores[i]) for i in positions],
                                           threshold, embed_fn, same_meaning)
            for positions in groups)
    if "modes" in names and targets:
        result.update(_mode_metrics(task, samples, targets))
    return result


def sample_rows(task, samples: Samples) -> list[dict]:
    """One row per completion: prompt, completion, score (None for a hard violation), mode, decoding."""
    return [{"prompt": task.prompts[p], "completion": text,
             "score": float(score) if math.isfinite(score) else None,
             "mode": mode_of(task, text), "decoding": samples.decoding.name}
            for p, text, score in zip(samples.prompt_indices, samples.texts, samples.scores.tolist())]


# ---------------------------------------------------------------- the exact distribution


def enumerate_terminals(constraints, limit: int = 20000) -> Optional[list[list[int]]]:
    """Every completion (tokens incl. EOS) the constraint mask admits, or None if more than `limit`."""
    frontier, terminals = [[]], []
    for t in range(constraints.max_new_tokens):
        if not frontier:
            break
        prefix = torch.tensor(frontier, dtype=torch.long).reshape(len(frontier), t)
        allowed = constraints.mask(prefix, t)
        if int(allowed.sum()) + len(terminals) > limit:
            return None
        nxt = []
        for row, tokens in zip(allowed, frontier):
            for token in row.nonzero().flatten().tolist():
                (terminals if token == constraints.eos_id else nxt).append(tokens + [token])
        frontier = nxt
    return terminals


@torch.no_grad()
def exact_distribution(model, tokenizer, task, prompt_index: int, terminals: list[list[int]],
                       share_prefill: bool = True, batch_size: int = 512) -> torch.Tensor:
    """P_F(y|x) of every terminal completion: [len(terminals)]."""
    device = next(model.parameters()).device
    prompts = PromptBatch.build([task.prompt_tokens[prompt_index]], [task.prompts[prompt_index]],
                                tokenizer.pad_token_id, device)
    out = []
    for start in range(0, len(terminals), batch_size):
        chunk = terminals[start: start + batch_size]
        width = max(len(t) for t in chunk)
        tokens = torch.full((len(chunk), width), task.constraints.eos_id, dtype=torch.long, device=device)
        for i, t in enumerate(chunk):
            tokens[i, : len(t)] = torch.tensor(t)
        lengths = torch.tensor([len(t) for t in chunk], device=device)
        group = torch.zeros(len(chunk), dtype=torch.long, device=device)
        lp = score_completions(model, prompts, group, tokens, lengths, task.constraints, task.constraints.eos_id,
                               share_prefill=share_prefill)
        out.append(lp.total().float().cpu())
    return torch.cat(out).exp()


def exact_metrics(model, tokenizer, task, targets: dict[int, dict[str, float]], share_prefill: bool = True) -> dict:
    """Exact KL (valid mass renormalised) and TV (invalid mass included) of the policy at
    temperature 1 to each prompt's target, and its valid mass; averaged over prompts. {} when the
    completion space is too large to enumerate."""
    terminals = enumerate_terminals(task.constraints)
    if terminals is None:
        return {}
    modes = [mode_of(task, tokenizer.decode(t, skip_special_tokens=True)) for t in terminals]
    kls, tvs, valid = [], [], []
    for prompt_index, target in sorted(targets.items()):
        probs = exact_distribution(model, tokenizer, task, prompt_index, terminals, share_prefill)
        per_mode, invalid = Counter(), 0.0
        for mode, p in zip(modes, probs.tolist()):
            if mode is None:
                invalid += p
            else:
                per_mode[mode] += p
        valid_mass = sum(per_mode.values())
        conditional = {m: p / valid_mass for m, p in per_mode.items()} if valid_mass > 0 else {}
        kls.append(metrics.kl_divergence(conditional, target) if conditional else math.inf)
        tvs.append(_tv_with_invalid(per_mode, target, invalid))
        valid.append(valid_mass)
    return {"exact_kl": _mean(kls), "exact_tv": _mean(tvs), "exact_valid_mass": _mean(valid)}


# ---------------------------------------------------------------- evaluations


def evaluate_decodings(model, tokenizer, task, prompt_order: list[int], decodings: list[Decoding],
                       metric_names: Iterable[str], batch_size: int = 128, beta: float = 1.0, seed: int = 0,
                       share_prefill: bool = True, threshold: Optional[float] = None,
                       self_bleu_max_texts: int = SELF_BLEU_MAX_TEXTS,
                       progress: bool = False, same_meaning: float = 0.9) -> dict[str, tuple[dict, Samples]]:
    """{decoding name: (metrics, samples)}. Every decoding starts from the same seed (common random
    numbers: differences between decodings are not sampling noise of the seed). `exact` applies to
    the policy's own decoding only (temperature 1, no nucleus, one draw)."""
    names = set(metric_names)
    device = next(model.parameters()).device
    targets = mode_targets(task, beta) if names & {"modes", "exact"} else None
    results = {}
    for decoding in decodings:
        same = next((s for _, s in results.values() if s.decoding.is_policy), None) if decoding.is_policy else None
        if same is not None:  # temperature_1 beside the policy: the same draws
            samples = Samples(decoding, same.prompt_indices, same.texts, same.tokens, same.scores, same.terms)
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
            samples = draw_samples(model, tokenizer, task, prompt_order, decoding, batch_size, generator,
                                   share_prefill, progress)
        result = measure(task, samples, names - {"exact"}, targets, threshold,
                         self_bleu_max_texts=self_bleu_max_texts, same_meaning=same_meaning)
        if "exact" in names and targets and decoding.is_policy:
            result.update(exact_metrics(model, tokenizer, task, targets, share_prefill))
        results[decoding.name] = (result, samples)
    return results


def evaluate(model, tokenizer, task, n_samples: int = 512, batch_size: int = 128, beta: float = 1.0,
             seed: int = 0, share_prefill: bool = True, exact: bool = True,
             diversity: bool = False) -> tuple[dict, list[dict]]:
    """The end-of-training evaluation of the policy: (metrics, sample rows), `n_samples` completions
    spread evenly over the prompts. `diversity` adds self-BLEU and MiniLM semantic diversity
    (seconds to minutes on a CPU: off by default so that training runs stay short)."""
    names = set(METRICS) - NEEDS_THRESHOLD
    if not diversity:
        names -= SLOW_METRICS
    if not exact:
        names.discard("exact")
    order = [i % len(task.records) for i in range(n_samples)]
    result, samples = evaluate_decodings(model, tokenizer, task, order, [POLICY], names, batch_size, beta, seed,
                                         share_prefill)[POLICY.name]
    return result, sample_rows(task, samples)
