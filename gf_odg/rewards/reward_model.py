"""A sequence-classification model as a reward (TRL's `reward_funcs="org/reward-model"`).

    score(x, y) = transform(logits(x ⊕ y))[label]

`transform`: `logit` (the raw logit, TRL's convention with `label=0`), `logsigmoid` (log σ(logit):
log P(label) of a one-vs-rest classifier, ≤ 0) or `logsoftmax` (log P(label) of a multi-class
classifier, ≤ 0). `label`: an index, or a class name from the model's `id2label` ("POSITIVE").
`text`: `prompt_completion` (prompt + completion, as TRL; a conversation is rendered with the
reward model's own chat template when it has one) or `completion` (the completion alone, e.g. a
toxicity classifier that should not read the prompt). Batched, without gradients, on the policy's
device once `bind` has run (the CPU before).

    task.reward=org/model-id                      # a hub id or a local folder, TRL's defaults
    reward: {_target_: gf_odg.rewards.reward_model.RewardModel, model: ./my-clf,
             label: POSITIVE, transform: logsoftmax, text: completion}
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from gf_odg.errors import ConfigError

TRANSFORMS = ("logit", "logsigmoid", "logsoftmax")
TEXTS = ("prompt_completion", "completion")


class RewardModel:
    conversational = True  # reads conversations as TRL passes them, and renders them itself

    def __init__(self, model: str, label: Union[int, str] = 0, transform: str = "logit",
                 text: str = "prompt_completion", batch_size: int = 16, max_length: int = 512,
                 scale: float = 1.0, key: str = "task.reward"):
        if transform not in TRANSFORMS:
            raise ConfigError(f"{key}.transform={transform!r}: expected one of {', '.join(TRANSFORMS)}.")
        if text not in TEXTS:
            raise ConfigError(f"{key}.text={text!r}: expected one of {', '.join(TEXTS)}.")
        if batch_size < 1 or max_length < 1:
            raise ConfigError(f"{key}.batch_size and {key}.max_length must be positive.")
        self.transform, self.text, self.batch_size, self.max_length = transform, text, batch_size, max_length
        self.scale = float(scale)
        self.model, self.tokenizer = _load(str(model), key)
        self.name = Path(str(model).rstrip("/")).name
        self.label = _label_index(label, self.model.config, key)

    def bind(self, model, tokenizer) -> None:
        """Move to the policy's device (the policy itself is not used)."""
        device = next(model.parameters()).device
        self.model.to(device)

    def _texts(self, prompts, completions) -> list[str]:
        texts = []
        for prompt, completion in zip(prompts, completions):
            reply = completion[-1]["content"] if isinstance(completion, list) else completion
            if self.text == "completion":
                texts.append(reply)
            elif isinstance(prompt, list):  # a conversation
                messages = list(prompt) + [{"role": "assistant", "content": reply}]
                if getattr(self.tokenizer, "chat_template", None):
                    texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
                else:
                    texts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
            else:
                texts.append(prompt + reply)
        return texts

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = self._texts(prompts, completions)
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start: start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length, padding_side="right")
            logits = self.model(**batch.to(device)).logits.float()  # [B, num_labels]
            if self.transform == "logsigmoid":
                logits = torch.nn.functional.logsigmoid(logits)
            elif self.transform == "logsoftmax":
                logits = torch.log_softmax(logits, dim=-1)
            scores.append(logits[:, self.label].cpu())
        return (self.scale * torch.cat(scores)).tolist() if scores else []


def _load(model: str, key: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = Path(model).expanduser()
    where = str(local) if local.exists() else model
    if local.exists() and not (local / "config.json").is_file():
        raise ConfigError(f"{key}={model!r}: the folder has no config.json; give a saved "
                          "sequence-classification model (save_pretrained) or a hub id.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        classifier = AutoModelForSequenceClassification.from_pretrained(where)
    except (OSError, ValueError, KeyError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{key}={model!r}: could not load a sequence-classification model ({detail}). Give a local folder, "
            "or a hub id with network access (HF_TOKEN for a gated one; HF_HUB_OFFLINE=1 uses the cache only)."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if classifier.config.pad_token_id is None:  # decoder classifiers find the last token through it
        classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier.eval().requires_grad_(False)
    return classifier, tokenizer


def _label_index(label: Union[int, str], config, key: str) -> int:
    count = int(getattr(config, "num_labels", 1))
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        names = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
        if label not in names:
            raise ConfigError(f"{key}.label={label!r}: the model's labels are {sorted(names)}; give one or an index.")
        return names[label]
    index = int(label)
    if not 0 <= index < count:
        raise ConfigError(f"{key}.label={index}: the model has {count} output(s); give an index in 0..{count - 1}.")
    return index


def is_model_reference(name: str) -> Optional[str]:
    """`name` as a reward model reference (a local folder, or a hub id `org/name`), else None."""
    if Path(name).expanduser().is_dir():
        return name
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and " " not in name and not name.startswith((".", "~")):
        return name
    return None
