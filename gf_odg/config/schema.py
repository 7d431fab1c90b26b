"""Typed schemas for every config group, registered with Hydra's ConfigStore.

`configs/main.yaml` puts `gf_odg_schema` first in its defaults list, so each group's YAML is merged
into a typed node: a mistyped key (`trainer.max_stpes=3`) or a wrongly typed value fails at compose
time with Hydra's message naming the key. Value checks that types cannot express (a positive
learning rate, beta > 0, probabilities in [0, 1]) live in `gf_odg.config.validation` and run right after
composition, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from pathlib import Path

from omegaconf import MISSING, OmegaConf


@dataclass
class PathsConfig:
    root: str = MISSING
    models: str = MISSING
    hf_cache: str = MISSING
    base_models: str = MISSING
    adapted_models: str = MISSING
    checkpoints: str = MISSING


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | float32 | bfloat16 | float16


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TinyModelConfig:
    """Shape of a random Llama built from a config (source=tiny-random)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Larger than Llama's 0.02: with tied 64-d embeddings at 0.02 the logit gap between two tokens
    # is capped near 2.5 nats, too little for a LoRA policy to express a peaked target.
    initializer_range: float = 0.1
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING  # short name, used in run names
    name_or_path: str = MISSING  # HF hub id or local folder (for source=hub|local)
    source: str = "hub"  # hub | local | embedded | tiny-random
    type: str = "causal"
    dtype: str = "auto"  # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | float32 | bfloat16 | float16
    chat_template: bool = True
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: Optional[TinyModelConfig] = None


@dataclass
class EvaluationConfig:
    n_samples: int = 512
    before_training: bool = True
    batch_size: int = 128
    exact: bool = True  # enumerate the exact distribution where the task is enumerable
    exact_limit: int = 20000  # enumerate only when the mask admits at most this many completions
    plots: bool = True  # PNG plots of each evaluation in the run dir (about 2 s each on a CPU)


@dataclass
class DatasetConfig:  # prompts from `datasets` (gf_odg/data/hf_dataset.py)
    path: str = MISSING  # hub id, local .json/.jsonl/.csv/.parquet file, or folder
    name: Optional[str] = None
    split: str = "train"
    data_files: Optional[Any] = None
    prompt_column: str = "prompt"
    shuffle: bool = False
    seed: int = 0
    limit: Optional[int] = None


@dataclass
class TaskConfig:
    name: str = MISSING
    prompts: list[Any] = field(default_factory=list)  # strings, or mappings {prompt: ..., **extra}
    prompts_file: Optional[str] = None  # .txt (one prompt a line) or .jsonl ({"prompt": ...})
    system_prompt: Optional[str] = None
    chat_template: Optional[bool] = None  # None: the model config decides
    max_new_tokens: int = 16
    # The floor of log R that suits this task's reward scale: objective.log_reward_min follows it
    # (configs/objective/*.yaml); a hard violation's target mass is exp(floor) per completion.
    log_reward_min: float = -50.0
    constraints: Any = field(default_factory=dict)
    reward: Any = MISSING  # a Hydra `_target_` node: any callable (prompts, completions, **kw) -> scores
    reward_weights: Optional[list[float]] = None  # one per entry when `reward` is a list (TRL's reward_weights)
    dataset: Optional[DatasetConfig] = None  # prompts from a `datasets` dataset (hub id or local file/folder)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


@dataclass
class ObjectiveConfig:
    name: str = MISSING  # a key of gf_odg.objectives.OBJECTIVES (configs/objective/<name>.yaml)
    log_z: str = "scalar"  # scalar | conditioned (objectives that need a log Z)
    log_z_init: Optional[float] = 0.0  # null: from the first batch, mean(log R - log P_F)
    log_z_hidden: int = 64
    beta: float = 1.0  # reward temperature: log R = score / beta + lambda * log p_ref
    beta_end: Optional[float] = None
    beta_schedule: str = "constant"  # constant | linear | cosine
    beta_steps: int = 0
    ref_weight: float = 0.0  # lambda
    ref_masked: bool = False  # p_ref under the constraint mask (renormalised) instead of the base model's own
    ref_normalize: str = "none"  # none | length: the prior term is lambda * log p_ref / |y| (tokens incl. EOS)
    fluency_floor: Optional[float] = None  # mean per-token log p_ref below it: a hard violation (null: off)
    log_reward_min: float = -50.0
    subtb_lambda: float = 1.0
    kl_coef: float = 0.0  # rloo only


@dataclass
class ReplayConfig:
    enabled: bool = False
    capacity: int = 1000
    scope: str = "prompt"  # prompt | global
    priority: str = "softmax"  # uniform | rank | softmax | ratio (gf_odg/exploration/replay.py)
    priority_temperature: float = 1.0
    rescore: float = 0.25  # priority=ratio: entries rescored per draw, as a fraction of K (the stalest first)
    dedup: str = "exact"  # exact | edit | embedding
    dedup_threshold: float = 0.1
    min_log_reward: Optional[float] = None  # only trajectories at or above this enter the buffer
    fraction: float = 0.0
    fraction_end: Optional[float] = None
    fraction_steps: int = 0
    seed: str = "none"  # none | enumerate | auto: fill the buffer with every valid completion of an enumerable space (gf_odg/exploration/seeding.py)


