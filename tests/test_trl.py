"""Coming from TRL: reward functions, reward models and prompt datasets as TRL users write them,
W&B as W&B users expect it, the model card and the Hub upload (issue 19)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, run_train
from gf_odg.data.prompts import load_prompts
from gf_odg.data.tasks import build_reward, build_task
from gf_odg.errors import ConfigError, RewardError
from gf_odg.io.tracking import resolve_mode, scrub
from gf_odg.rewards.base import REWARD_CONTEXT, RewardContext, call_reward

NEG_INF = -math.inf
TINY_MODEL = ROOT / "models" / "base_models" / "tiny-random-llama"


# TRL's documented reward functions (docs/source/grpo_trainer.md), unchanged.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


def task_cfg(**fields):
    base = {"name": "t", "prompts": [], "prompts_file": None, "system_prompt": None, "chat_template": None,
            "max_new_tokens": 8, "constraints": {}, "reward": None, "reward_weights": None, "dataset": None}
    return OmegaConf.create({**base, **fields})


# ----------------------------------------------------------------------------- keyword calls

def test_trl_documented_functions_score_the_completions_not_the_prompts():
    prompts, completions = ["a prompt far longer than twenty characters", "p"], ["x" * 20, "y" * 5]
    assert call_reward(reward_len, prompts, completions).tolist() == [0.0, -15.0]
    assert call_reward(reward_func, ["", ""], [r"so \boxed{4}", r"\boxed{5}"],
                       ground_truth=["4", "4"]).tolist() == [1.0, 0.0]

    def swapped(completions, prompts=None, **kwargs):  # the order TRL's keywords make harmless
        return [float(len(c)) for c in completions]

    assert call_reward(swapped, prompts, completions).tolist() == [20.0, 5.0]


def test_positional_rewards_classes_and_narrow_signatures():
    def legacy(ps, cs, **kw):  # GF-ODG's positional contract still works, columns included
        return [float(len(p) + len(c) + kw["bonus"][i]) for i, (p, c) in enumerate(zip(ps, cs))]

    class Scorer:
        def __call__(self, prompts, completions, **kwargs):
            return [float(c.startswith(p)) for p, c in zip(prompts, completions)]

    def narrow(completions, bonus):  # no **kwargs: gets only what it names
        return [float(b) for b in bonus]

    assert call_reward(legacy, ["ab"], ["c"], bonus=[10]).tolist() == [13.0]
    assert call_reward(Scorer(), ["ab", "x"], ["abc", "y"]).tolist() == [1.0, 0.0]
    assert call_reward(narrow, [""], ["c"], bonus=[7], other=["ignored"]).tolist() == [7.0]

    def needs_answer(completions, answer):
        return [0.0]

    with pytest.raises(RewardError, match=r"needs argument\(s\) \['answer'\].*columns \(\['bonus'\]\)"):
        call_reward(needs_answer, [""], ["c"], bonus=[1])


def test_completion_ids_are_passed_or_retokenised(tokenizer):
    seen = {}

    def lengths(completion_ids, **kwargs):
        seen["ids"] = completion_ids
        return [float(len(ids)) for ids in completion_ids]

    assert call_reward(lengths, [""], ["x"], completion_ids=[[5, 6, 7]]).tolist() == [3.0]
    context = RewardContext(tokenizer=tokenizer)
    scores = call_reward(lengths, ["", ""], ["hello world", "42"], **{REWARD_CONTEXT: context})
    assert seen["ids"] == [tokenizer.encode(t, add_special_tokens=False) for t in ["hello world", "42"]]
    assert scores.tolist() == [float(len(ids)) for ids in seen["ids"]]


def test_none_means_not_applicable(caplog):
    def math_only(completions, task, **kwargs):
        return [float(c == "4") if t == "math" else None for c, t in zip(completions, task)]

    def code_only(completions, task, **kwargs):
        return [2.0 * (c == "print") if t == "code" else None for c, t in zip(completions, task)]

    def everywhere(completions, **kwargs):
        return [-1.0] * len(completions)

    reward = build_reward([math_only, code_only, everywhere], weights=[1.0, 0.5, 0.1])
    tasks = ["math", "math", "code", "poem"]
    scores = call_reward(reward, [""] * 4, ["4", "5", "print", "x"], task=tasks)
    assert scores.tolist() == pytest.approx([0.9, -0.1, 0.9, -0.1])  # nan-sum: None drops out
    assert reward.last_terms["math_only"].tolist() == [1.0, 0.0, NEG_INF, NEG_INF]

    alone = build_reward([math_only, code_only])
    with caplog.at_level(logging.WARNING, logger="gf_odg.rewards.base"):
        scores = call_reward(alone, [""] * 3, ["4", "print", "x"], task=["math", "code", "poem"])
        call_reward(alone, [""], ["x"], task=["poem"])
    assert scores.tolist() == [1.0, 2.0, NEG_INF]  # no reward applies: the floor
    warnings = [r.getMessage() for r in caplog.records if "no reward applies" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 3 samples" in warnings[0] and "'x'" in warnings[0]
    assert call_reward(math_only, [""], ["x"], task=["poem"]).tolist() == [NEG_INF]
    with pytest.raises(RewardError, match=r"returned nan for sample 0"):  # a NaN is still an error
        call_reward(lambda completions, **kw: [float("nan")], [""], ["x"])


def test_reward_weights_from_the_task_config_and_their_errors(tokenizer):
    cfg = task_cfg(prompts=["p"], reward=["test_trl.reward_len", "test_trl.reward_len"],
                   reward_weights=[1.0, 0.5])
    task = build_task(cfg, tokenizer, True, str(ROOT))
    assert task.reward.weights == {"reward_len": 1.0, "reward_len_2": 0.5}
    assert call_reward(task.reward, ["p"], ["x" * 10], **task.reward_kwargs([0])).tolist() == [-15.0]
    with pytest.raises(ConfigError, match=r"task.reward_weights has 3 weights for 2 rewards"):
        build_task(task_cfg(prompts=["p"], reward=cfg.reward, reward_weights=[1, 2, 3]), tokenizer, True, str(ROOT))
    with pytest.raises(ConfigError, match=r"task.reward is not set: give a reward function"):  # task=trl without one
        build_reward(None)
    with pytest.raises(ConfigError, match=r"task.reward_weights is set but task.reward is a single reward"):
        build_task(task_cfg(prompts=["p"], reward="test_trl.reward_len", reward_weights=[1.0]),
                   tokenizer, True, str(ROOT))


# ----------------------------------------------------------------------------- datasets

ROWS = [{"prompt": "Add 2 and 2.", "ground_truth": "four", "level": 1},
        {"prompt": "Add 3 and 4.", "ground_truth": "seven", "level": 2}]


@pytest.mark.parametrize("form", ["jsonl", "parquet", "csv", "save_to_disk"])
def test_dataset_columns_reach_the_reward(form, tmp_path, tokenizer):
    import datasets

    data = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"data.{form}"
    {"jsonl": lambda: data.to_json(str(path)), "parquet": lambda: data.to_parquet(str(path)),
     "csv": lambda: data.to_csv(str(path), index=False), "save_to_disk": lambda: data.save_to_disk(str(path))}[form]()
    task = build_task(task_cfg(dataset={"path": str(path)}, reward="test_trl.reward_func"), tokenizer, False,
                      str(ROOT))
    assert task.prompts == ["Add 2 and 2.", "Add 3 and 4."]
    kwargs = task.reward_kwargs([1, 0])
    assert kwargs["ground_truth"] == ["seven", "four"] and [int(v) for v in kwargs["level"]] == [2, 1]
    scores = call_reward(task.reward, task.prompts[::-1], [r"\boxed{seven}", r"\boxed{five}"], **kwargs)
    assert scores.tolist() == [1.0, 0.0]


def test_dataset_options_and_errors(tmp_path, tokenizer):
    import datasets

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "q.jsonl"))
    spec = {"path": str(tmp_path / "q.jsonl"), "prompt_column": "question", "shuffle": True, "seed": 1, "limit": 3}
    records = load_prompts(task_cfg(dataset=spec))
    assert len(records) == 3 and {r["prompt"] for r in records} < {r["question"] for r in rows}
    assert all(r["answer"] == r["prompt"][1:] for r in records)
    assert [r["prompt"] for r in records] != ["q0", "q1", "q2"]  # shuffled
    for spec, message in [
        ({"path": str(tmp_path / "q.jsonl")}, r"prompt_column='prompt': the dataset's columns are \['question', 'answer'\]"),
        ({"path": str(tmp_path / "none.jsonl")}, r"no such file or folder"),
        ({"path": str(tmp_path / "q.jsonl"), "split": "test"}, r"task.dataset"),
        ({"path": str(tmp_path / "q.jsonl"), "colum": "x"}, r"unknown key\(s\) \['colum'\]"),
        ({"path": "???"}, r"task.dataset.path is not set"),  # task=trl without a dataset
    ]:
        with pytest.raises(ConfigError, match=message):
            load_prompts(task_cfg(dataset=spec))


def test_a_hub_dataset_without_network_is_one_line(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"task.dataset.path='nobody-here/no-such-dataset' could not be loaded") as err:
        load_prompts(task_cfg(dataset={"path": "nobody-here/no-such-dataset"}))
    assert "\n" not in str(err.value)


def test_conversational_prompts_and_completions(tmp_path, tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    rows = [{"prompt": conversation, "lang": "en"}, {"prompt": [{"role": "user", "content": "Dis bonjour."}], "lang": "fr"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}

    def greets(prompts, completions, lang, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [1.0 if c[0]["content"].lower().startswith(("hi", "bonjour")) else 0.0 for c in completions]

    task = build_task(task_cfg(prompts_file=str(tmp_path / "chat.jsonl"), reward="unused"), tokenizer, True, str(ROOT),
                      reward=greets)
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert task.prompt_tokens[0] == tokenizer.encode(expected, add_special_tokens=False)
    assert "Be brief." in tokenizer.decode(task.prompt_tokens[0]) and task.prompts[1] == "Dis bonjour."
    scores = call_reward(task.reward, [task.prompts[i] for i in (0, 1)], ["Hi!", "Non."], **task.reward_kwargs([0, 1]))
    assert scores.tolist() == [1.0, 0.0]
    assert seen["prompts"][0] == conversation
    assert seen["completions"] == [[{"role": "assistant", "content": "Hi!"}], [{"role": "assistant", "content": "Non."}]]
    assert call_reward(format_reward_func, [""], ["<think>a</think><answer>b</answer>"],
                       **task.reward_kwargs([0])).tolist() == [1.0]
    # GF-ODG's own text rewards still receive text
    keywords = build_reward(OmegaConf.create({"_target_": "gf_odg.rewards.text.KeywordsReward", "concepts": ["hi"]}))
    assert call_reward(keywords, [task.prompts[0]], ["hi there"], **task.reward_kwargs([0])).tolist() == [1.0]


def test_a_prompt_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café au lait\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"task.prompts_file=.*latin1.txt.*not UTF-8 text.*save the file as UTF-8"):
        load_prompts(task_cfg(prompts_file=str(path)))


# ----------------------------------------------------------------------------- reward models

@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, tokenizer):
    """A random 2-label Llama classifier with the tiny model's tokenizer, saved like a hub model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2,
                         id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def _logits(model, tokenizer, texts):
    with torch.no_grad():
        return torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])  # unpadded, one by one


