"""Every command README.md and docs/ show would start: its script or module exists, its flags are the
script's, and its Hydra overrides compose and validate (the compose API, nothing is trained).

Commands are taken from shell code blocks (a line starting `uv run ` or `python `, with `\\`
continuations joined) and from inline code spans that start the same way. `<placeholders>` such as
`<run_name>` stand for a user's value and are replaced by a plain word.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import CONFIGS, ROOT
from gf_odg.config.schema import MainConfig, register_configs
from gf_odg.config.validation import validate

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"<[A-Za-z_][A-Za-z0-9_ -]*>")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
STARTS = ("uv run ", "python ")

# Hydra's own command-line flags (train.py and the scripts are @hydra.main apps); True: takes a value.
HYDRA_FLAGS = {"-m": False, "--multirun": False, "--cfg": True, "-c": True, "--package": True, "-p": True,
               "--resolve": False, "--info": False, "-h": False, "--help": False, "--hydra-help": False}
HYDRA_MAIN = re.compile(r"@hydra\.main\([^)]*config_name=[\"'](\w+)[\"']")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) for every command shown in the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for lang, body in FENCE.findall(text):
            if lang.strip().lower() not in SHELL_BLOCKS:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith(STARTS):
                    found.append((_rel(path), line))
        for span in INLINE.findall(FENCE.sub("", text)):
            span = " ".join(span.split())
            if span.startswith(STARTS):
                found.append((_rel(path), span))
    return found


COMMANDS = shown_commands()


def test_the_docs_show_the_commands_this_test_checks():
    """The extraction itself: the README's two set-up commands and the docs' launch lines are found."""
    readme = {cmd for where, cmd in COMMANDS if where == "README.md"}
    assert {"uv run python train.py", "uv run pytest", 'uv run pytest -m "not slow"'} <= readme
    assert any(cmd.startswith("uv run accelerate launch") for _, cmd in COMMANDS)
    assert any(where.startswith("docs/results/") and "scripts/benchmark.py" in cmd for where, cmd in COMMANDS)


# ------------------------------------------------------------------------------------------ Hydra


def _hydra_overrides(args: list[str]) -> tuple[list[str], bool]:
    """Split a Hydra app's arguments into overrides and whether it is a multirun."""
    overrides, multirun, rest = [], False, iter(args)
    for arg in rest:
        if arg in HYDRA_FLAGS:
            multirun |= arg in ("-m", "--multirun")
            if HYDRA_FLAGS[arg]:
                value = next(rest, None)
                if arg in ("--cfg", "-c"):
                    assert value in ("job", "hydra", "all"), f"--cfg takes job, hydra or all, not {value!r}"
            continue
        assert not arg.startswith("-"), f"{arg!r} is not a Hydra flag"
        overrides.append(arg)
    return overrides, multirun