@dataclass
class LocalSearchConfig:  # gf_odg/exploration/local_search.py (Kim et al. 2024)
    enabled: bool = False
    iterations: int = 1  # back-off-and-resample rounds per step
    back_off: float = 4  # >= 1: tokens backed off; in (0, 1): that fraction of each completion's length
    accept: str = "greedy"  # greedy (keep the higher log R) | metropolis (accept with min(1, R'/R))
    fraction: float = 1.0  # of the step's fresh samples refined


@dataclass
class ExplorationConfig:
    name: str = "on_policy"
    p_temper: float = 0.0
    temper_lo: float = 1.0
    temper_hi: float = 1.0
    temper_per: str = "batch"  # batch | sample
    epsilon: float = 0.0
    epsilon_end: Optional[float] = None
    epsilon_steps: int = 0
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    local_search: LocalSearchConfig = field(default_factory=LocalSearchConfig)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    prompts_per_step: int = 1
    samples_per_prompt: int = 32
    lr: float = 1e-3
    log_z_lr: float = 0.1
    log_z_head_lr: float = 0.01  # the prompt-conditioned log Z head's MLP
    weight_decay: float = 0.0
    warmup_steps: int = 5
    lr_schedule: str = "constant"  # constant | linear | cosine (after warm-up, to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    share_prompt_prefill: Any = "auto"  # true | false | auto (gf_odg/generation/sampling.py: resolve_share_prefill)
    score_chunk_rows: int = 128
    micro_batch_size: int = 0  # 0: score the whole batch at once; else accumulate over micro-batches
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    sample_table_every: int = 20
    max_nonfinite_steps: int = 5
    threads: int = 0  # torch threads on the CPU; 0 leaves torch's default
    deterministic: bool = False  # bit-identical reruns and resumes (torch's deterministic kernels; training/state.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit
    progress: bool = True


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | disabled
    project: Optional[str] = None  # default: $WANDB_PROJECT or "gf-odg"
    entity: Optional[str] = None  # default: $WANDB_ENTITY
    tags: list[str] = field(default_factory=list)
    jsonl: bool = True


@dataclass
class EvalConfig:
    """`eval:` of configs/eval.yaml (scripts/evaluate.py); null in a training run."""

    adapter: Optional[str] = None  # adapter folder, checkpoint step_* folder, or a run name; null: the base model
    samples_per_prompt: Optional[int] = None  # null: task.evaluation.n_samples spread over the prompts
    batch_size: Optional[int] = None  # null: task.evaluation.batch_size
    baselines: list[str] = field(default_factory=list)  # temperature_<T>, nucleus_<p>, best_of_n, best_of_<n>
    best_of_n: int = 4
    metrics: Optional[list[str]] = None  # null: every metric that applies (gf_odg.evaluation.measure.METRICS)
    threshold: Optional[float] = None  # score a completion must reach to count in n_above_threshold
    same_meaning: float = 0.9  # n_above_threshold_by_meaning: MiniLM cosine at which two completions count once
    beta: Optional[float] = None  # reward temperature of the target; null: the objective's final beta
    seed: Optional[int] = None  # null: the top-level seed
    exact: Optional[bool] = None  # null: task.evaluation.exact
    exact_limit: Optional[int] = None  # null: task.evaluation.exact_limit
    self_bleu_max_texts: int = 200  # self-BLEU is quadratic: a random subset per prompt (200 take ~1 s)
    plots: bool = True
    progress: bool = True


@dataclass
class MainConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    run_name: Optional[str] = None  # null: <task>-<objective>-<date>-<time>[-<job>]
    resume: Optional[str] = None  # null | auto | <checkpoint path>
    optimize_metric: str = "eval_after/score_mean"  # what train.py returns to a sweeper (maximised)
    eval: Optional[EvalConfig] = None  # scripts/evaluate.py's settings (configs/eval.yaml); unused by training


def repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def binomial_table(n: int, p: float) -> list[float]:
    """P(k) of Binomial(n, p) for k = 0..n: a ready non-uniform target for the rng task."""
    from math import comb

    return [comb(int(n), k) * float(p) ** k * (1 - float(p)) ** (int(n) - k) for k in range(int(n) + 1)]


def launch_time():
    from gf_odg.distributed import launch_time as shared

    return shared()


def register_configs() -> None:
    """Register the schema and resolvers; idempotent, called by every entry point before composing."""
    ConfigStore.instance().store(name="gf_odg_schema", node=MainConfig)
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", repo_root)
    if not OmegaConf.has_resolver("launch_time"):
        # Hydra's ${now:...}, but the same in every process of a multi-process launch (one run dir).
        OmegaConf.register_new_resolver("launch_time", lambda fmt: launch_time().strftime(fmt), use_cache=True)
    if not OmegaConf.has_resolver("binomial_table"):
        OmegaConf.register_new_resolver("binomial_table", binomial_table)
