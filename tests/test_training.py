"""A few real training steps on the tiny model: parameters move, artefacts exist and reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import TINY
from gf_odg.io.tracking import read_offline_run
from gf_odg.training.trainer import Trainer


def _lora_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for n, p in model.named_parameters() if "lora_" in n])


@pytest.mark.slow
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


# ----------------------------------------------------------------- the optimiser (issue 17 item 7)
def _tcfg(**kw):
    from omegaconf import OmegaConf

    base = dict(lr=0.01, log_z_lr=0.1, log_z_head_lr=0.01, weight_decay=0.0, warmup_steps=3, max_steps=10,
                lr_schedule="cosine", min_lr_ratio=0.1)
    return OmegaConf.create({**base, **kw})


def _toy(log_z_value=0.0):
    from gf_odg.objectives import ScalarLogZ

    lora = torch.nn.Linear(2, 1, bias=False)  # stands in for the LoRA parameters (requires_grad)
    return lora, ScalarLogZ(log_z_value)


def test_the_lr_schedule_moves_the_lora_rate_only():
    from gf_odg.training import optim

    tcfg = _tcfg()
    lora, log_z = _toy()
    optimizer = torch.optim.SGD(optim.param_groups(lora, log_z, tcfg), lr=1.0)
    scheduler = optim.build_scheduler(optimizer, tcfg)
    factor = optim.lr_factor(tcfg)
    for step in range(tcfg.max_steps):
        lora_lr, log_z_lr = [g["lr"] for g in optimizer.param_groups]
        assert lora_lr == pytest.approx(tcfg.lr * factor(step))
        assert log_z_lr == tcfg.log_z_lr  # no warm-up, no decay
        optimizer.step()
        scheduler.step()
    assert factor(0) < 1 and factor(tcfg.max_steps) < 1  # the schedule does move the LoRA rate


def test_lora_and_log_z_gradients_are_clipped_separately():
    from gf_odg.distributed import Dist
    from gf_odg.training import optim

    tcfg = _tcfg(lr=1.0, log_z_lr=1.0, warmup_steps=0, lr_schedule="constant")
    lora, log_z = _toy()
    optimizer = torch.optim.SGD(optim.param_groups(lora, log_z, tcfg))
    scheduler = optim.build_scheduler(optimizer, tcfg)
    lora.weight.grad = torch.tensor([[0.3, 0.4]])  # norm 0.5: under the clip
    log_z.value.grad = torch.tensor(100.0)  # an early log Z gradient
    before = lora.weight.detach().clone()
    norms = optim.apply_update(optimizer, scheduler, Dist(), grad_clip=1.0)
    assert norms == pytest.approx({"lora": 0.5, "log_z": 100.0})
    # SGD at lr 1 moves each parameter by its clipped gradient: LoRA's whole, log Z's down to norm 1
    assert (before - lora.weight.detach())[0].tolist() == pytest.approx([0.3, 0.4])
    assert float(log_z.value.detach()) == pytest.approx(-1.0, abs=1e-5)


WORKER = r"""
import sys, torch
from gf_odg.distributed import Dist
from gf_odg.training import optim

dist = Dist()
torch.manual_seed(0)
a = torch.nn.Parameter(torch.ones(2))
b = torch.nn.Parameter(torch.ones(2))
optimizer = torch.optim.AdamW([{"params": [a, b], "lr": 0.1, "weight_decay": 0.1, "part": "lora"}])
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
a.grad, b.grad = torch.ones(2), torch.ones(2)   # step 1: both have gradients everywhere
optimizer.step()
after_first = b.detach().clone()
optimizer.zero_grad(set_to_none=True)
a.grad = torch.ones(2) if dist.rank == 0 else None  # step 2: `a` on rank 0 only, `b` nowhere
optim.apply_update(optimizer, scheduler, dist, grad_clip=10.0)
moved = float((b.detach() - after_first).abs().max())
print(f"RANK{dist.rank} b_moved={moved!r} a={a.detach().tolist()!r}", flush=True)
dist.close()
"""


@pytest.mark.slow
def test_a_parameter_without_gradient_on_any_process_does_not_move(tmp_path):
    """Two gloo processes: the averaging must not turn a missing gradient into zeros that AdamW's
    momentum and weight decay then apply; a gradient on one process only is averaged (halved)."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = [next(line for line in out.splitlines() if line.startswith(f"RANK{r} ")) for r, out in enumerate(outs)]
    for line in lines:
        assert "b_moved=0.0 " in line, lines
    assert lines[0].split(" a=")[1] == lines[1].split(" a=")[1]  # the same parameters on both processes


