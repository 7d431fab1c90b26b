"""Upload a trained adapter folder (with its model card) to the Hugging Face Hub.

    uv run python scripts/push_to_hub.py models/adapted_models/<run> --repo-id <user>/<name>
    uv run python scripts/push_to_hub.py models/adapted_models/<run> --repo-id <user>/<name> --private
    uv run python scripts/push_to_hub.py models/adapted_models/<run> --repo-id <user>/<name> --dry-run

The token comes from HF_TOKEN (or .env, or `huggingface-cli login`); it is never printed.
`--dry-run` checks the folder and lists what would be uploaded, without network or token.
Every failure (no adapter there, no token, no network, a rejected token) is one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gf_odg.startup import prepare_environment

prepare_environment()  # .env (HF_TOKEN) before huggingface_hub reads the environment

from gf_odg.errors import GFODGError  # noqa: E402
from gf_odg.io.tracking import scrub  # noqa: E402

REQUIRED = ("adapter_config.json",)
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_files(folder: Path) -> list[Path]:
    """The files to upload; a one-line error when the folder is not a saved PEFT adapter."""
    if not folder.is_dir():
        raise GFODGError(f"{folder}: no such folder; give the adapter folder (models/adapted_models/<run>).")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing or not any((folder / name).is_file() for name in WEIGHTS):
        raise GFODGError(f"{folder}: not a saved adapter (needs adapter_config.json and adapter_model.safetensors).")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def push(folder: Path, repo_id: str, private: bool, dry_run: bool, message: str) -> str:
    files = adapter_files(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise GFODGError(f"--repo-id={repo_id!r}: expected <user or org>/<name>.")
    if dry_run:
        visibility = "private" if private else "public"
        lines = [f"would upload {len(files)} files to https://huggingface.co/{repo_id} ({visibility}):"]
        lines += [f"  {p.relative_to(folder)}  ({p.stat().st_size} bytes)" for p in files]
        if not (folder / "README.md").is_file():
            lines.append("  (no README.md: the Hub will show no model card)")
        return "\n".join(lines)
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise GFODGError("no Hugging Face token: set HF_TOKEN (in the environment or .env) or run "
                         "`huggingface-cli login`, with write access to the repo.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message,
                                   repo_type="model", allow_patterns=[str(p.relative_to(folder)) for p in files])
    except Exception as err:  # noqa: BLE001 - network, HTTP 401/403, validation: all one line for the user
        text = " ".join(str(err).split())[:240] or type(err).__name__
        raise GFODGError(f"upload to {repo_id} failed ({type(err).__name__}: {scrub(text)}); check the network "
                         "and that HF_TOKEN has write access.") from None
    return f"uploaded {len(files)} files: {getattr(commit, 'commit_url', None) or f'https://huggingface.co/{repo_id}'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="the adapter folder (models/adapted_models/<run>)")
    parser.add_argument("--repo-id", required=True, help="<user or org>/<name> on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    parser.add_argument("--message", default="Upload GF-ODG adapter", help="the commit message")
    args = parser.parse_args(argv)
    try:
        print(push(args.adapter, args.repo_id, args.private, args.dry_run, args.message))
    except GFODGError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
