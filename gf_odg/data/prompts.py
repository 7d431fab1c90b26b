"""Prompts: loading them from a task config, applying the chat template, batching with left padding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gf_odg.errors import ConfigError


def load_prompts(task_cfg, root: str | None = None) -> list[dict]:
    """Prompt records `{"prompt": str, **extra}` from inline `task.prompts` (strings or mappings) and a
    `.txt` (one prompt a line) or `.jsonl` (`{"prompt": ..., **extra}`) `task.prompts_file`.
    Extra fields (e.g. `concepts`) reach the reward as per-completion keyword arguments."""
    prompts = []
    for number, entry in enumerate(task_cfg.prompts or []):
        if isinstance(entry, str):
            prompts.append({"prompt": entry})
        elif hasattr(entry, "keys") and "prompt" in entry:
            prompts.append({str(k): (v if isinstance(v, (str, int, float)) else list(v)) for k, v in entry.items()})
        else:
            raise ConfigError(f"task.prompts[{number}] must be a string or a mapping with a 'prompt' key.")
    if task_cfg.prompts_file:
        path = Path(task_cfg.prompts_file)
        if not path.is_absolute() and root is not None and not path.exists():
            path = Path(root) / path
        if not path.is_file():
            raise ConfigError(f"task.prompts_file={task_cfg.prompts_file!r}: no such file ({path}).")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    record["prompt"] = str(record["prompt"])
                    prompts.append(record)
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ConfigError(
                        f"task.prompts_file={str(path)!r} line {number}: expected a JSON object with a "
                        f"'prompt' key ({type(err).__name__})."
                    ) from None
        else:
            prompts.extend({"prompt": line.strip()} for line in text.splitlines() if line.strip())
    prompts = [p for p in prompts if p["prompt"].strip()]
    if not prompts:
        where = f"task.prompts_file={task_cfg.prompts_file!r}" if task_cfg.prompts_file else "task.prompts"
        raise ConfigError(f"{where}: no prompts; give at least one non-empty prompt.")
    return prompts


def render_prompt(tokenizer, prompt: str, chat_template: bool, system_prompt: str | None) -> list[int]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return tokenizer.encode(text, add_special_tokens=True)


@dataclass
class PromptBatch:
    """Distinct prompts, left padded: the samples of a batch point at them through a group index."""

    input_ids: torch.Tensor  # [P, L]
    attention_mask: torch.Tensor  # [P, L]
    lengths: torch.Tensor  # [P] real (unpadded) lengths
    texts: list[str]

    @classmethod
    def build(cls, token_lists: list[list[int]], texts: list[str], pad_id: int, device) -> "PromptBatch":
        width = max(len(t) for t in token_lists)
        ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            ids[i, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            mask[i, width - len(tokens):] = 1
        lengths = mask.sum(dim=1)
        return cls(ids.to(device), mask.to(device), lengths.to(device), list(texts))

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [P, L]

    def __len__(self) -> int:
        return self.input_ids.shape[0]
