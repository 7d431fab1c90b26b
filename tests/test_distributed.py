"""Two training processes (gloo on the CPU) under `accelerate launch`: data parallel over LoRA and log Z,
and FSDP; every process starts from rank 0's trainable weights; a process out of step is an error, not a hang."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, run_train
from two_processes import launch, load_trained, train_on_two_processes
from gf_odg.io.tracking import read_offline_run

STEPS = ["trainer.max_steps=4", "trainer.samples_per_prompt=6", "trainer.threads=1", "trainer.checkpoint_every=2"]


def _launch(args: list[str], tmp_path, timeout: int = 600, config: str = "ddp.yaml", env: dict | None = None):
    return launch(args, timeout=timeout, config=config, env=env)


def _fsdp_launch(args: list[str], tmp_path):
    return _launch(args, tmp_path, config="fsdp.yaml")


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_processes_resume_to_the_uninterrupted_result(tmp_path):
    """Two processes keep identical LoRA and log Z. Stop a 2-process run at step 2, resume it to step 4: the same
    adapter, log Z and losses as 4 steps straight.
    A data-parallel checkpoint is not resumed under FSDP (FSDP's own stop and resume: the uneven-prompts test)."""
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
    p0 = train_on_two_processes([*common, "trainer.max_steps=4", "run_name=straight"], tmp_path / "straight")
    assert any(k.startswith("log_z.") for k in p0)  # and equal on both processes, bit for bit
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

    # FSDP stopped and resumed: test_fsdp_with_unevenly_cached_prompts_finishes_with_the_data_parallel_weights.
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


# Three prompts, one per process and step: the prompts each process has already seen (and cached the log Z
# features of) soon differ, which put the FSDP processes' forward calls out of step (issue 17, item 4).
THREE_PROMPTS = ('task.prompts=["Pick a random integer between 0 and 100.","Name a number from 0 to 100.",'
                 '"Say any integer up to 100."]')


def _log_z_at(checkpoints, run: str, step: int) -> dict:
    state = torch.load(checkpoints / run / f"step_{step:06d}" / "state.pt", weights_only=True)
    return state["log_z"]


@pytest.mark.slow
def test_every_process_starts_from_rank_0s_lora_and_log_z(tmp_path):
    """Processes seeded differently (seed=${oc.env:RANK}: as on a first run, where rank 0 alone converts the base
    model and so draws from the RNG before the LoRA init) build different LoRA and log Z weights; after
    Dist.broadcast_trainable they all hold rank 0's, bit for bit, at step 0 and after training. Then train.py:
    the same adapter and log Z as the worker, which it gives only if the Trainer broadcasts too (Trainer.setup
    calls Dist.broadcast_trainable before Dist.shard)."""
    common = [*TINY, "seed=${oc.env:RANK}", "objective.log_z=conditioned", "trainer.max_steps=2",
              "trainer.samples_per_prompt=4", "trainer.threads=1", "trainer.checkpoint_every=2",
              f"paths.checkpoints={tmp_path}/checkpoints", f"paths.adapted_models={tmp_path}/adapted"]
    worker = _launch([str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "w"), *common, "run_name=w"], tmp_path,
                     timeout=300)
    assert worker.returncode == 0, worker.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "w" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    keys = list(r0["built"])
    assert keys == list(r1["built"]) and any("lora_A" in k for k in keys) and any("log_z.net" in k for k in keys)
    # As built, the processes disagree (else this test could not fail): the LoRA A matrices and log Z's MLP.
    differ = [k for k in keys if not torch.equal(r0["built"][k], r1["built"][k])]
    assert any("lora_A" in k for k in differ) and any(k.startswith("log_z.net") for k in differ), differ
    for key in keys:
        assert torch.equal(r0["start"][key], r0["built"][key]), key  # rank 0's own weights, untouched
        assert torch.equal(r1["start"][key], r0["built"][key]), key  # rank 1 holds rank 0's, bit for bit
        assert torch.equal(r0["params"][key], r1["params"][key]), key  # and both still agree after training
    assert any(float(r0["params"][k].abs().max()) > 0 for k in keys if "lora_B" in k)  # training moved B
    # The weights load into a policy built here from the same config, to evaluate a two-process run here.
    from gf_odg.model.loading import load_policy
    from gf_odg.objectives import build_log_z

    cfg = compose_cfg([o for o in common if not o.startswith("seed=")])  # RANK is unset here
    model, _, _ = load_policy(cfg.model, cfg.paths, torch.device("cpu"))
    log_z = build_log_z(cfg.objective, model.get_base_model().config.hidden_size)
    load_trained(model, log_z, r0["params"])
    assert all(torch.equal(p, r0["params"][n]) for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(log_z.offset.detach(), r0["params"]["log_z.offset"])

    # train.py, as users launch it: the Trainer must broadcast as the worker did.
    trained = _launch([str(ROOT / "train.py"), *common, "run_name=t", f"hydra.run.dir={tmp_path}/t"], tmp_path,
                      timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "adapted" / "w" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapted" / "t" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: train.py's processes did not start from rank 0's weights"
    za, zb = _log_z_at(tmp_path / "checkpoints", "w", 2), _log_z_at(tmp_path / "checkpoints", "t", 2)
    for key in za:
        assert torch.equal(za[key], zb[key]), key


@pytest.mark.slow
def test_fsdp_with_unevenly_cached_prompts_finishes_with_the_data_parallel_weights(tmp_path):
    """Three prompts, one per process per step, 4 steps: under FSDP every process makes the same forward calls
    (hung after step 1 before the fix: the log Z prompt features ran only for prompts not cached on that
    process). The FSDP run stops at step 2 and resumes to 4 (each process's shard of the optimizer state in the
    checkpoint), and ends with the uninterrupted data-parallel run's adapter, log Z and losses."""
    common = [str(ROOT / "train.py"), *TINY, THREE_PROMPTS, "trainer.prompts_per_step=1",
              "trainer.samples_per_prompt=4", "trainer.threads=1", "trainer.checkpoint_every=2",
              f"paths.checkpoints={tmp_path}/checkpoints", f"paths.adapted_models={tmp_path}/adapted"]
    quick = {"GF_ODG_COLLECTIVE_TIMEOUT": "120"}  # a process out of step fails within two minutes
    runs = (("ddp.yaml", "ddp", "ddp", 4, []), ("fsdp.yaml", "fsdp", "fsdp1", 2, []),
            ("fsdp.yaml", "fsdp", "fsdp2", 4, ["resume=auto"]))
    for config, run, folder, steps, extra in runs:
        result = _launch([*common, f"trainer.max_steps={steps}", f"run_name={run}", *extra,
                          f"hydra.run.dir={tmp_path}/{folder}"], tmp_path, timeout=300, config=config, env=quick)
        assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Evaluation of rng") == 1  # rank 0 evaluates, on the gathered layers
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "adapted" / "ddp" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "adapted" / "fsdp" / "adapter_model.safetensors"))
    assert c.keys() == a.keys()
    for key in a:
        assert torch.allclose(c[key], a[key], atol=1e-6), key
    za, zc = _log_z_at(tmp_path / "checkpoints", "ddp", 4), _log_z_at(tmp_path / "checkpoints", "fsdp", 4)
    assert torch.allclose(za["value"], zc["value"], atol=1e-6)
    sc = torch.load(tmp_path / "checkpoints" / "fsdp" / "step_000004" / "state.pt", weights_only=True)
    assert sc["optimizer"] is None and all(p["optimizer"] for p in sc["processes"])  # shards, not the whole state

    def losses(folder):
        rows = [json.loads(l) for l in (tmp_path / folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        return {r["step"]: r["loss"] for r in rows}

    straight, resumed = losses("ddp"), losses("fsdp2")
    assert sorted(resumed) == [3, 4]
    assert resumed == pytest.approx({s: straight[s] for s in (3, 4)}, rel=1e-6)  # fp32 sums


@pytest.mark.slow
def test_a_process_out_of_step_stops_the_run_with_a_clear_error(tmp_path):
    """Rank 1 never reaches the all-reduce rank 0 waits at: rank 0 fails after GF_ODG_COLLECTIVE_TIMEOUT seconds with
    a DistributedError naming the variable, instead of waiting forever."""
    t0 = time.perf_counter()
    result = _launch([str(ROOT / "tests" / "timeout_worker.py")], tmp_path, timeout=120,
                     env={"GF_ODG_COLLECTIVE_TIMEOUT": "3"})
    assert result.returncode != 0
    assert "error: a collective operation between the training processes failed" in result.stderr
    assert "GF_ODG_COLLECTIVE_TIMEOUT (now 3 s)" in result.stderr
    assert time.perf_counter() - t0 < 100


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    from gf_odg.distributed import DEFAULT_TIMEOUT_S, collective_timeout
    from gf_odg.errors import ConfigError

    monkeypatch.delenv("GF_ODG_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("GF_ODG_COLLECTIVE_TIMEOUT", "42.5")
    assert collective_timeout() == 42.5
    for bad in ("ten", "0", "-5", "inf"):
        monkeypatch.setenv("GF_ODG_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="GF_ODG_COLLECTIVE_TIMEOUT=.*positive number of seconds"):
            collective_timeout()


def test_only_collective_failures_become_a_distributed_error():
    from gf_odg.distributed import collective_errors
    from gf_odg.errors import DistributedError

    with pytest.raises(DistributedError, match="out of step"):
        with collective_errors():
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation")
    with pytest.raises(RuntimeError, match="shape mismatch") as caught:
        with collective_errors():
            raise RuntimeError("shape mismatch")
    assert not isinstance(caught.value, DistributedError)


def test_lm_likelihood_makes_as_many_forward_calls_as_the_busiest_fsdp_process(tiny_policy):
    """Under FSDP (`gf_odg_max_int` set on the policy by Dist.shard) a process with fewer chunks of distinct items
    scores stand-in chunks, each with its prompt and completion pass, and its own scores are unchanged."""
    from gf_odg.generation.sampling import decoder_and_head
    from gf_odg.rewards.lm_likelihood import LMLikelihoodReward

    model, tokenizer = tiny_policy
    reward = LMLikelihoodReward(continuation=" The end.", batch_size=2)
    reward.bind(model, tokenizer)
    prompts, completions = ["Once upon a time"] * 3, [" a king.", " a dog.", " a cat."]  # 3 items: 2 chunks
    decoder, _, _ = decoder_and_head(model)
    calls = []
    hook = decoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        alone = reward(prompts, completions)
        alone_calls = len(calls)
        calls.clear()
        model.gf_odg_max_int = lambda n: n + 3  # the busiest process has 3 chunks more
        padded = reward(prompts, completions)
    finally:
        hook.remove()
        model.__dict__.pop("gf_odg_max_int", None)
    assert alone_calls == 2 * 2  # two chunks, each a prompt pass and a completion pass
    assert len(calls) == 2 * (2 + 3)
    assert padded == alone
