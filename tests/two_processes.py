"""Launching training processes from tests: two processes (gloo on the CPU) under `accelerate launch`; training
through tests/ddp_worker.py and reading back the trained LoRA and log Z weights, to compare or to evaluate in
the test's own process. (The exactness matrix's two-process cells launch tests/matrix_worker.py, which
evaluates its cells itself: tests/test_matrix.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], timeout: int = 600, config: str = "ddp.yaml", env: dict | None = None):
    """Two processes under `accelerate launch --config_file configs/accelerate/<config>`, on a free port (test
    workers run side by side: the default port 29500 would be taken by the first launch). The launch runs in
    its own process group: on a timeout the training processes are killed too, not only the launcher."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
           str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def train_on_two_processes(overrides: list[str], out: Path, timeout: int = 600, config: str = "ddp.yaml") -> dict:
    """Train with the Trainer on two processes (tests/ddp_worker.py), `overrides` as on the command line; the
    trained weights {name: tensor}, LoRA under the model's parameter names and log Z under `log_z.<name>`.
    Fails unless both processes end with the same weights, bit for bit."""
    result = launch([str(ROOT / "tests" / "ddp_worker.py"), str(out), *overrides], timeout=timeout, config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    assert p0.keys() == p1.keys()
    for key in p0:
        assert torch.equal(p0[key], p1[key]), f"{key} differs between the two processes"
    return p0


@torch.no_grad()
def load_trained(model, log_z, params: dict) -> None:
    """Copy weights from `train_on_two_processes` into a policy (PEFT model) and its log Z module (or None),
    built in this process with the same config: then sample or enumerate its distribution as usual."""
    own = dict(model.named_parameters())
    if log_z is not None:
        own.update({f"log_z.{name}": p for name, p in log_z.named_parameters()})
    missing = sorted(set(params) - set(own))
    assert not missing, f"no parameter named {missing[:3]} here: build the policy with the training config"
    for name, value in params.items():
        own[name].copy_(value)
