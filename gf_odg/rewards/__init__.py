"""Reward modules: any callable (prompts, completions, **kwargs) -> scores. See `base` for the contract."""

from gf_odg.rewards.base import call_reward, reward_name
from gf_odg.rewards.rng import RandomIntegerReward

__all__ = ["call_reward", "reward_name", "RandomIntegerReward"]