@pytest.mark.slow
def test_reward_model_scores_with_trls_convention_batched(tiny_classifier, tokenizer):
    folder, model = tiny_classifier
    prompts, completions = ["Hello ", "Hi ", "Hey "], ["there", "you over there, friend", "!"]
    reward = build_reward(str(folder))  # a folder (or a hub id): TRL's defaults
    expected = _logits(model, tokenizer, [p + c for p, c in zip(prompts, completions)])
    assert call_reward(reward, prompts, completions).tolist() == pytest.approx(expected[:, 0].tolist(), abs=1e-5)
    node = OmegaConf.create({"_target_": "gf_odg.rewards.reward_model.RewardModel", "model": str(folder),
                             "label": "POSITIVE", "transform": "logsoftmax", "text": "completion", "batch_size": 2})
    scores = call_reward(build_reward(node), prompts, completions)
    expected = torch.log_softmax(_logits(model, tokenizer, completions), dim=-1)[:, 1]
    assert scores.tolist() == pytest.approx(expected.tolist(), abs=1e-5) and (scores < 0).all()


@pytest.mark.slow
def test_reward_model_in_a_list_and_its_errors(tiny_classifier, tmp_path):
    folder, _ = tiny_classifier
    reward = build_reward([str(folder), "test_trl.reward_len"], weights=[0.0, 1.0])
    assert set(reward.last_terms) == set() and list(reward.rewards) == [folder.name, "reward_len"]
    call_reward(reward, ["a"], ["b"])
    assert torch.isfinite(reward.last_terms[folder.name]).all()
    for node, message in [
        ({"model": str(folder), "label": "MAYBE"}, r"label='MAYBE': the model's labels are \['NEGATIVE', 'POSITIVE'\]"),
        ({"model": str(folder), "label": 5}, r"label=5: the model has 2 output"),
        ({"model": str(folder), "transform": "sigmoid"}, r"transform='sigmoid'"),
        ({"model": str(tmp_path)}, r"has no config.json"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_reward(OmegaConf.create({"_target_": "gf_odg.rewards.reward_model.RewardModel", **node}))


# ----------------------------------------------------------------------------- W&B and secrets

@pytest.mark.parametrize("env, mode", [
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, "offline"),
    ({"WANDB_MODE": "disabled"}, "disabled"),
    ({"WANDB_MODE": "dryrun"}, "offline"),
    ({"WANDB_API_KEY": "k" * 40}, "online"),
    ({}, "offline"),
])
def test_auto_mode_follows_wandb_mode_then_the_key(env, mode, monkeypatch, caplog):
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.WARNING, logger="gf_odg.io.tracking"):
        assert resolve_mode("auto") == mode
    assert resolve_mode("offline") == "offline"
    notices = [r.getMessage() for r in caplog.records]
    assert notices == (["W&B: no WANDB_API_KEY, logging offline (set WANDB_MODE=offline to silence this, "
                        "or `wandb sync` the run later)."] if not env else [])


