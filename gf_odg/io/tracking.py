"""Metrics sinks: a local `metrics.jsonl` in the run dir and a W&B run.

W&B as its users expect: `logger.mode=auto` follows `WANDB_MODE` when set, else runs online with a
`WANDB_API_KEY` and offline without one (a one-line notice). `WANDB_PROJECT`, `WANDB_ENTITY`,
`WANDB_DIR`, `WANDB_TAGS` (comma-separated) and `WANDB_RUN_GROUP` are honoured; a config key set
explicitly (`logger.project=...`) wins. When an online run cannot start (a rejected key, no network
within `WANDB_INIT_TIMEOUT`, default 30 s here) training goes on offline, with one warning line
saying how to sync later: never a stack trace, never an unbounded wait.

Secrets never reach a sink nor the console: the config logged to W&B is scrubbed of any key that
looks like a credential and of any value equal to a secret in the environment, and so are the
messages of W&B's errors that we print.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from gf_odg.errors import ConfigError

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 30.0  # an online start that takes longer falls back to offline

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


def resolve_mode(mode: str) -> str:
    """`logger.mode` as W&B's mode: auto follows WANDB_MODE, else online with an API key, else offline."""
    if mode != "auto":
        return mode
    env = (os.environ.get("WANDB_MODE") or "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if env:
        raise ConfigError(f"WANDB_MODE={env!r}: expected online, offline or disabled.")
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    log.warning("W&B: no WANDB_API_KEY, logging offline (set WANDB_MODE=offline to silence this, "
                "or `wandb sync` the run later).")
    return "offline"


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()).split(" Consider increasing")[0] or type(err).__name__
    return f"{type(err).__name__}: {text[:240]}"


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

        os.environ.setdefault("WANDB_SILENT", "true")
        mode = resolve_mode(cfg.mode)
        tags = list(cfg.tags) or [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
        wandb_dir = Path(os.environ.get("WANDB_DIR") or self.run_dir)
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"WANDB_DIR={str(wandb_dir)!r} cannot be created ({err.strerror}); "
                              "point it at a writable folder or unset it.") from None
        kwargs = dict(
            project=cfg.project or os.environ.get("WANDB_PROJECT") or "gf-odg",
            entity=cfg.entity or os.environ.get("WANDB_ENTITY") or None,
            group=os.environ.get("WANDB_RUN_GROUP") or None,
            name=run_name, config=config, dir=str(wandb_dir), tags=tags,
            id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous",
        )
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
        settings = dict(console="off", x_disable_stats=True, save_code=False, init_timeout=timeout)
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B raises many types (auth, network, timeout); we go offline
            if mode != "online":
                raise ConfigError(f"W&B could not start an {mode} run: {scrub(_one_line(err))}. "
                                  "Use logger=none to train without W&B.") from None
            log.warning("W&B could not start online (%s); logging offline instead: sync later with "
                        "`wandb sync %s/wandb/offline-run-*`.", scrub(_one_line(err)), wandb_dir)
            mode = "offline"
            run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
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
