"""Prompts from a `datasets` dataset, as a TRL user has them: `task.dataset`.

    task:
      dataset:
        path: trl-lib/tldr          # a hub id, a local .json/.jsonl/.csv/.parquet file, or a folder
        name: null                  # the hub dataset's configuration
        split: train
        data_files: null            # as in datasets.load_dataset
        prompt_column: prompt       # TRL's column; a string or a conversation (a list of messages)
        shuffle: false
        seed: 0
        limit: null                 # the first N rows (after shuffling)

Every other column reaches the reward as a per-sample keyword argument, as in TRL. A folder written
by `Dataset.save_to_disk` is read with `load_from_disk`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from gf_odg.errors import ConfigError

KEYS = ("path", "name", "split", "data_files", "prompt_column", "shuffle", "seed", "limit")
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_dataset_records(spec: Any, root: Optional[str] = None, key: str = "task.dataset") -> list[dict]:
    """The dataset's rows as prompt records `{"prompt": ..., **other columns}` (the prompt column renamed)."""
    spec = dict(spec) if isinstance(spec, Mapping) else {"path": spec}
    unknown = set(spec) - set(KEYS)
    if unknown:
        raise ConfigError(f"{key} has unknown key(s) {sorted(unknown)}; expected {', '.join(KEYS)}.")
    if not spec.get("path") or spec.get("path") == "???":
        raise ConfigError(f"{key}.path is not set; give a hub dataset id or a local file or folder "
                          f"({key}.path=my_prompts.jsonl).")
    dataset = _load(spec, root, key)
    column = spec.get("prompt_column") or "prompt"
    if column not in dataset.column_names:
        raise ConfigError(f"{key}.prompt_column={column!r}: the dataset's columns are {dataset.column_names}; "
                          "name the one holding the prompts.")
    if spec.get("shuffle"):
        dataset = dataset.shuffle(seed=int(spec.get("seed") or 0))
    if spec.get("limit") is not None:
        limit = int(spec["limit"])
        if limit < 1:
            raise ConfigError(f"{key}.limit={limit} must be a positive number of rows (or null for all).")
        dataset = dataset.select(range(min(limit, len(dataset))))
    records = []
    for row in dataset:
        record = {k: v for k, v in row.items() if k != column}
        record["prompt"] = row[column]
        records.append(record)
    return records


def _load(spec: dict, root: Optional[str], key: str):
    import datasets

    datasets.disable_progress_bars()  # a progress bar per load would break our own console lines
    path = str(spec["path"])
    local = Path(path).expanduser()
    if not local.is_absolute() and root is not None and not local.exists() and (Path(root) / local).exists():
        local = Path(root) / local
    split = spec.get("split") or "train"
    try:
        if local.is_dir() and (local / "dataset_info.json").is_file() and (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
            return loaded
        if local.is_file():
            builder = _BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ConfigError(f"{key}.path={path!r}: unknown file type {local.suffix!r}; "
                                  f"expected one of {', '.join(sorted(_BUILDERS))}.")
            return datasets.load_dataset(builder, data_files=str(local), split=split)
        if not local.exists() and _looks_local(path):
            raise ConfigError(f"{key}.path={path!r}: no such file or folder.")
        return datasets.load_dataset(str(local) if local.exists() else path, spec.get("name"), split=split,
                                     data_files=spec.get("data_files"))
    except ConfigError:
        raise
    except KeyError as err:  # a DatasetDict without that split
        raise ConfigError(f"{key}.split={split!r}: the dataset has no such split ({err}).") from None
    except Exception as err:  # noqa: BLE001 - datasets raises many types (hub, network, parsing); one line each
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:240]
        hint = ("check the id and the network (HF_TOKEN for a private one; HF_DATASETS_OFFLINE=1 uses the cache)"
                if not local.exists() else "check the file's format")
        raise ConfigError(f"{key}.path={path!r} could not be loaded ({type(err).__name__}: {detail}); "
                          f"{hint}.") from None


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in _BUILDERS or path.count("/") > 1
