"""A few real training steps on the tiny model: parameters move, artefacts exist and reload."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import TINY
from gf_odg.io.tracking import read_offline_run
from gf_odg.training.trainer import Trainer


def _lora_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for n, p in model.named_parameters() if "lora_" in n])


def test_training_moves_adapter_and_log_z_and_writes_reloadable_artefacts(cfg_factory, tmp_path):
    cfg = cfg_factory(*TINY, "trainer.max_steps=3", "trainer.samples_per_prompt=8", "trainer.checkpoint_every=2",
                      "logger=wandb", "logger.mode=offline", "trainer.sample_table_every=1")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = _lora_vector(trainer.model)
    log_z_before = float(trainer.log_z.value.detach())
    summary = trainer.train()
    wandb_dir = Path(trainer.tracker.wandb_run.dir)
    trainer.close()
    assert not torch.allclose(lora_before, _lora_vector(trainer.model))
    assert float(trainer.log_z.value.detach()) != log_z_before

    ckpt = tmp_path / "checkpoints" / cfg.run_name
    assert (ckpt / "step_000002" / "COMPLETE").is_file() and (ckpt / "step_000003" / "COMPLETE").is_file()
    assert (ckpt / "latest").read_text().strip() == "step_000003"
    adapter = Path(summary["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file()

    # Plain PEFT reloads the adapter onto a fresh base and gives identical outputs.
    base = AutoModelForCausalLM.from_pretrained(trainer.base_path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(adapter))
    reloaded_ckpt = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trainer.base_path, dtype=torch.float32), str(ckpt / "step_000003" / "adapter"))
    ids = torch.tensor([trainer.task.prompt_tokens[0]])
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(reloaded_ckpt(input_ids=ids).logits, expected, atol=1e-5)

    # metrics.jsonl and the offline W&B run hold the logged keys.
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["step"] for l in steps] == [1, 2, 3]
    for key in ("loss", "log_z", "log_pf/mean", "log_reward/mean", "residual/mean", "residual/std",
                "var_log_ratio", "beta", "completion/length_mean", "completion/eos_fraction", "time/sample"):
        assert key in steps[-1], key
    run = read_offline_run(next(wandb_dir.parent.glob("run-*.wandb")))
    assert run["exit_code"] == 0  # the run was finished
    assert [h["_step"] for h in run["history"] if "loss" in h] == [1, 2, 3]
    for key in ("loss", "log_z", "reward/mean", "eval_after/valid_fraction", "trainable_params"):
        assert key in run["summary"], key
    trainer_cfg = run["config"]["trainer"]
    assert trainer_cfg.get("value", trainer_cfg)["max_steps"] == 3
    tables = list((wandb_dir / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 3  # a new table at every step, none overwritten
    # discovery/distinct_valid: the distinct valid completions among all samples so far (from the tables)
    found, counts = set(), []
    for table in sorted(tables, key=lambda p: json.loads(p.read_text())["data"][0][0]):
        data = json.loads(table.read_text())
        col = {name: i for i, name in enumerate(data["columns"])}
        found |= {row[col["completion"]].strip() for row in data["data"] if row[col["score"]] is not None}
        counts.append(len(found))
    assert [s["discovery/distinct_valid"] for s in steps] == counts