def test_a_wrong_wandb_mode_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "onlien")
    with pytest.raises(ConfigError, match=r"WANDB_MODE='onlien': expected online, offline or disabled"):
        resolve_mode("auto")


def test_scrub_masks_credential_keys_and_secret_values():
    secret = "hf_plantedSECRET123"
    config = {"model": {"name": "x", "hub_token": "abc", "api_key": None}, "note": f"token={secret}!",
              "items": [secret, {"password": "p"}], "pair": ("a", secret), "count": 3}
    clean = scrub(config, [secret])
    assert clean == {"model": {"name": "x", "hub_token": "***", "api_key": None}, "note": "token=***!",
                     "items": ["***", {"password": "***"}], "pair": ("a", "***"), "count": 3}
    assert secret not in json.dumps(scrub(config, [secret]))
    assert config["note"] == f"token={secret}!"  # the input is not modified


@pytest.mark.slow
@pytest.mark.parametrize("wandb_mode", ["offline", None])
def test_planted_key_without_network_trains_offline(wandb_mode, tmp_path):
    """A 40-character key W&B cannot check (its server is a closed port): with WANDB_MODE=offline not a
    word about the key; unset, one warning line and offline logging, no stack trace, bounded wait."""
    key = "0123456789abcdef" * 2 + "plantkey"
    env = {"WANDB_API_KEY": key, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "3",
           "WANDB_PROJECT": "trl-test", "WANDB_RUN_GROUP": "g1"}
    full_env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    full_env.update(env)
    if wandb_mode:
        full_env["WANDB_MODE"] = wandb_mode
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from omegaconf import OmegaConf
        from gf_odg.io.tracking import Tracker
        cfg = OmegaConf.create(dict(wandb=True, mode="auto", project=None, entity=None, tags=[], jsonl=True))
        tracker = Tracker(cfg, sys.argv[1], "planted", {{"hf_token": "x"}})
        tracker.log({{"loss": 1.0}}, step=0)
        print("MODE", tracker.wandb_run.settings.mode, tracker.wandb_run.project, tracker.wandb_run.group)
        tracker.finish()
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], env=full_env, cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "MODE offline trl-test g1" in result.stdout
    assert key not in output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    if wandb_mode == "offline":
        assert warnings == [] and "key" not in result.stderr.lower()
    else:
        assert len(warnings) == 1 and "logging offline instead: sync later with `wandb sync" in warnings[0]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


