"""Value checks that types cannot express, run right after composition and before any model loads.

Each failure names the key, the value and what is expected; all failures are reported together.
"""

from __future__ import annotations

import math

from gf_odg.errors import ConfigError
from gf_odg.log_reward import REF_NORMALIZE
from gf_odg.exploration.replay import PRIORITIES
from gf_odg.objectives import OBJECTIVES


def off_policy_keys(x) -> list[str]:
    """The exploration settings (as key=value) that make the behaviour policy differ from P_F."""
    keys = []
    if x.p_temper > 0 and not (x.temper_lo == 1 == x.temper_hi):
        keys.append(f"exploration.p_temper={x.p_temper} (temperatures in [{x.temper_lo}, {x.temper_hi}])")
    if x.epsilon > 0 or (x.epsilon_end or 0) > 0:
        keys.append(f"exploration.epsilon={x.epsilon}" + (f" (epsilon_end={x.epsilon_end})" if x.epsilon_end else ""))
    if x.replay.enabled:
        keys.append("exploration.replay.enabled=true")
    if x.local_search.enabled:
        keys.append("exploration.local_search.enabled=true")
    return keys


def validate(cfg) -> None:
    problems: list[str] = []

    def need(ok: bool, key: str, value, expected: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r}: expected {expected}")

    t, o, x, task, m = cfg.trainer, cfg.objective, cfg.exploration, cfg.task, cfg.model
    need(t.lr > 0, "trainer.lr", t.lr, "a positive learning rate")
    need(t.log_z_lr > 0, "trainer.log_z_lr", t.log_z_lr, "a positive learning rate")
    need(t.log_z_head_lr > 0, "trainer.log_z_head_lr", t.log_z_head_lr, "a positive learning rate")
    need(t.max_steps >= 0, "trainer.max_steps", t.max_steps, ">= 0")
    need(t.samples_per_prompt >= 1, "trainer.samples_per_prompt", t.samples_per_prompt, ">= 1")
    need(t.prompts_per_step >= 1, "trainer.prompts_per_step", t.prompts_per_step, ">= 1")
    need(t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "> 0")
    need(t.lr_schedule in ("constant", "linear", "cosine"), "trainer.lr_schedule", t.lr_schedule,
         "constant, linear or cosine")
    need(0 <= t.min_lr_ratio <= 1, "trainer.min_lr_ratio", t.min_lr_ratio, "in [0, 1]")
    need(t.warmup_steps >= 0, "trainer.warmup_steps", t.warmup_steps, ">= 0")
    need(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, ">= 0 (0: only at the end)")
    need(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, ">= 1")
    need(t.score_chunk_rows >= 1, "trainer.score_chunk_rows", t.score_chunk_rows, ">= 1")
    need(t.micro_batch_size >= 0, "trainer.micro_batch_size", t.micro_batch_size, ">= 0")
    need(t.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps", t.max_nonfinite_steps, ">= 1")
    need(t.share_prompt_prefill in (True, False, "auto"), "trainer.share_prompt_prefill", t.share_prompt_prefill,
         "true, false or auto")

    need(o.name in OBJECTIVES, "objective.name", o.name, f"one of {', '.join(OBJECTIVES)}")
    need(o.beta > 0, "objective.beta", o.beta, "> 0 (the reward temperature)")
    if o.beta_end is not None:
        need(o.beta_end > 0, "objective.beta_end", o.beta_end, "> 0")
    need(o.beta_schedule in ("constant", "linear", "cosine"), "objective.beta_schedule", o.beta_schedule,
         "constant, linear or cosine")
    need(math.isfinite(o.log_reward_min), "objective.log_reward_min", o.log_reward_min, "a finite number")
    need(o.ref_normalize in REF_NORMALIZE, "objective.ref_normalize", o.ref_normalize, " or ".join(REF_NORMALIZE))
    if o.fluency_floor is not None:
        need(math.isfinite(o.fluency_floor) and o.fluency_floor < 0, "objective.fluency_floor", o.fluency_floor,
             "a finite negative number (a mean per-token log p_ref, e.g. -4.0) or null (off)")
        need(not o.ref_masked, "objective.ref_masked", o.ref_masked,
             "false with objective.fluency_floor (the floor reads the base model's own unmasked log p_ref)")
    need(o.log_z in ("scalar", "conditioned"), "objective.log_z", o.log_z, "scalar or conditioned")
    need(o.subtb_lambda > 0, "objective.subtb_lambda", o.subtb_lambda, "> 0")
    need(o.kl_coef >= 0, "objective.kl_coef", o.kl_coef, ">= 0")
    objective = OBJECTIVES.get(o.name)
    if objective is not None and objective.min_samples_per_prompt > 1:
        need(t.samples_per_prompt >= objective.min_samples_per_prompt, "trainer.samples_per_prompt",
             t.samples_per_prompt, f">= {objective.min_samples_per_prompt} for objective={o.name} "
             "(it compares the K samples of a prompt)")
    if objective is not None and objective.on_policy_only:
        off_policy = off_policy_keys(x)
        if off_policy:
            problems.append(
                f"objective={o.name} is on-policy only (its loss is unbiased only for samples drawn from the "
                f"policy itself), but {', '.join(off_policy)} sample off-policy: add exploration=on_policy "
                "(or set those to 0 / false)")

    need(task.max_new_tokens >= 1, "task.max_new_tokens", task.max_new_tokens, ">= 1")
    need(task.evaluation.n_samples >= 1, "task.evaluation.n_samples", task.evaluation.n_samples, ">= 1")
    need(task.evaluation.batch_size >= 1, "task.evaluation.batch_size", task.evaluation.batch_size, ">= 1")
    need(task.evaluation.exact_limit >= 1, "task.evaluation.exact_limit", task.evaluation.exact_limit, ">= 1")

    for key in ("p_temper", "epsilon"):
        need(0 <= x[key] <= 1, f"exploration.{key}", x[key], "a probability in [0, 1]")
    if x.epsilon_end is not None:
        need(0 <= x.epsilon_end <= 1, "exploration.epsilon_end", x.epsilon_end, "a probability in [0, 1]")
    need(x.temper_lo > 0, "exploration.temper_lo", x.temper_lo, "a positive temperature")
    need(x.temper_hi > 0, "exploration.temper_hi", x.temper_hi, "a positive temperature")
    need(x.temper_lo <= x.temper_hi, "exploration.temper_lo", x.temper_lo,
         f"<= exploration.temper_hi ({x.temper_hi})")
    need(x.temper_per in ("batch", "sample"), "exploration.temper_per", x.temper_per, "batch or sample")
    r = x.replay
    need(0 <= r.fraction <= 1, "exploration.replay.fraction", r.fraction, "a fraction in [0, 1]")
    if r.fraction_end is not None:
        need(0 <= r.fraction_end <= 1, "exploration.replay.fraction_end", r.fraction_end, "a fraction in [0, 1]")
    if r.enabled:
        need(r.capacity >= 1, "exploration.replay.capacity", r.capacity, ">= 1 when replay is enabled")
        need(r.priority_temperature > 0, "exploration.replay.priority_temperature", r.priority_temperature, "> 0")
        need(0 <= r.rescore <= 1, "exploration.replay.rescore", r.rescore, "in [0, 1]")
        need(r.priority in PRIORITIES, "exploration.replay.priority", r.priority, ", ".join(PRIORITIES))
        need(r.scope in ("prompt", "global"), "exploration.replay.scope", r.scope, "prompt or global")
        need(r.dedup in ("exact", "edit", "embedding"), "exploration.replay.dedup", r.dedup, "exact, edit or embedding")
        need(r.seed in ("none", "enumerate", "auto"), "exploration.replay.seed", r.seed, "none, enumerate or auto")
    elif r.fraction > 0 or (r.fraction_end or 0) > 0:
        problems.append("exploration.replay.fraction > 0 but exploration.replay.enabled=false: enable replay")

    ls = x.local_search
    if ls.enabled:
        need(ls.iterations >= 1, "exploration.local_search.iterations", ls.iterations, ">= 1 (rounds per step)")
        need(ls.back_off > 0 and (ls.back_off < 1 or float(ls.back_off).is_integer()),
             "exploration.local_search.back_off", ls.back_off,
             "a whole number of tokens >= 1, or a fraction of the length in (0, 1)")
        need(ls.accept in ("greedy", "metropolis"), "exploration.local_search.accept", ls.accept,
             "greedy or metropolis")
        need(0 < ls.fraction <= 1, "exploration.local_search.fraction", ls.fraction,
             "a fraction in (0, 1] of the fresh samples")

    need(m.source in ("hub", "local", "embedded", "tiny-random"), "model.source", m.source,
         "hub, local, embedded or tiny-random")
    need(m.quantization.quant_type in ("nf4", "fp4"), "model.quantization.quant_type", m.quantization.quant_type,
         "nf4 or fp4")
    need(m.lora.r >= 1, "model.lora.r", m.lora.r, ">= 1")
    need(0 <= m.lora.dropout < 1, "model.lora.dropout", m.lora.dropout, "in [0, 1)")
    if m.source == "tiny-random":
        need(m.tiny is not None, "model.tiny", m.tiny, "a tiny model shape for source=tiny-random")

    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
