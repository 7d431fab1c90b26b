"""Two training processes (gloo on the CPU) under `accelerate launch`: data parallel over LoRA and log Z."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run_train
from gf_odg.io.tracking import read_offline_run

STEPS = ["trainer.max_steps=4", "trainer.samples_per_prompt=6", "trainer.threads=1", "trainer.checkpoint_every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], tmp_path, timeout: int = 600, config: str = "ddp.yaml"):
    """Two processes under `accelerate launch --config_file configs/accelerate/<config>`, on a free port (test
    workers run side by side: the default port 29500 would be taken by the first launch)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
           "--num_processes", "2", "--main_process_port", str(_free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _fsdp_launch(args: list[str], tmp_path):
    return _launch(args, tmp_path, config="fsdp.yaml")


def test_accelerate_launch_of_train_py_gives_one_run_one_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [str(ROOT / "train.py"), *TINY, *STEPS, "logger=wandb", "logger.mode=offline", "run_name=ddp-run",
            f"hydra.run.dir={run_dir}", f"paths.checkpoints={tmp_path}/checkpoints",
            f"paths.adapted_models={tmp_path}/adapted", "exploration.replay.enabled=true"]
    result = _launch(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Evaluation of rng") == 1  # only rank 0 reports
    wandb_files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and read_offline_run(wandb_files[0])["exit_code"] == 0
    assert (run_dir / "eval.json").is_file() and (run_dir / "train_rank1.log").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "ddp-run").iterdir()) == \
        ["latest", "step_000002", "step_000004"]
    state = torch.load(tmp_path / "checkpoints" / "ddp-run" / "step_000004" / "state.pt", weights_only=True)
    assert len(state["processes"]) == 2  # each process's RNG streams and replay buffer
    assert state["processes"][0]["replay"] != state["processes"][1]["replay"]  # their own samples
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["world_size"] == 2 for s in steps)
    assert (tmp_path / "adapted" / "ddp-run" / "adapter_model.safetensors").is_file()

    # Resuming with another number of processes is refused, clearly, and writes nothing.
    before = sorted(p.name for p in (tmp_path / "checkpoints" / "ddp-run").iterdir())
    single = run_train([*TINY, "trainer.max_steps=6", "run_name=ddp-run", "resume=auto"], tmp_path)
    assert single.returncode == 2
    assert "2 training process(es)" in single.stderr and "--num_processes 2" in single.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "ddp-run").iterdir()) == before


def test_two_processes_resume_to_the_uninterrupted_result(tmp_path):
    """Two processes keep identical LoRA and log Z. Stop a 2-process run at step 2, resume it to step 4: the same
    adapter, log Z and losses as 4 steps straight.
    The same with configs/accelerate/fsdp.yaml (decoder layers sharded by FSDP2, gloo): the same adapter and log Z as
    the data-parallel run, through a stop and a resume; a data-parallel checkpoint is not resumed under FSDP."""
    common = [*TINY, "trainer.samples_per_prompt=6", "trainer.threads=1", "trainer.checkpoint_every=2", "logger=none",
              "exploration.replay.enabled=true", "exploration.replay.fraction=0.25", "seed=7",
              f"paths.checkpoints={tmp_path}/checkpoints", f"paths.adapted_models={tmp_path}/adapted"]

    def cut_and_resume(launch, run: str):
        """Train `run` to step 2, stop; resume it to step 4. The resumed launch's output."""
        for steps, extra, part in ((2, [], 1), (4, ["resume=auto"], 2)):
            result = launch([str(ROOT / "train.py"), *common, f"trainer.max_steps={steps}", f"run_name={run}", *extra,
                             f"hydra.run.dir={tmp_path}/{run}{part}"], tmp_path)
            assert result.returncode == 0, result.stderr[-3000:]
        return result

    # The uninterrupted run through tests/ddp_worker.py (the Trainer, as train.py runs it), which also saves each
    # process's trainable parameters after training.
    straight = _launch([str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "straight"), *common,
                        "trainer.max_steps=4", "run_name=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ranks = [torch.load(tmp_path / "straight" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    assert p0.keys() == p1.keys() and any(k.startswith("log_z.") for k in p0)
    for key in p0:
        assert torch.equal(p0[key], p1[key]), key  # bit for bit
    assert any(float(v.abs().max()) > 0 for k, v in p0.items() if "lora_B" in k)  # training moved B (starts at 0)
    cut_and_resume(_launch, "cut")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "adapted" / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapted" / "cut" / "adapter_model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    sa = torch.load(tmp_path / "checkpoints" / "straight" / "step_000004" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "checkpoints" / "cut" / "step_000004" / "state.pt", weights_only=True)
    assert torch.allclose(sa["log_z"]["value"], sb["log_z"]["value"], atol=1e-6)
    assert [p["replay"] for p in sa["processes"]] == [p["replay"] for p in sb["processes"]]

    def losses(run):
        rows = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        return {r["step"]: r["loss"] for r in rows}

    straight_losses, resumed = losses("straight/run"), losses("cut2")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight_losses[step], abs=1e-6)

    # FSDP: stopped at step 2 and resumed to 4, the data-parallel result (same seeds, same samples).
    second = cut_and_resume(_fsdp_launch, "fsdp")
    assert second.stdout.count("Evaluation of rng") == 1  # rank 0 evaluates, on the gathered layers
    c = load_file(str(tmp_path / "adapted" / "fsdp" / "adapter_model.safetensors"))
    assert c.keys() == a.keys()
    for key in a:
        assert torch.allclose(c[key], a[key], atol=1e-6), key
    sc = torch.load(tmp_path / "checkpoints" / "fsdp" / "step_000004" / "state.pt", weights_only=True)
    assert torch.allclose(sc["log_z"]["value"], sa["log_z"]["value"], atol=1e-6)
    # FSDP checkpoints hold each process's shard of the optimizer state; data-parallel ones the whole state.
    assert sc["optimizer"] is None and all(p["optimizer"] for p in sc["processes"])
    assert losses("fsdp2") == pytest.approx({s: straight_losses[s] for s in (3, 4)}, rel=1e-6)  # fp32 sums

    # A data-parallel checkpoint resumed under FSDP is refused, clearly, and writes nothing.
    before = sorted(p.name for p in (tmp_path / "checkpoints" / "straight").iterdir())
    mixed = _fsdp_launch([str(ROOT / "train.py"), *common, "trainer.max_steps=6", "run_name=straight", "resume=auto",
                          f"hydra.run.dir={tmp_path}/mixed"], tmp_path)
    assert mixed.returncode != 0
    assert "without FSDP sharding" in mixed.stderr and "[rank0]: Traceback" not in mixed.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "straight").iterdir()) == before


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
])
def test_unsupported_launch_configs_are_refused_clearly(monkeypatch, env, message):
    from gf_odg.distributed import Dist
    from gf_odg.errors import ConfigError

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        Dist()


def test_fsdp_refuses_a_4bit_model_clearly(monkeypatch):
    from omegaconf import OmegaConf

    from gf_odg.distributed import Dist
    from gf_odg.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    d = Dist()
    d.world_size = 2  # as under a two-process launch; the check comes before any process-group call
    with pytest.raises(ConfigError, match="configs/accelerate/ddp.yaml"):
        d.shard(None, OmegaConf.create({"quantization": {"load_in_4bit": True}}))
