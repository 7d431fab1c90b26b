"""Loading what scripts/evaluate.py evaluates: a trained adapter on its base model, or the base model.

    resolve_adapter        `eval.adapter` (a folder, a checkpoint, a run name) -> the adapter folder
    load_evaluated_policy  the base model with that adapter (or fresh LoRA, B = 0: the base model itself)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from gf_odg.errors import GFODGError


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