# ----------------------------------------------------------------------------- model card and the Hub

def _fake_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"0" * 10)
    return folder


def test_model_card_says_what_the_adapter_is(tmp_path, monkeypatch):
    from conftest import compose_cfg
    from gf_odg.io.model_card import write_model_card

    monkeypatch.setenv("HF_TOKEN", "hf_plantedCardSecret")
    cfg = compose_cfg(["model=gemma-2b", "task=keywords", "objective=subtb", "objective.beta=0.5",
                       "trainer.lr=0.0003", "run_name=kw-run"], tmp_path)
    cfg.paths.hf_cache = "hf_plantedCardSecret"  # a secret value anywhere in the config is masked
    adapter = _fake_adapter(tmp_path / "adapter")
    card = write_model_card(adapter, cfg, before={"score_mean": -3.25, "valid_fraction": 0.5},
                            after={"score_mean": 1.5, "valid_fraction": 0.875, "notes": "x"}, steps=60).read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "base_model: google/gemma-2b" in card
    assert "# kw-run" in card and "**subtb**" in card and "β = 0.5" in card and "task: `keywords`" in card
    assert "gf_odg.rewards.combine.WeightedSum" in card
    assert "| trainer.lr | 0.0003 |" in card and "| steps trained | 60 |" in card and "| model.lora.r |" in card
    assert "| score_mean | -3.25 | 1.5 |" in card and "| valid_fraction | 0.5 | 0.875 |" in card
    assert "PeftModel.from_pretrained(base" in card and 'from_pretrained("google/gemma-2b")' in card
    assert "hf_plantedCardSecret" not in card and "hf_cache: '***'" in card
    assert not list(adapter.glob("*.tmp"))
    no_eval = write_model_card(_fake_adapter(tmp_path / "a2"), cfg).read_text()
    assert "No evaluation was run." in no_eval


