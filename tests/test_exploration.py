"""Exploration: the behaviour policy's schedules, and off-policy correctness with replay."""

from __future__ import annotations

import pytest
import torch

from enumerable import enumerable_cfg, exact_tvs
from gf_odg.exploration import behaviour as exploration
from gf_odg.training.trainer import Trainer
from test_objectives import _train


def test_temperatures_follow_p_temper_and_bounds(cfg_factory):
    cfg = cfg_factory("exploration.p_temper=0.3", "exploration.temper_lo=1.5", "exploration.temper_hi=2.5",
                      "exploration.temper_per=sample").exploration
    temps = exploration.behaviour_temperatures(cfg, 20000, torch.Generator().manual_seed(0))
    tempered = temps != 1.0
    assert abs(float(tempered.float().mean()) - 0.3) < 0.02
    assert float(temps[tempered].min()) >= 1.5 and float(temps[tempered].max()) <= 2.5
    per_batch = cfg_factory("exploration.p_temper=1.0", "exploration.temper_per=batch").exploration
    assert exploration.behaviour_temperatures(per_batch, 8, torch.Generator().manual_seed(0)).unique().numel() == 1


def test_schedules_are_linear(cfg_factory):
    cfg = cfg_factory("exploration.epsilon=0.4", "exploration.epsilon_end=0.0", "exploration.epsilon_steps=10",
                      "exploration.replay.enabled=true", "exploration.replay.fraction=0.0",
                      "exploration.replay.fraction_end=0.5", "exploration.replay.fraction_steps=10").exploration
    assert exploration.epsilon_at(cfg, 0) == 0.4 and abs(exploration.epsilon_at(cfg, 5) - 0.2) < 1e-9
    assert exploration.epsilon_at(cfg, 50) == 0.0
    assert exploration.replay_fraction_at(cfg, 5) == 0.25 and exploration.replay_fraction_at(cfg, 20) == 0.5


@pytest.mark.slow
def test_tb_with_epsilon_and_half_replay_still_reaches_the_target(tmp_path):
    cfg = enumerable_cfg(tmp_path, "tb", extra=[
        "trainer.max_steps=500", "trainer.lr_schedule=cosine", "exploration=replay", "exploration.epsilon=0.3",
        "exploration.replay.fraction=0.5"])
    trainer = _train(cfg, tmp_path)
    assert len(trainer.replay) > 0
    assert max(exact_tvs(trainer)) <= 0.05


def test_replay_share_and_buffer_are_logged(cfg_factory, tmp_path):
    cfg = cfg_factory("model=tiny-random", "logger=none", "trainer.progress=false", "exploration=replay",
                      "exploration.replay.fraction=0.5", "trainer.samples_per_prompt=8",
                      "task.constraints.allowed=null", "task.reward=gf_odg.rewards.sentiment.SentimentReward")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    first = trainer.step()
    second = trainer.train_step(trainer.collect())
    assert first["exploration/replay_fraction"] == 0.0  # the buffer starts empty
    assert second["exploration/replay_fraction"] == 0.5
    assert second["replay/size"] > 0 and "replay/max_log_reward" in second
