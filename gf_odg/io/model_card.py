"""The model card written with a trained adapter (README.md in its folder, shown by the Hub as-is).

It says what the adapter is (base model, objective, task, reward), how it was trained (the key
hyper-parameters, the resolved config, scrubbed of secrets), what it measured (the before/after
evaluation table, when there is one) and how to load it with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from gf_odg.io.tracking import scrub

TABLE_KEYS = ("score_mean", "valid_fraction", "unique_fraction", "distinct", "n_modes", "kl_to_target",
              "tv_to_target", "mode_entropy", "exact_kl", "exact_tv", "exact_valid_mass")
OBJECTIVES = {"tb": "trajectory balance", "vargrad": "VarGrad (log-variance) trajectory balance",
              "subtb": "modified sub-trajectory balance",
              "rloo": "REINFORCE leave-one-out (a reward-maximising baseline)"}


def write_model_card(adapter_dir, cfg, before: Optional[dict] = None, after: Optional[dict] = None,
                     steps: Optional[int] = None, base_model: Optional[str] = None) -> Path:
    """Write `adapter_dir/README.md` atomically; returns its path. `base_model`: what to pass to
    `from_pretrained` for the base (default: `cfg.model.name_or_path`)."""
    path = Path(adapter_dir) / "README.md"
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(model_card(cfg, before, after, steps, base_model, adapter_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path


def model_card(cfg, before=None, after=None, steps=None, base_model=None, adapter_dir=None) -> str:
    config = scrub(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else scrub(dict(cfg))
    model, task, objective = config["model"], config["task"], config["objective"]
    trainer, exploration = config.get("trainer", {}), config.get("exploration", {})
    base = str(base_model or model["name_or_path"])
    hub_base = base.count("/") == 1 and not base.startswith((".", "/", "~"))
    name = config.get("run_name") or Path(str(adapter_dir or "adapter")).name
    front = ["---", "library_name: peft", "pipeline_tag: text-generation",
             "tags: [gf-odg, gflownet, lora, peft]"] + ([f"base_model: {base}"] if hub_base else []) + ["---", ""]
    beta = objective.get("beta", 1.0)
    lines = front + [
        f"# {name}",
        "",
        f"A LoRA adapter for `{base}` trained with GF-ODG using the "
        f"**{objective['name']}** objective ({OBJECTIVES.get(objective['name'], objective['name'])}): it learns to "
        f"sample completions in proportion to exp(score / β), β = {beta}, rather than to maximise the score.",
        "",
        "## Task",
        "",
        f"- task: `{task['name']}`",
        f"- reward: {_reward_text(task.get('reward'), task.get('reward_weights'))}",
        f"- completions of at most {task.get('max_new_tokens')} tokens",
        "",
        "## Training",
        "",
        "| key | value |",
        "|---|---|",
    ]
    rows = {
        "objective.name": objective.get("name"), "objective.beta": beta,
        "objective.log_reward_min": objective.get("log_reward_min"),
        "objective.ref_weight": objective.get("ref_weight"),
        "trainer.max_steps": trainer.get("max_steps"), "steps trained": steps,
        "trainer.prompts_per_step": trainer.get("prompts_per_step"),
        "trainer.samples_per_prompt": trainer.get("samples_per_prompt"), "trainer.lr": trainer.get("lr"),
        "model.lora.r": model.get("lora", {}).get("r"), "model.lora.alpha": model.get("lora", {}).get("alpha"),
        "model.lora.target_modules": model.get("lora", {}).get("target_modules"),
        "exploration.name": exploration.get("name"), "seed": config.get("seed"),
    }
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows.items() if v is not None]
    lines += ["", "## Evaluation", ""] + _eval_table(before, after) + [
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "<this folder or its Hub repo id>")',
        "```",
        "",
        "## Configuration",
        "",
        "<details><summary>The resolved config of the run</summary>",
        "",
        "```yaml",
        OmegaConf.to_yaml(OmegaConf.create(config)).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def _reward_text(reward, weights) -> str:
    if isinstance(reward, list):
        weights = weights or [1.0] * len(reward)
        return "a weighted sum of " + ", ".join(f"{w} × `{_reward_text(r, None).strip('`')}`"
                                                for r, w in zip(reward, weights))
    if isinstance(reward, dict):
        target = reward.get("_target_", "?")
        args = ", ".join(f"{k}={v}" for k, v in reward.items() if k != "_target_" and not isinstance(v, (dict, list)))
        return f"`{target}({args})`"
    return f"`{reward}`"


def _eval_table(before, after) -> list[str]:
    if not after:
        return ["No evaluation was run."]
    keys = [k for k in TABLE_KEYS if isinstance(after.get(k), (int, float))]
    lines = ["| metric | before training | after training |", "|---|---|---|"]
    return lines + [f"| {k} | {_cell((before or {}).get(k))} | {_cell(after[k])} |" for k in keys]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
