"""Every config file composes; groups are typed; bad values fail before any model loads."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import CONFIGS, compose_cfg
from gf_odg.errors import ConfigError
from gf_odg.config.validation import validate
from gf_odg.objectives import OBJECTIVES

GROUPS = ["model", "task", "objective", "exploration", "trainer", "logger", "experiment", "hparams_search"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes_and_validates(group, option):
    override = f"{group}={option}"
    on_policy = group == "objective" and OBJECTIVES[option].on_policy_only  # the default explores
    cfg = compose_cfg([override, *(["exploration=on_policy"] if on_policy else [])])
    validate(cfg)
    assert cfg.model.name and cfg.task.name and cfg.objective.name


def test_gemma_selects_the_hub_model_in_4bit():
    cfg = compose_cfg(["model=gemma-2b"])
    assert cfg.model.name_or_path == "google/gemma-2b"
    assert cfg.model.source == "hub"
    assert cfg.model.quantization.load_in_4bit is True
    assert cfg.model.quantization.quant_type == "nf4"


def test_default_is_the_embedded_model_in_4bit():
    cfg = compose_cfg([])
    assert cfg.model.source == "embedded"
    assert cfg.model.quantization.load_in_4bit is True
    assert cfg.paths.hf_cache.endswith("models/.cache")


def test_mistyped_key_fails_at_compose_time_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_cfg(["trainer.max_stpes=3"])
    assert "max_stpes" in str(err.value)


def test_unknown_model_lists_the_options():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["model=does-not-exist"])
    text = str(err.value)
    assert "does-not-exist" in text and "gemma-2b" in text and "smollm2-135m" in text


def test_project_root_env_moves_the_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    cfg = compose_cfg([])
    assert cfg.paths.checkpoints == f"{tmp_path}/models/checkpoints"


@pytest.mark.parametrize("override,key", [
    ("objective.beta=0", "objective.beta"),
    ("objective.beta=-1", "objective.beta"),
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.log_z_lr=-0.1", "trainer.log_z_lr"),
    ("exploration.p_temper=1.5", "exploration.p_temper"),
    ("exploration.epsilon=-0.1", "exploration.epsilon"),
    ("exploration.temper_lo=0", "exploration.temper_lo"),
    ("exploration.replay.rescore=1.5", "exploration.replay.rescore"),
    ("task.max_new_tokens=0", "task.max_new_tokens"),
])
def test_bad_values_name_their_key(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert key in str(err.value)


def test_vargrad_needs_two_samples_per_prompt():
    cfg = compose_cfg(["objective=vargrad", "trainer.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="trainer.samples_per_prompt"):
        validate(cfg)


def test_temper_bounds_must_be_ordered():
    cfg = compose_cfg(["exploration.temper_lo=2", "exploration.temper_hi=1"])
    with pytest.raises(ConfigError, match="temper_lo"):
        validate(cfg)


def test_replay_enabled_with_zero_capacity():
    cfg = compose_cfg(["exploration.replay.enabled=true", "exploration.replay.capacity=0"])
    with pytest.raises(ConfigError, match="exploration.replay.capacity"):
        validate(cfg)


def test_every_objective_file_is_registered_and_every_registered_objective_has_a_file():
    files = {p.stem for p in (CONFIGS / "objective").glob("*.yaml")}
    assert files == set(OBJECTIVES)
    for name in files:
        assert compose_cfg([f"objective={name}"]).objective.name == name


@pytest.mark.parametrize("overrides,keys", [
    ([], ["exploration.p_temper", "exploration.epsilon", "exploration.replay.enabled"]),  # the default (seeded)
    (["exploration=default"], ["exploration.p_temper", "exploration.epsilon"]),  # tempers and mixes
    (["exploration=on_policy", "exploration.epsilon=0.1"], ["exploration.epsilon"]),
    (["exploration=on_policy", "exploration.p_temper=1", "exploration.temper_hi=2"], ["exploration.p_temper"]),
    (["exploration=replay", "exploration.p_temper=0", "exploration.epsilon=0"], ["exploration.replay.enabled"]),
    (["experiment=rng_tb"], ["exploration.p_temper", "exploration.epsilon", "exploration.replay.enabled"]),
])
def test_an_on_policy_objective_refuses_exploration_naming_the_keys(overrides, keys):
    cfg = compose_cfg([*overrides, "objective=rloo"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "objective=rloo is on-policy only" in text and "exploration=on_policy" in text
    for key in keys:
        assert key in text
    unnamed = {"exploration.p_temper", "exploration.epsilon", "exploration.replay.enabled"} - set(keys)
    assert not any(f"{key}=" in text for key in unnamed), text  # only the settings that are on


@pytest.mark.parametrize("overrides", [
    ["objective=rloo", "exploration=on_policy"],
    ["objective=rloo", "exploration=on_policy", "exploration.p_temper=1"],  # temperature 1 in [1, 1]: on-policy
    ["objective=tb"], ["objective=vargrad", "exploration=replay"],  # off-policy objectives may explore
])
def test_on_policy_settings_and_off_policy_objectives_validate(overrides):
    validate(compose_cfg(overrides))


@pytest.mark.parametrize("overrides, floor", [
    ([], -15.0),  # rng's own floor (configs/task/rng.yaml)
    (["objective=vargrad"], -15.0),  # every objective file follows the task
    (["objective=subtb", "objective.log_reward_min=-30"], -30.0),  # an explicit objective floor wins
    (["task=keywords"], -50.0),  # a task that sets none: the schema's default
    (["experiment=sparse_rng"], -50.0),  # the whole vocabulary needs a lower floor than rng's
    (["experiment=keywords"], -1000.0),
])
def test_the_floor_follows_the_task_unless_the_objective_sets_it(overrides, floor):
    cfg = compose_cfg(overrides)
    assert cfg.objective.log_reward_min == floor
    validate(cfg)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, native, expected):
    from gf_odg.model import loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: native)
    assert loading.resolve_dtype("auto", torch.device("cpu")) == expected
    assert loading.resolve_dtype("float32", torch.device("cpu")) == torch.float32  # explicit wins
