"""LM-likelihood rewards and the built-in tasks: scores equal a direct computation, every task builds
and trains, and a user's own reward module runs through train.py."""

from __future__ import annotations

import contextlib
import json
import os
import math
import textwrap

import pytest
import torch

from conftest import TINY, run_train
from gf_odg.errors import ConfigError
from gf_odg.model.loading import reference_mode
from gf_odg.rewards.combine import WeightedSum
from gf_odg.rewards.lm_likelihood import FluencyGuard, LMLikelihoodReward
from gf_odg.rewards.rng import RandomIntegerReward
from gf_odg.data.tasks import build_task
from gf_odg.training.trainer import Trainer
from gf_odg.config.validation import validate

# Clean joins (each piece starts with a space or follows one), where tokenising the pieces apart and
# the whole text at once give the same tokens: the direct computation below tokenises the whole text.
PROMPTS = ["Once upon a time", "The cat sat"]
COMPLETIONS = [" there was a king.", " a dog barked twice.", " on the mat.", ""]
ENDING = " The end came quickly."


@torch.no_grad()
def direct_logprob(model, tokenizer, context: str, continuation: str, adapters: bool = False) -> float:
    """log p(continuation | context) from one full-sequence forward of the plain model (adapters off)."""
    ids = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with contextlib.nullcontext() if adapters else reference_mode(model):
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[j - 1, ids[j]]) for j in range(start, len(ids)))


def bound(reward, tiny_policy):
    reward.bind(*tiny_policy)
    return reward


