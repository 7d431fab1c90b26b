"""train.py as a user runs it: a short run end to end, and clear one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from conftest import run_train

FAST = ["model=tiny-random", "trainer.max_steps=2", "trainer.samples_per_prompt=4", "task.evaluation.n_samples=16",
        "logger.mode=offline", "trainer.progress=false"]


@pytest.mark.slow
def test_train_py_runs_end_to_end_and_writes_eval_json(tmp_path):
    result = run_train(FAST, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["steps"] == 2
    for phase in ("before", "after"):
        for key in ("valid_fraction", "distinct", "kl_to_target", "tv_to_target", "exact_kl"):
            assert key in report[phase]
    assert "valid_fraction" in result.stdout and "before" in result.stdout  # the printed table
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert list((tmp_path / "adapted").glob("*/adapter_model.safetensors"))


def _assert_clean_failure(result, *needles):
    assert result.returncode != 0
    text = result.stderr + result.stdout
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert needle in text, (needle, text[-3000:])


@pytest.mark.parametrize("args,needles", [
    (["model=does-not-exist"], ["does-not-exist", "gemma-2b", "smollm2-135m"]),
    (["trainer.max_stpes=3"], ["max_stpes"]),
    (["model=tiny-random", "objective.beta=0"], ["objective.beta"]),
    (["model=tiny-random", "objective=vargrad", "trainer.samples_per_prompt=1"], ["trainer.samples_per_prompt"]),
    (["model=tiny-random", "objective=subtb", "task.reward=gf_odg.rewards.sentiment.SentimentReward"],
     ["objective=subtb", "score_prefixes"]),
    (["model=tiny-random", "task.reward._target_=no_such_module.Reward"], ["task.reward._target_", "no_such_module"]),
    (["model=tiny-random", "task.prompts_file=/does/not/exist.txt"], ["task.prompts_file", "/does/not/exist.txt"]),
    (["model=tiny-random", "task.reward.target=[-1,2]"], ["task.reward.target"]),
], ids=["unknown-model", "mistyped-key", "beta", "vargrad-k", "subtb-reward", "reward-target", "prompts-file",
        "target-table"])
@pytest.mark.slow
def test_bad_input_fails_with_a_clear_message_and_writes_nothing(tmp_path, args, needles):
    result = run_train([*args, "logger.mode=offline"], tmp_path)
    _assert_clean_failure(result, *needles)
    assert not list((tmp_path / "adapted").glob("*")) if (tmp_path / "adapted").exists() else True
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").rglob("COMPLETE"))


@pytest.mark.slow
def test_gated_model_without_network_is_one_clear_message(tmp_path):
    result = run_train(["model=gemma-2b", "logger.mode=offline"], tmp_path,
                       env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"},
                       timeout=120)
    _assert_clean_failure(result, "google/gemma-2b", "HF_TOKEN")
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def _fake_checkpoint(folder, state_bytes=None, base="elsewhere"):
    import torch

    (folder / "adapter").mkdir(parents=True)
    if state_bytes is None:
        torch.save({"base_model": base, "step": 1}, folder / "state.pt")
    else:
        (folder / "state.pt").write_bytes(state_bytes)
    (folder / "COMPLETE").write_text("{}")
    return folder


@pytest.mark.parametrize("case", ["corrupt", "other-base-model"])
@pytest.mark.slow
def test_bad_checkpoints_are_refused_and_left_alone(tmp_path, case):
    ckpt = tmp_path / "checkpoints" / "old" / "step_000001"
    _fake_checkpoint(ckpt, b"not a checkpoint" if case == "corrupt" else None)
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    result = run_train(["model=tiny-random", f"resume={ckpt}", "run_name=old", "logger=none"], tmp_path)
    _assert_clean_failure(result, str(ckpt), "corrupt" if case == "corrupt" else "base model")
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_empty_prompt_file_and_unwritable_output(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = run_train(["model=tiny-random", f"task.prompts_file={empty}", "task.prompts=[]", "logger=none"], tmp_path)
    _assert_clean_failure(result, "task.prompts_file", "no prompts")
    result = run_train(["model=tiny-random", "logger=none", "paths.checkpoints=/etc/hostname/checkpoints"], tmp_path)
    _assert_clean_failure(result, "paths.checkpoints", "cannot be written")


@pytest.mark.slow
def test_an_existing_adapter_is_never_overwritten(tmp_path):
    adapter = tmp_path / "adapted" / "taken"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"precious")
    result = run_train(["model=tiny-random", "run_name=taken", "logger=none"], tmp_path)
    _assert_clean_failure(result, "run_name='taken'", "will not be")
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"precious"