@pytest.mark.slow
def test_push_to_hub_dry_run_and_one_line_errors(tmp_path):
    adapter = _fake_adapter(tmp_path / "adapter")
    (adapter / "README.md").write_text("card")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")  # no stored token, no network
    script = [sys.executable, str(ROOT / "scripts" / "push_to_hub.py")]

    def run(*args):
        return subprocess.run([*script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    dry = run(str(adapter), "--repo-id", "me/my-adapter", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would upload 3 files to https://huggingface.co/me/my-adapter (public)" in dry.stdout
    assert "adapter_model.safetensors  (10 bytes)" in dry.stdout and "README.md" in dry.stdout
    for args, message in [
        ((str(adapter), "--repo-id", "me/my-adapter"), "no Hugging Face token: set HF_TOKEN"),
        ((str(tmp_path), "--repo-id", "me/x", "--dry-run"), "not a saved adapter"),
        ((str(adapter), "--repo-id", "no-slash", "--dry-run"), "--repo-id='no-slash': expected <user or org>/<name>"),
    ]:
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- docs/trl.md, as written

DOC = ROOT / "docs" / "trl.md"
# The page's commands train the embedded model for 60 steps; here the same commands run on the tiny model.
SMALL = {"model": "tiny-random", "logger": "none", "trainer.progress": "false", "trainer.max_steps": "2",
         "trainer.samples_per_prompt": "4", "task.evaluation.n_samples": "6", "task.max_new_tokens": "6",
         "task.evaluation.before_training": "false"}


def doc_files_and_commands():
    text = DOC.read_text()
    files = dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, re.S))
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
                if line.strip()]
    return files, commands


def test_doc_page_shows_files_and_commands():
    files, commands = doc_files_and_commands()
    assert set(files) == {"my_rewards.py", "my_prompts.jsonl"}
    assert [c.split()[3] for c in commands] == ["train.py", "scripts/push_to_hub.py", "train.py"]
    assert all(c.startswith("uv run python ") for c in commands)


@pytest.mark.slow
def test_doc_commands_train_a_trl_users_rewards_and_dataset(tmp_path, tiny_classifier):
    import shlex
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files, commands = doc_files_and_commands()
    project = tmp_path / "project"
    project.mkdir()
    for name, content in files.items():
        (project / name).write_text(content)
    shutil.copytree(tiny_classifier[0], project / "my-reward-model")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    adapter = None
    for number, command in enumerate(commands):
        args = shlex.split(command)[4:]
        if shlex.split(command)[3] == "train.py":
            args = [a for a in args if a.split("=")[0] not in SMALL] + [f"{k}={v}" for k, v in SMALL.items()]
            result = run_train(args, tmp_path / f"run{number}", env=env, cwd=project)
            assert result.returncode == 0, result.stderr[-3000:]
            report = json.loads((tmp_path / f"run{number}" / "run" / "eval.json").read_text())
            assert report["steps"] == 2 and math.isfinite(report["after"]["score_mean"])
            adapter = adapter or Path(report["adapter"])
        else:
            args = [str(adapter) if a == "models/adapted_models/<run>" else a.replace("<you>", "me") for a in args]
            result = subprocess.run([sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), *args], cwd=project,
                                    env=env, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0 and "adapter_model.safetensors" in result.stdout, result.stderr
    card = (adapter / "README.md").read_text()  # written by the trainer with the adapter
    assert "library_name: peft" in card and "`my_rewards.reward_len`" in card and "| score_mean |" in card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), str(adapter))  # as the card says
    assert any("lora_A" in name for name, _ in model.named_parameters())
