"""A task: prompts, a reward, hard constraints and how to evaluate, built from `cfg.task`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gf_odg.data.constraints import ConstraintSet
from gf_odg.data.prompts import load_prompts, render_prompt
from gf_odg.errors import ConfigError, GFODGError
from gf_odg.rewards.base import REWARD_CONTEXT, RewardContext, reward_name


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


def build_reward(reward_cfg, key: str = "task.reward", weights=None):
    """Instantiate a reward from its `_target_` node, a dotted name, a reward model (hub id `org/name`
    or a local folder), or a list of these (TRL's `reward_funcs`: a weighted sum, `weights` one per
    entry, each term logged as `rewards/<name>/...`), with clear errors."""
    from omegaconf import ListConfig

    if isinstance(reward_cfg, (list, tuple, ListConfig)):
        return _reward_list(list(reward_cfg), key, weights)
    if weights is not None:
        raise ConfigError(f"{key}_weights is set but {key} is a single reward; make {key} a list "
                          f"(task.reward=[a,b] task.reward_weights=[1.0,0.5]) or drop the weights.")
    if isinstance(reward_cfg, dict):
        reward_cfg = OmegaConf.create(reward_cfg)
    elif callable(reward_cfg) and not OmegaConf.is_config(reward_cfg):
        return reward_cfg  # already a reward (the Python API)
    if isinstance(reward_cfg, str):
        from gf_odg.rewards.reward_model import RewardModel, is_model_reference

        if is_model_reference(reward_cfg):
            return RewardModel(reward_cfg, key=key)
        return _reward_from_name(reward_cfg, key)
    if reward_cfg is None:
        raise ConfigError(f"{key} is not set: give a reward function or class ({key}=my_rewards.f), a reward model "
                          f"(a hub id org/name or a folder), a list of these ({key}=[my_rewards.f,my_rewards.g]), "
                          "or a node with a `_target_`.")
    if not OmegaConf.is_config(reward_cfg) or "_target_" not in reward_cfg:
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


def _reward_list(entries: list, key: str, weights):
    from gf_odg.rewards.combine import WeightedSum

    if not entries:
        raise ConfigError(f"{key} is an empty list; give at least one reward.")
    weights = [1.0] * len(entries) if weights is None else list(weights)
    if len(weights) != len(entries):
        raise ConfigError(f"{key}_weights has {len(weights)} weights for {len(entries)} rewards; give one per reward.")
    terms = {}
    for number, (entry, weight) in enumerate(zip(entries, weights)):
        reward = build_reward(entry, f"{key}[{number}]")
        name, suffix = reward_name(reward), 2
        while name in terms:  # the same function twice: rewards/<name>_2/...
            name, suffix = f"{reward_name(reward)}_{suffix}", suffix + 1
        terms[name] = {"weight": weight, "reward": reward}
    combined = WeightedSum(terms)
    combined.from_list = True
    return combined


def apply_reward_weights(reward, task_cfg) -> None:
    """`task.reward_weights` onto a reward built from a list (idempotent)."""
    weights = OmegaConf.select(task_cfg, "reward_weights", default=None) if OmegaConf.is_config(task_cfg) else None
    if weights is None:
        return
    if not getattr(reward, "from_list", False):
        raise ConfigError("task.reward_weights is set but task.reward is a single reward; make task.reward a list "
                          "(task.reward=[a,b] task.reward_weights=[1.0,0.5]) or drop the weights.")
    reward.set_weights(list(weights))


@dataclass
class Task:
    name: str
    records: list[dict]  # {"prompt": ..., **extra}
    reward: Any
    constraints: ConstraintSet
    prompt_tokens: list[list[int]]
    cfg: Any
    tokenizer: Any = None

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    def reward_kwargs(self, prompt_indices) -> dict:
        """Per-completion keyword arguments for the reward (TRL style): every extra field that all
        prompt records share, e.g. `concepts`, one entry per completion; and, under `REWARD_CONTEXT`,
        what `call_reward` needs for TRL's conventions (the tokenizer, the conversations)."""
        shared = set.intersection(*(set(r) for r in self.records)) - {"prompt", "completion", "completion_ids"}
        kwargs = {key: [self.records[int(i)][key] for i in prompt_indices]
                  for key in sorted(shared) if not key.startswith("_")}
        conversations = None
        if any("_messages" in r for r in self.records):
            conversations = [self.records[int(i)].get("_messages") for i in prompt_indices]
        kwargs[REWARD_CONTEXT] = RewardContext(self.tokenizer, conversations)
        return kwargs


def build_task(task_cfg, tokenizer, model_chat_template: bool, root: str, records: Optional[list[dict]] = None,
               reward=None) -> Task:
    records = records if records is not None else load_prompts(task_cfg, root)
    reward = reward if reward is not None else build_reward(task_cfg.reward)
    apply_reward_weights(reward, task_cfg)
    chat = model_chat_template if task_cfg.chat_template is None else task_cfg.chat_template
    tokens = [render_prompt(tokenizer, r["prompt"], chat, task_cfg.system_prompt, r.get("_messages"))
              for r in records]
    constraints = ConstraintSet.from_config(task_cfg.constraints, tokenizer, task_cfg.max_new_tokens)
    return Task(task_cfg.name, records, reward, constraints, tokens, task_cfg, tokenizer)
