"""Prompts: loading them from a task config, applying the chat template, batching with left padding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gf_odg.errors import ConfigError


def load_prompts(task_cfg, root: str | None = None) -> list[dict]:
    """Prompt records `{"prompt": str, **extra}` from inline `task.prompts` (strings or mappings), a
    `task.prompts_file` (`.txt`: one prompt a line; `.jsonl`: `{"prompt": ..., **extra}`; `.json`, `.csv`,
    `.parquet`: read with `datasets`) and a `task.dataset` (see `hf_dataset`).
    Extra fields (e.g. `concepts`) reach the reward as per-completion keyword arguments. A prompt that
    is a conversation (TRL's conversational format, a list of `{"role", "content"}`) is kept under
    `_messages` (rendered with the chat template); its `prompt` is the text shown in logs."""
    prompts = []
    for number, entry in enumerate(task_cfg.prompts or []):
        if isinstance(entry, str):
            prompts.append({"prompt": entry})
        elif hasattr(entry, "keys") and "prompt" in entry:
            prompts.append({str(k): _plain(v) for k, v in entry.items()})
        else:
            raise ConfigError(f"task.prompts[{number}] must be a string or a mapping with a 'prompt' key.")
    if task_cfg.prompts_file:
        prompts.extend(_read_prompts_file(task_cfg.prompts_file, root))
    dataset = OmegaConf.select(task_cfg, "dataset", default=None) if OmegaConf.is_config(task_cfg) else None
    if dataset is not None:
        from gf_odg.data.hf_dataset import load_dataset_records

        spec = OmegaConf.to_container(dataset, resolve=True) if OmegaConf.is_config(dataset) else dataset
        prompts.extend(load_dataset_records(spec, root))
    prompts = [_normalise(record, number) for number, record in enumerate(prompts)]
    prompts = [p for p in prompts if p["prompt"].strip()]
    if not prompts:
        where = f"task.prompts_file={task_cfg.prompts_file!r}" if task_cfg.prompts_file else "task.prompts"
        where = "task.dataset" if dataset is not None else where
        raise ConfigError(f"{where}: no prompts; give at least one non-empty prompt.")
    return prompts


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _read_prompts_file(name: str, root: str | None) -> list[dict]:
    key = f"task.prompts_file={name!r}"
    path = Path(name)
    if not path.is_absolute() and root is not None and not path.exists():
        path = Path(root) / path
    if not path.is_file():
        raise ConfigError(f"{key}: no such file ({path}).")
    if path.suffix.lower() in (".json", ".csv", ".parquet"):
        from gf_odg.data.hf_dataset import load_dataset_records

        return load_dataset_records({"path": str(path)}, root, key="task.prompts_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}: not UTF-8 text (byte {err.start}: {err.reason}); save the file as UTF-8.") from None
    except OSError as err:
        raise ConfigError(f"{key}: cannot be read ({err.strerror or type(err).__name__}).") from None
    if path.suffix != ".jsonl":
        return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["prompt"]  # noqa: B018 - the key must be there
            records.append(record)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(
                f"task.prompts_file={str(path)!r} line {number}: expected a JSON object with a "
                f"'prompt' key ({type(err).__name__})."
            ) from None
    return records


def is_conversation(value) -> bool:
    """TRL's test: a non-empty list whose first item is a mapping with a `role`."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _normalise(record: dict, number: int) -> dict:
    prompt = record["prompt"]
    if is_conversation(prompt):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise ConfigError(f"prompt {number}: a conversation must be a list of {{role, content}} messages.")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        shown = messages[0]["content"] if len(messages) == 1 else "\n".join(
            f"{m['role']}: {m['content']}" for m in messages)
        return {**record, "prompt": shown, "_messages": messages}
    if prompt is None or isinstance(prompt, (list, dict)):
        raise ConfigError(f"prompt {number}: expected a string or a conversation (a list of {{role, content}} "
                          f"messages), got {type(prompt).__name__}.")
    return {**record, "prompt": str(prompt)}


def render_prompt(tokenizer, prompt: str, chat_template: bool, system_prompt: str | None,
                  messages: list | None = None) -> list[int]:
    """The prompt's token ids. A conversation (`messages`) always goes through the chat template, as in TRL."""
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("task: the prompts are conversations (lists of messages) but the model's tokenizer has "
                              "no chat template; use plain-string prompts or a chat model.")
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + list(messages)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
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
