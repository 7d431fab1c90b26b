"""What every entry point (train.py, scripts/*, `python -m gf_odg.bench`) does before the libraries load.

    prepare_environment()   .env into the environment, tokenizer threads off, the working directory
                            importable (a user's `task.reward=my_rewards.MyReward` next to them)
    quiet_libraries()       library chatter to the log file only
    format_table(...)       the before/after table train.py prints
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TABLE_KEYS = ("valid_fraction", "score_mean", "unique_fraction", "distinct", "n_modes", "kl_to_target",
              "tv_to_target", "mode_entropy", "exact_kl", "exact_reverse_kl", "exact_tv", "exact_valid_mass",
              "exact_min_ratio", "exact_starved")


def prepare_environment() -> None:
    """Call first, before anything reads the environment (W&B, HF tokens, tokenizers)."""
    from dotenv import load_dotenv

    load_dotenv(ROOT / ".env")
    if Path.cwd() != ROOT:
        load_dotenv(Path.cwd() / ".env")  # a project next to the user; never overrides what is set
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.getcwd() not in sys.path:
        sys.path.insert(1, os.getcwd())  # the user's own reward modules, not gf_odg (which is installed)


def quiet_libraries() -> None:
    """Keep the console to our progress bar and table: library chatter goes to the log file only."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("transformers", "peft", "torch.utils.checkpoint", "bitsandbytes"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


def format_table(before: dict | None, after: dict, keys=TABLE_KEYS) -> str:
    """The headline metrics, before and after training (all of them are in eval.json)."""
    shown = [k for k in keys if isinstance(after.get(k), (int, float))]
    lines = [f"{'metric':<20}{'before':>12}{'after':>12}"]
    for key in shown:
        b = before.get(key) if before else None
        lines.append(f"{key:<20}{_fmt(b):>12}{_fmt(after[key]):>12}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