def _expanded(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Override lists to compose: one per value of each sweep (the others at their first value)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            assert multirun, f"{text!r} sweeps over values: the command needs -m"
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    combos = [[c[0] for c in choices]]
    for i, values in enumerate(choices):
        for value in values[1:]:
            combos.append([value if j == i else c[0] for j, c in enumerate(choices)])
    return combos


def compose_and_validate(config_name: str, overrides: list[str]) -> None:
    key = (config_name, tuple(overrides))
    if key in COMPOSED:  # the same command shown on two pages
        return
    register_configs()  # one schema for train.py and scripts/evaluate.py (its `eval` node)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    validate(cfg)
    COMPOSED.add(key)


COMPOSED: set[tuple[str, tuple[str, ...]]] = set()


def check_hydra_app(config_name: str, args: list[str]) -> None:
    overrides, multirun = _hydra_overrides(args)
    for combo in _expanded(overrides, multirun):
        compose_and_validate(config_name, combo)


# --------------------------------------------------------------------------------------- argparse


def _sources(files: list[Path]) -> str:
    """The text of a script or package, and of the package a shim script takes its `main` from
    (`from gf_odg.bench.__main__ import main`: every module of gf_odg/bench/, where sections add flags)."""
    texts = [f.read_text() for f in files]
    for module in re.findall(r"^from (gf_odg[\w.]*) import main\b", "\n".join(texts), re.M):
        package = (ROOT / module.replace(".", "/")).with_suffix(".py").parent
        texts += [f.read_text() for f in sorted(package.glob("*.py")) if f not in files]
    return "\n".join(texts)


def check_argparse_flags(what: str, source: str, args: list[str]) -> None:
    rest = iter(args)
    for arg in rest:
        if not arg.startswith("--"):
            continue
        flag, _, inline = arg.partition("=")
        assert re.search(rf"""["']{re.escape(flag)}["']""", source), f"{what} has no flag {flag}"
        if flag == "--sections":
            for section in (inline or next(rest)).split(","):
                assert re.search(rf"""["']{section}["']""", source), f"{what} has no section {section!r}"
        elif flag in ("--overrides", "--quality-overrides"):
            check_hydra_app("main", shlex.split(inline or next(rest)))


def check_program(what: str, files: list[Path], args: list[str]) -> None:
    """A Hydra app composes its overrides; an argparse program knows its flags."""
    source = _sources(files)
    app = HYDRA_MAIN.search(source)
    if app:
        check_hydra_app(app.group(1), args)
    elif "add_argument" in source:
        check_argparse_flags(what, source, args)
    else:
        assert not args, f"{what} takes no arguments, but the docs give it {args}"


# ----------------------------------------------------------------------------------------- runner


def _script(path: str) -> list[Path]:
    assert (ROOT / path).is_file(), f"no such file: {path}"
    return [ROOT / path]


def _module(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"no module {name}"
    origin = Path(spec.origin)
    return sorted(origin.parent.glob("*.py")) if origin.name in ("__init__.py", "__main__.py") else [origin]


def check_command(command: str) -> None:
    words = shlex.split(PLACEHOLDER.sub("x", command), comments=True)
    if words[:2] == ["uv", "run"]:
        words = words[2:]
    program, args = words[0], words[1:]
    if program == "python":
        if args[0] == "-m":
            what, files, args = args[1], _module(args[1]), args[2:]
        else:
            what, files, args = args[0], _script(args[0]), args[1:]
    elif program == "accelerate":
        assert args[0] == "launch", command
        config = args[args.index("--config_file") + 1]
        assert (ROOT / config).is_file(), f"no accelerate config {config}"
        at = next(i for i, a in enumerate(args) if a.endswith(".py"))
        what, files, args = args[at], _script(args[at]), args[at + 1:]
    elif program == "pytest":
        rest = iter(args)
        for arg in rest:
            if arg in ("-m", "-k", "-n", "-p"):
                assert next(rest, "").strip(), f"pytest {arg} needs a value"
            elif not arg.startswith("-"):
                assert (ROOT / arg.split("::")[0]).exists(), f"no test path {arg}"
        return
    else:
        assert (Path(sys.executable).parent / program).exists(), f"{program} is not installed in the environment"
        return
    check_program(what, files, args)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[:80]}" for w, c in COMMANDS])
def test_shown_command_composes(where, command):
    check_command(command)


@pytest.mark.parametrize("command,problem", [
    ("uv run python train.py trainer.max_stpes=3", "max_stpes"),
    ("uv run python train.py objective=vargrad trainer.samples_per_prompt=1", "samples_per_prompt"),
    ("uv run python train.py objective=tb,vargrad", "needs -m"),
    ("uv run python scripts/no_such_script.py", "no such file"),
    ("uv run python scripts/benchmark.py --no-such-flag 1", "no flag"),
    ("uv run python scripts/benchmark.py --sections prefil", "no section"),
    ("uv run python scripts/evaluate.py eval.adaptr=x", "adaptr"),
    ("uv run accelerate launch --config_file configs/accelerate/zero.yaml train.py", "no accelerate config"),
    ("uv run python -m gf_odg.no_such_module", "no module"),
    ("uv run python scripts/prepare_model.py model=no-such-model", "no-such-model"),
])
def test_a_broken_command_is_caught(command, problem):
    with pytest.raises(Exception, match=problem):
        check_command(command)


# ------------------------------------------------------------------------------- what docs promise

README_GROUPS = re.compile(r"^\| `([a-z_/]+)` \| ((?:`[^`]+`[^|]*)+) \|", re.M)


def test_readme_lists_every_option_of_every_group():
    text = (ROOT / "README.md").read_text()
    rows = {group: set(re.findall(r"`([^`]+)`", options)) for group, options in README_GROUPS.findall(text)}
    for group in ("model", "task", "objective", "exploration", "trainer", "logger", "paths", "experiment",
                  "hparams_search", "hydra/launcher"):
        on_disk = {p.stem for p in (CONFIGS / group).glob("*.yaml")}
        assert group in rows, f"README's config table has no row for {group}"
        listed = rows[group] - {"basic"}  # Hydra's own launcher, not a file here
        assert listed == on_disk, (f"README's options for {group}: {sorted(listed - on_disk)} are not in configs/{group}/, "
                                   f"{sorted(on_disk - listed)} are missing from the README's table")


def _schema_has(key: str) -> bool:
    node: typing.Any = MainConfig  # (its `eval` node is scripts/evaluate.py's)
    parts = key.split(".")
    for part in parts:
        if part == "*" or node is typing.Any:
            return True
        if not dataclasses.is_dataclass(node):
            return False
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return False
        hints = typing.get_type_hints(node)
        node = hints[part]
        args = [a for a in typing.get_args(node) if a is not type(None)]
        node = args[0] if typing.get_origin(node) is typing.Union and args else node
    return True


FILE_NAME = re.compile(r"\.(json|jsonl|yaml|md|py|txt|png)$")  # eval.json is a file, not a key
KEY = re.compile(r"^((?:model|task|objective|exploration|trainer|logger|paths|eval)\.[a-z0-9_.*]+)(?:=.*)?$")


@pytest.mark.parametrize("path", DOCS, ids=[_rel(p) for p in DOCS])
def test_every_config_key_the_docs_name_exists(path):
    """`trainer.lr`, `exploration.replay.fraction`, ... named in a page are keys of the schema."""
    text = FENCE.sub("", path.read_text())
    keys = {m.group(1).rstrip(".") for span in INLINE.findall(text) for m in [KEY.match(span.strip())]
            if m and not FILE_NAME.search(m.group(1))}
    missing = sorted(k for k in keys if not _schema_has(k))
    assert not missing, f"{_rel(path)} names keys the schema does not have: {missing}"


REWARD_PAGES = ["README.md", "docs/rewards.md"]


@pytest.mark.parametrize("page", REWARD_PAGES)
def test_the_documented_reward_file_works(page, tmp_path, monkeypatch):
    """The page's my_rewards.py builds and scores, by every name the page passes to task.reward."""
    from gf_odg.data.tasks import build_reward
    from gf_odg.rewards.base import call_reward

    text = (ROOT / page).read_text()
    blocks = [body for lang, body in FENCE.findall(text) if lang.strip() == "python" and "class MyReward" in body]
    assert len(blocks) == 1, f"{page} shows one my_rewards.py"
    (tmp_path / "my_rewards.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    names = set(re.findall(r"my_rewards\.(\w+)", " ".join(cmd for where, cmd in COMMANDS if where == page)))
    assert "MyReward" in names
    for name in sorted(names):
        scores = call_reward(build_reward(f"my_rewards.{name}"), ["p"] * 3, ["17", "42", "a sentence of some words"])
        assert scores.shape == (3,)
    # "twice as likely": a completion ending in 7 scores log 2 more than one that does not
    scores = call_reward(build_reward("my_rewards.MyReward"), ["p"] * 2, ["17", "42"]).tolist()
    assert scores[0] - scores[1] == pytest.approx(0.6931, abs=1e-3)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_point_at_files_and_headings():
    broken = []
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
            if "://" in target:
                continue
            file = (path.parent / target) if target else path
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
                broken.append(f"{_rel(path)} -> {target}#{anchor}")
    assert not broken, broken


def test_every_results_table_is_stamped():
    """Each table in docs/results/ follows a 'Measured at commit' line in its section."""
    unstamped = []
    for path in sorted((ROOT / "docs" / "results").glob("*.md")):
        if path.name == "README.md":
            continue
        for section in re.split(r"^#+ ", path.read_text(), flags=re.M)[1:]:
            if re.search(r"^\|.*\|\s*$", section, re.M) and not re.search(r"(Measured|measured|recorded) at\s+commit `[0-9a-f]{7,}`", section):
                unstamped.append(f"{path.name}: {section.splitlines()[0]}")
    assert not unstamped, unstamped