@contextlib.contextmanager
def trained_adapters(model):
    """Non-zero LoRA weights for a while (fresh adapters are the identity), restored afterwards."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_lm_likelihood_equals_a_direct_full_sequence_computation(tiny_policy):
    model, tokenizer = tiny_policy
    prompts = [p for p in PROMPTS for _ in COMPLETIONS]
    completions = COMPLETIONS * len(PROMPTS)
    expected = [direct_logprob(model, tokenizer, p + c, ENDING) for p, c in zip(prompts, completions)]

    with trained_adapters(model):  # the reward scores with the base model: adapters off
        scores = bound(LMLikelihoodReward(continuation=ENDING), tiny_policy)(prompts, completions)
        policy = [direct_logprob(model, tokenizer, p + c, ENDING, adapters=True) for p, c in zip(prompts, completions)]
    # The adapters do change the model, so scores equal to `expected` cannot come from the adapted one.
    # (Not every pair: with some LoRA inits one completion's log-probability barely moves.)
    assert max(abs(a - b) for a, b in zip(policy, expected)) > 0.1
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 3) for s in scores)) == len(scores)  # the context matters

    # Per-prompt continuations from the records, another scale, and per-token normalisation.
    endings = [ENDING, " And then it rained."] * (len(prompts) // 2)
    reward = bound(LMLikelihoodReward(scale=2.0, per_token=True), tiny_policy)
    n_tokens = [len(tokenizer.encode(p + c + z)) - len(tokenizer.encode(p + c))
                for p, c, z in zip(prompts, completions, endings)]
    expected = [2.0 * direct_logprob(model, tokenizer, p + c, z) / n
                for p, c, z, n in zip(prompts, completions, endings, n_tokens)]
    assert reward(prompts, completions, continuation=endings) == pytest.approx(expected, abs=1e-4)


def test_template_reads_record_fields_and_a_separate_checkpoint_gives_the_same_scores(tiny_policy):
    model, tokenizer = tiny_policy
    beginnings = ["Tom went to the park.", "It was a cold night."]
    completions = ["He saw a dog.", "The fire went out."]
    expected = [direct_logprob(model, tokenizer, f"{b} {c}", ENDING) for b, c in zip(beginnings, completions)]
    reward = bound(LMLikelihoodReward(continuation=ENDING, template="{beginning} {completion}"), tiny_policy)
    assert reward(["ignored"] * 2, completions, beginning=beginnings) == pytest.approx(expected, abs=1e-4)

    # model=<folder>: the same weights (fresh LoRA adapters are the identity) loaded apart, frozen.
    folder = model.get_base_model().name_or_path
    separate = LMLikelihoodReward(continuation=ENDING, template="{beginning} {completion}", model=folder)
    separate.bind(*tiny_policy)
    assert separate(["x"] * 2, completions, beginning=beginnings) == pytest.approx(expected, abs=1e-4)
    assert separate._lm[0] is not model and not any(p.requires_grad for p in separate._lm[0].parameters())


def test_score_prefixes_agrees_with_scoring_each_prefix_alone(tiny_policy):
    reward = bound(LMLikelihoodReward(continuation=ENDING), tiny_policy)
    prefixes = [["", " on", " on the", " on the mat."], ["", " a"]]
    prompts = ["The cat sat", "Once upon a time"]
    table = reward.score_prefixes(prompts, prefixes)
    assert table.shape == (2, 4)
    for i, row in enumerate(prefixes):
        one_by_one = [reward([prompts[i]], [text])[0] for text in row]
        assert table[i, : len(row)].tolist() == pytest.approx(one_by_one, abs=1e-5)
    assert torch.isneginf(table[1, 2:]).all()  # past the row's end

    # A weighted sum of such terms scores prefixes too, with the weights applied.
    total = WeightedSum({"a": {"weight": 0.5, "reward": reward}, "b": {"weight": 2.0, "reward": reward}})
    assert torch.allclose(total.score_prefixes(prompts, prefixes)[0], 2.5 * table[0])


def test_weighted_sum_binds_its_terms_and_scores_prefixes_only_when_all_can():
    class Probe:
        def __init__(self):
            self.bound = None

        def bind(self, model, tokenizer):
            self.bound = (model, tokenizer)

        def __call__(self, prompts, completions, **kwargs):
            return [0.0] * len(completions)

    probe = Probe()
    rng = RandomIntegerReward(0, 9)
    both = WeightedSum({"probe": {"weight": 1.0, "reward": probe}, "rng": {"weight": 1.0, "reward": rng}})
    both.bind("model", "tokenizer")
    assert probe.bound == ("model", "tokenizer")
    assert not hasattr(both, "score_prefixes")  # the trainer then refuses objective=subtb
    muted = WeightedSum({"probe": {"weight": 0.0, "reward": probe}, "rng": {"weight": 3.0, "reward": rng}})
    table = muted.score_prefixes(["p"], [["", "7", "77"]])
    assert table[0, 1] == pytest.approx(3.0 * math.log(0.1)) and torch.isneginf(table[0, [0, 2]]).all()


def test_fluency_guard_floors_the_mean_token_logprob(tiny_policy):
    model, tokenizer = tiny_policy
    prompt, fluent, gibberish = "Hello", " The dog ran home.", " zq xv qqj kkz"
    lenient = bound(FluencyGuard(min_token_logprob=-50.0), tiny_policy)
    strict = bound(FluencyGuard(min_token_logprob=-5.0), tiny_policy)  # the random model is near uniform: ~-11
    penalised = bound(FluencyGuard(min_token_logprob=-5.0, penalty=-3.0), tiny_policy)
    ids = tokenizer.encode(prompt + "\n" + gibberish)
    start = len(tokenizer.encode(prompt + "\n"))
    mean = direct_logprob(model, tokenizer, prompt + "\n", gibberish) / (len(ids) - start)

    scores = lenient([prompt, prompt], [fluent, gibberish])
    assert all(math.isfinite(s) for s in scores) and scores[1] == pytest.approx(mean, abs=1e-4)
    assert strict([prompt], [gibberish]) == [-math.inf]
    assert penalised([prompt], [gibberish])[0] == pytest.approx(mean - 3.0, abs=1e-4)
    assert lenient([prompt], [""]) == [-math.inf]  # no tokens: nothing vouches for it
    lowest = bound(FluencyGuard(min_token_logprob=-50.0, statistic="min"), tiny_policy)
    assert lowest([prompt], [gibberish])[0] < scores[1]


def test_lm_rewards_explain_their_configuration_errors():
    with pytest.raises(ConfigError, match="task.reward.template"):
        LMLikelihoodReward(template="{prompt}")
    with pytest.raises(ConfigError, match="task.reward.model"):
        LMLikelihoodReward(model="/no/such/folder")
    with pytest.raises(ConfigError, match="task.reward.statistic"):
        FluencyGuard(statistic="median")
    with pytest.raises(KeyError, match="continuation_key"):
        LMLikelihoodReward()._continuation(0, {})


NEW_TASKS = {
    "keywords": "The dog jumped to catch the frisbee that the boy threw.",
    "sentiment": "everyone cheered and the day turned out wonderful.",
    "infill": "She carried it inside and gave it some warm milk.",
}


@pytest.mark.parametrize("task", sorted(NEW_TASKS))
def test_task_config_builds_and_its_reward_scores_a_plausible_completion(task, cfg_factory, tiny_policy):
    model, tokenizer = tiny_policy
    cfg = cfg_factory("model=tiny-random", f"task={task}")
    validate(cfg)
    built = build_task(cfg.task, tokenizer, cfg.model.chat_template, cfg.paths.root)
    assert built.name == task and len(built.records) >= 5 and len(built.prompt_tokens) == len(built.records)
    if hasattr(built.reward, "bind"):
        built.reward.bind(model, tokenizer)
    indices = list(range(len(built.records)))
    scores = built.reward(built.prompts, [NEW_TASKS[task]] * len(indices), **built.reward_kwargs(indices))
    assert len(scores) == len(indices) and all(math.isfinite(s) for s in scores)
    if task == "keywords":  # the first concept set is fully covered: the keywords term is at its best
        assert built.reward.last_terms["keywords"][0] == pytest.approx(4.0)
        assert built.records[0]["concepts"] == ["dog", "frisbee", "catch", "throw"]
    if task == "infill":
        assert all(r["continuation"].startswith(" ") and r["beginning"] for r in built.records)


@pytest.mark.parametrize("task", sorted(NEW_TASKS))
@pytest.mark.slow
def test_two_training_steps_on_each_task(task, cfg_factory, tmp_path):
    cfg = cfg_factory(*TINY, f"task={task}", "trainer.max_steps=2", "trainer.samples_per_prompt=4",
                      "task.evaluation.n_samples=8", "trainer.checkpoint_every=0")
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        trainer.setup()
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["steps"] == 2 and math.isfinite(summary["after"]["score_mean"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2]
    assert all(math.isfinite(line["reward/mean"]) for line in steps)


MY_REWARDS = '''
    class MyReward:
        """The user's own reward: 1 for a completion that holds `digit`, else 0."""

        def __init__(self, digit="7"):
            self.digit = str(digit)

        def __call__(self, prompts, completions, **kwargs):
            return [1.0 if self.digit in c else 0.0 for c in completions]
'''

# Two ways to replace rng's reward node. `task.reward={...}` alone would merge into it and keep its
# low/high/target (which MyReward does not take): set it to null first.
REPLACE_REWARD = {
    "dotted-name": ["task.reward=my_rewards.MyReward"],  # a class built without arguments, or a function
    "node": ["task.reward=null", "task.reward={_target_:my_rewards.MyReward,digit:'3'}"],
}


@pytest.mark.parametrize("form", sorted(REPLACE_REWARD))
@pytest.mark.slow
def test_users_own_reward_module_replaces_the_task_reward(form, tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "my_rewards.py").write_text(textwrap.dedent(MY_REWARDS))
    args = ["model=tiny-random", "logger=none", "trainer.progress=false", "trainer.max_steps=2",
            "trainer.samples_per_prompt=4", "task.evaluation.n_samples=8", "task.evaluation.before_training=false",
            *REPLACE_REWARD[form]]
    # Run from the user's own folder, as the README shows: train.py puts that folder on sys.path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_train(args, tmp_path, cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["steps"] == 2 and 0.0 <= report["after"]["score_mean"] <= 1.0