# ----------------------------------------------------------------- evaluation target (issue 17 item 7)
def test_before_and_after_evaluations_use_the_same_final_beta(cfg_factory, tmp_path, monkeypatch):
    from gf_odg.training import trainer as trainer_module

    seen = []

    from gf_odg.evaluation.core import Evaluation

    def fake_evaluate(*args, beta, **kwargs):
        seen.append(beta)
        return Evaluation({"valid_fraction": 1.0}, [])

    monkeypatch.setattr(trainer_module, "evaluate_policy", fake_evaluate)
    cfg = cfg_factory("model=tiny-random", "logger=none", "trainer.progress=false", "trainer.max_steps=2",
                      "trainer.samples_per_prompt=2", "task.evaluation.before_training=true",
                      "objective.beta=1.0", "objective.beta_end=3.0", "objective.beta_schedule=linear",
                      "objective.beta_steps=2")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    trainer.train()
    trainer.close()
    assert seen == [3.0, 3.0]  # before and after: the target the run trains toward


# ----------------------------------------------------------------- checkpoints
def test_only_the_last_keep_checkpoints_are_kept(tmp_path):
    from gf_odg.io import checkpoints

    class Model:  # what save_checkpoint needs of a PeftModel
        def save_pretrained(self, folder, **kwargs):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"x")

    run_dir = tmp_path / "run"
    for step in range(1, 6):
        checkpoints.save_checkpoint(run_dir, step, Model(), {"step": step}, "seed: 0\n", keep=2)
        kept = sorted(p.name for p in run_dir.glob("step_*"))
        assert kept == [f"step_{s:06d}" for s in range(max(1, step - 1), step + 1)]
        assert (run_dir / "latest").read_text().strip() == f"step_{step:06d}"
    assert [p.name for p in checkpoints.complete_checkpoints(run_dir)] == ["step_000004", "step_000005"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


# ----------------------------------------------------------------- one atomic folder writer
def test_the_atomic_writer_replaces_keeps_or_refuses_as_asked(tmp_path):
    from gf_odg.errors import GFODGError
    from gf_odg.io.atomic import write_folder

    def content(text):
        return lambda tmp: (tmp / "f.txt").write_text(text)

    dest = tmp_path / "out"
    write_folder(dest, content("one"), exists="refuse")
    assert (dest / "f.txt").read_text() == "one"
    built = []
    write_folder(dest, lambda tmp: built.append(tmp), exists="keep")  # kept: nothing is built
    assert (dest / "f.txt").read_text() == "one" and not built
    with pytest.raises(GFODGError, match="will not be overwritten"):
        write_folder(dest, content("two"), exists="refuse")
    assert (dest / "f.txt").read_text() == "one"
    write_folder(dest, content("three"), exists="replace")
    assert (dest / "f.txt").read_text() == "three"

    def crash(tmp):
        (tmp / "f.txt").write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_folder(dest, crash, exists="replace")
    assert (dest / "f.txt").read_text() == "three"  # the old folder stands; no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError):
        write_folder(tmp_path / "x", content("x"), exists="overwrite")


def test_a_lora_target_the_model_lacks_is_a_config_error_listing_its_layers():
    from conftest import compose_cfg
    from gf_odg.errors import ConfigError
    from gf_odg.model.loading import load_policy

    cfg = compose_cfg(["model=tiny-random", "model.lora.target_modules=[qkv_proj]"])
    with pytest.raises(ConfigError) as err:
        load_policy(cfg.model, cfg.paths, torch.device("cpu"))
    text = str(err.value)
    assert "model.lora.target_modules" in text and "qkv_proj" in text
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # the layers the tiny Llama does have
        assert name in text
