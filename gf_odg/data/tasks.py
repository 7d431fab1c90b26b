"""A task: prompts, a reward, hard constraints and how to evaluate, built from `cfg.task`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gf_odg.data.constraints import ConstraintSet
from gf_odg.errors import ConfigError, GFODGError
from gf_odg.data.prompts import load_prompts, render_prompt


def _reward_from_name(name: str, key: str):
    """`task.reward=my_rewards.MyReward` (a class, built with no arguments) or
    `task.reward=my_rewards.reward_fn` (a TRL-style function, used as it is)."""
    import inspect

    from hydra.utils import get_object

    try:
        obj = get_object(name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's path or module
        raise ConfigError(
            f"{key}={name!r} could not be imported ({type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}). "
            "Expected module.Name of a reward class or function importable from the directory you run train.py from (or on PYTHONPATH)."
        ) from None
    if inspect.isclass(obj):
        try:
            return obj()
        except TypeError as err:
            raise ConfigError(f"{key}={name!r}: {err}. Give its arguments in a task config "
                              f"({key}: {{_target_: {name}, ...}}).") from None
    if not callable(obj):
        raise ConfigError(f"{key}={name!r} is a {type(obj).__name__}, not a reward class or function.")
    return obj


def build_reward(reward_cfg, key: str = "task.reward"):
    """Instantiate a reward from its `_target_` node (or a dotted name), with clear errors."""
    if isinstance(reward_cfg, str):
        return _reward_from_name(reward_cfg, key)
    if reward_cfg is None or not OmegaConf.is_config(reward_cfg) or "_target_" not in reward_cfg:
        raise ConfigError(f"{key} must be a config node with a `_target_` naming a reward class or function.")
    target = reward_cfg._target_
    try:
        reward = instantiate(reward_cfg, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, GFODGError):
            raise cause from None
        raise ConfigError(
            f"{key}._target_={target!r} could not be built: {str(cause).strip().splitlines()[-1][:300]}. "
            "Expected an importable callable `(prompts, completions, **kwargs) -> scores` (a module on "
            "the Python path, e.g. a file my_rewards.py in the directory you run train.py from)."
        ) from None
    if not callable(reward):
        raise ConfigError(f"{key}._target_={target!r} built a {type(reward).__name__}, which is not callable.")
    return reward


@dataclass
class Task:
    name: str
    records: list[dict]  # {"prompt": ..., **extra}
    reward: Any
    constraints: ConstraintSet
    prompt_tokens: list[list[int]]
    cfg: Any

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    def reward_kwargs(self, prompt_indices) -> dict:
        """Per-completion keyword arguments for the reward (TRL style): every extra field that all
        prompt records share, e.g. `concepts`, one entry per completion."""
        shared = set.intersection(*(set(r) for r in self.records)) - {"prompt"}
        return {key: [self.records[int(i)][key] for i in prompt_indices] for key in sorted(shared)}


def build_task(task_cfg, tokenizer, model_chat_template: bool, root: str, records: Optional[list[dict]] = None,
               reward=None) -> Task:
    records = records if records is not None else load_prompts(task_cfg, root)
    reward = reward if reward is not None else build_reward(task_cfg.reward)
    chat = model_chat_template if task_cfg.chat_template is None else task_cfg.chat_template
    tokens = [render_prompt(tokenizer, r["prompt"], chat, task_cfg.system_prompt) for r in records]
    constraints = ConstraintSet.from_config(task_cfg.constraints, tokenizer, task_cfg.max_new_tokens)
    return Task(task_cfg.name, records, reward, constraints, tokens, task_cfg)
