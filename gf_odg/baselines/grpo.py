"""TRL's `GRPOTrainer` on GF-ODG's plumbing: the external reward-maximising baseline of the benchmarks.

GRPO is set up to do the same work as our trainer, so that step times and trained policies compare:

- the same PEFT-wrapped model object (`gf_odg.model.loading.load_policy`: 4-bit NF4 where the model
  config says so, the same LoRA r / alpha / target modules, the same 4-bit kernel);
- the same prompts, rendered by our chat template into text: TRL tokenises a plain-text prompt as
  it is, and `prompt_texts` checks that this gives exactly our prompt tokens;
- the same reward callable, through `TRLReward`: TRL's rendered prompt is mapped back to the task's
  prompt (a reward such as `FluencyGuard` reads the prompt), per-prompt record fields (`concepts`)
  arrive as TRL passes dataset columns, and a hard violation (`-inf`) scores `floor` (what our RLOO
  does with `objective.log_reward_min`): an infinite reward would make GRPO's group mean NaN;
- K = `num_generations` completions per prompt, `prompts_per_step` prompts per optimiser step
  (one generation per step, no gradient accumulation, one iteration), at most `max_new_tokens`
  new tokens, temperature 1;
- `beta = 0`: no reference model and no KL term (our objectives with `ref_weight = 0` and RLOO
  with `kl_coef = 0` compute no reference pass either);
- AdamW at our learning rate, warm-up and schedule, gradient clipping at our norm.

What differs and cannot be equalised: TRL samples with `model.generate`, *without* our constraint
mask (hard constraints are ours; on `rng` GRPO's samples may be words, which the reward floors),
and it recomputes the prompt for every sample. TRL casts the LoRA weights of a quantised model to
bf16 (the QLoRA recipe); `lora_fp32=True` (the default here) casts them back before the optimiser
exists, so that both sides train the same fp32 adapters.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from gf_odg.rewards.base import call_reward, reward_name

# Keyword arguments that TRL adds to every reward call; our rewards accept and ignore them.
TRL_REWARD_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def prompt_texts(task, tokenizer) -> tuple[list[str], bool]:
    """Each task prompt as the text TRL tokenises (our rendering, chat template included), and
    whether TRL's tokenisation of that text gives exactly our prompt tokens for every prompt."""
    texts = [tokenizer.decode(tokens, skip_special_tokens=False) for tokens in task.prompt_tokens]
    same = all(tokenizer(text=text)["input_ids"] == list(tokens) for text, tokens in zip(texts, task.prompt_tokens))
    return texts, same


class TRLReward:
    """A GF-ODG reward as a TRL reward function: the task's own prompts, `-inf` floored.

    Records each call's completions and their token counts (`calls`), for the benchmark's reports.
    """

    def __init__(self, reward, text_to_prompt: dict[str, str], floor: float):
        self.reward = reward
        self.text_to_prompt = text_to_prompt
        self.floor = float(floor)
        self.__name__ = reward_name(reward)
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        ids = kwargs.get("completion_ids")
        extra = {k: v for k, v in kwargs.items() if k not in TRL_REWARD_KWARGS}
        raw_prompts = [self.text_to_prompt.get(p, p) for p in prompts]
        scores = call_reward(self.reward, raw_prompts, list(completions), **extra)
        self.calls.append({"texts": list(completions), "scores": scores.tolist(),
                           "lengths": [len(c) for c in ids] if ids is not None else None})
        return scores.clamp(min=self.floor).tolist()


class StepTimer:
    """A `TrainerCallback`: wall time of each optimiser step (generation, reward, forward/backward,
    optimiser; from `on_step_begin` to `on_step_end`, logging excluded)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._t0: Optional[float] = None

            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._t0)

        return _Timer()


def grpo_args(output_dir: Path, *, k: int, prompts_per_step: int, max_new_tokens: int, max_steps: int, lr: float,
              warmup_steps: int = 0, lr_schedule: str = "constant", min_lr_ratio: float = 0.0, grad_clip: float = 1.0,
              seed: int = 0, device: torch.device = torch.device("cpu"), beta: float = 0.0, **extra):
    """A GRPOConfig doing our trainer's work: K generations of `prompts_per_step` prompts per optimiser
    step, no reference model (beta = 0; beta > 0: a KL term to the starting policy, which TRL keeps as
    a frozen copy of the LoRA: the base model for a fresh one), fp32, nothing reported (no W&B),
    nothing saved; `extra`: further GRPOConfig fields."""
    from trl import GRPOConfig

    scheduler: dict[str, Any] = {
        "lr_scheduler_type": "constant_with_warmup" if lr_schedule == "constant" else lr_schedule}
    if lr_schedule == "cosine" and min_lr_ratio > 0:
        scheduler = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": min_lr_ratio}}
    # linear: transformers' linear schedule decays to 0, not to min_lr_ratio (the one difference)
    return GRPOConfig(
        output_dir=str(output_dir),
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
        per_device_train_batch_size=k * prompts_per_step,
        gradient_accumulation_steps=1,
        num_generations=k,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=max_new_tokens,
        temperature=1.0,
        beta=beta,
        learning_rate=lr,
        weight_decay=0.0,
        warmup_steps=warmup_steps,
        max_grad_norm=grad_clip,
        max_steps=max_steps,
        dataloader_num_workers=0,
        log_completions=False,
        **scheduler,
        **extra,
    )


def grpo_config_has(name: str) -> bool:
    """Whether the installed TRL's GRPOConfig has the field `name` (e.g. `entropy_coef`, which older
    TRL versions lack)."""
    import dataclasses

    from trl import GRPOConfig

    return name in {f.name for f in dataclasses.fields(GRPOConfig)}


def build_grpo_trainer(model, tokenizer, task, args, floor: float, lora_fp32: bool = True):
    """(GRPOTrainer, TRLReward, StepTimer, info) on our model, task prompts and reward."""
    from datasets import Dataset
    from trl import GRPOTrainer

    texts, same_tokens = prompt_texts(task, tokenizer)
    rows = [{**{k: v for k, v in record.items() if k != "prompt"}, "prompt": text}
            for record, text in zip(task.records, texts)]
    # Enough rows that the epoch boundary (a new shuffle) rarely falls inside a short run.
    repeat = max(1, math.ceil(64 / len(rows)))
    dataset = Dataset.from_list(rows * repeat)
    reward = TRLReward(task.reward, dict(zip(texts, task.prompts)), floor)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    cast = 0
    if lora_fp32:
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
                cast += 1
    adapter_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad})
    info = {"trl_prompt_tokens_match_ours": same_tokens, "trl_constraint_mask": False,
            "trl_lora_dtype": ",".join(adapter_dtypes), "trl_lora_params_cast_to_fp32": cast,
            "trl_reward_floor": float(floor), "trl_beta": float(args.beta),
            "trl_entropy_coef": float(getattr(args, "entropy_coef", 0.0)), "trl_loss_type": args.loss_type,
            "trl_scale_rewards": str(args.scale_rewards)}
    return trainer, reward, timer, info
