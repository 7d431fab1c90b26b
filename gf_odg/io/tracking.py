"""Metrics sinks: a local `metrics.jsonl` in the run dir and a W&B run (offline without an API key).

Secrets never reach a sink: the config logged to W&B is scrubbed of any key that looks like a
credential and of any value equal to a secret in the environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
_SECRET_WORDS = ("token", "api_key", "apikey", "secret", "password")


def secret_values() -> list[str]:
    return [v for k in SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 4]


def scrub(obj: Any, secrets: Optional[list[str]] = None) -> Any:
    """Remove credential-like keys and mask secret values anywhere in a nested container."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) and v not in (None, "", False)
                    else scrub(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, secrets) for v in obj)
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, "***")
    return obj


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def jsonable(obj):
    """A nested container for JSON files, with the project's convention for non-finite numbers
    (as in metrics.jsonl and eval.json): "inf", "-inf", "nan" strings."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _table_cell(value):
    """A W&B table cell: numbers stay numbers, a non-finite score (a hard violation) becomes None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """Logs a flat dict of metrics per step to metrics.jsonl and W&B."""

    def __init__(self, cfg, run_dir: Path, run_name: str, config: dict, resume_id: Optional[str] = None,
                 enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") if enabled and cfg.jsonl else None
        self.wandb_run = None
        if enabled and cfg.wandb and cfg.mode != "disabled":
            self.wandb_run = self._init_wandb(cfg, run_name, scrub(config), resume_id)

    def _init_wandb(self, cfg, run_name: str, config: dict, resume_id: Optional[str]):
        import wandb

        mode = cfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=cfg.project or os.environ.get("WANDB_PROJECT") or "gf-odg",
            entity=cfg.entity or os.environ.get("WANDB_ENTITY") or None,
            name=run_name, config=config, dir=str(self.run_dir), mode=mode, tags=list(cfg.tags),
            id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False),
        )
        log.info("W&B run %s (%s) in %s", run.id, mode, run.dir)
        return run

    @property
    def run_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}) + "\n")
            self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int, key: str = "samples") -> None:
        """A new W&B table each time (a logged table is immutable; re-logging one object loses rows)."""
        if not self.enabled:
            return
        if self.wandb_run is not None and rows:
            import wandb

            columns = list(rows[0])
            data = [[_table_cell(r[c]) for c in columns] for r in rows]
            table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
            self.wandb_run.log({key: table}, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = _jsonable(v)

    def finish(self, exit_code: int = 0) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def read_offline_run(wandb_file: Path) -> dict:
    """Read an offline W&B run file (`run-<id>.wandb`): {"history": [...], "summary": {...},
    "config": {...}, "exit_code": int | None}. For tests and for inspecting a run without syncing.

    The file is a LevelDB-style log (32 KiB blocks of records with a 7-byte header: crc32c, length,
    type FULL/FIRST/MIDDLE/LAST) after a 7-byte W&B header; each record is a protobuf `Record`.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(wandb_file).read_bytes()
    block, header, pos = 32768, 7, 7
    payloads, pending = [], b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4: pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + header: pos + header + length]
        pos += header + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
            pending = b""
        elif kind == 0:
            break
    result = {"history": [], "summary": {}, "config": {}, "exit_code": None}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")

        def key(item):
            return item.key or "/".join(item.nested_key)

        if kind == "history":
            result["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            result["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            result["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            result["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "exit":
            result["exit_code"] = record.exit.exit_code
    return result
