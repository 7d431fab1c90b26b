"""The built-in reward modules and the reward contract (`call_reward`)."""

from __future__ import annotations

import math

import pytest
import torch

from gf_odg.errors import ConfigError, RewardError
from gf_odg.rewards.base import call_reward
from gf_odg.rewards.combine import WeightedSum
from gf_odg.rewards.sentiment import SentimentReward
from gf_odg.rewards.text import (
    ForbiddenWordsReward,
    KeywordsReward,
    LengthReward,
    RegexReward,
    concept_present,
    words_of,
)

NEG_INF = -math.inf


def present(concept: str, text: str) -> bool:
    return concept_present(concept, words_of(text))


# ----------------------------------------------------------------------------- inflections

@pytest.mark.parametrize(
    "concept, text",
    [
        ("dog", "Two dogs played."),
        ("run", "She was running late."),
        ("run", "He runs daily."),
        ("run", "They ran home."),
        ("stop", "The bus stopped."),
        ("stop", "Stopping is hard."),
        ("carry", "He carried the box."),
        ("carry", "She carries bags."),
        ("carry", "carrying water"),
        ("box", "Boxes everywhere."),
        ("watch", "She watches TV."),
        ("dance", "They danced and kept dancing."),
        ("tie", "He is tying his shoes."),
        ("tie", "a tied game"),
        ("hope", "hoping for rain"),
        ("hop", "the rabbit was hopping"),
        ("visit", "We visited Rome."),
        ("begin", "the beginning"),
        ("quit", "She is quitting."),
        ("play", "The kids played."),
        ("tomato", "ripe tomatoes"),
        ("see", "I saw it."),
        ("throw", "He threw the ball."),
        ("child", "The children laughed."),
        ("knife", "sharp knives"),
        ("cat", "CAT!"),
        ("cat", "the cat's toy"),
        ("ice cream", "They ate ice creams."),
    ],
)
def test_concept_matches_its_inflections(concept, text):
    assert present(concept, text)


@pytest.mark.parametrize(
    "concept, text",
    [
        ("cat", "a new category"),
        ("cat", "concatenate"),
        ("run", "a rune stone"),
        ("hop", "hoping for rain"),  # hope, not hop
        ("hope", "the rabbit was hopping"),
        ("see", "a seed"),  # see's past is saw
        ("dog", "dogma"),
        ("car", "a cart"),
        ("ice cream", "ice and cream"),
        ("ice cream", "cream ice"),
    ],
)
def test_concept_rejects_other_words(concept, text):
    assert not present(concept, text)


# ----------------------------------------------------------------------------- KeywordsReward

def test_keywords_per_prompt_fraction_and_hard():
    concepts = [["dog", "frisbee", "catch"], ["dog", "frisbee", "catch"], ["cat", "sleep"]]
    completions = ["The dog caught the frisbees.", "A dog jumps.", "A category of sleeping things."]
    soft = KeywordsReward(scale=2.0)
    assert soft([""] * 3, completions, concepts=concepts) == pytest.approx([2.0, 2.0 / 3, 1.0])
    hard = KeywordsReward(hard=True)
    assert hard([""] * 3, completions, concepts=concepts) == [1.0, NEG_INF, NEG_INF]


def test_keywords_fixed_concepts_custom_key_and_string_concepts():
    fixed = KeywordsReward(concepts=["Apple", "eat"])
    assert fixed(["p", "p"], ["She is eating apples.", "apple pie"]) == [1.0, 0.5]
    keyed = KeywordsReward(concepts_key="words")
    assert keyed(["p"], ["a dog barks"], words=["dog, bark cat"]) == pytest.approx([2 / 3])


def test_keywords_errors():
    with pytest.raises(ConfigError, match="task.reward.concepts"):
        KeywordsReward(concepts=[])
    with pytest.raises(RewardError, match="'keywords'.*concepts_key"):
        call_reward(KeywordsReward(), ["p"], ["text"])  # no concepts anywhere
    with pytest.raises(RewardError, match="2 entries for 1"):
        call_reward(KeywordsReward(), ["p"], ["text"], concepts=[["a"], ["b"]])


# ----------------------------------------------------------------------------- RegexReward

def test_regex_search_fullmatch_and_hard():
    search = RegexReward(r"\d+", reward=1.0, penalty=-2.0)
    assert search(["", ""], ["it is 42.", "none"]) == [1.0, -2.0]
    full = RegexReward(r"\d+", mode="fullmatch")
    assert full(["", "", ""], [" 42\n", "it is 42", "42a"]) == [0.0, -1.0, -1.0]
    assert RegexReward(r"\d+", mode="fullmatch", strip=False)([""], [" 42"]) == [-1.0]
    assert RegexReward(r"(?i)yes", hard=True)(["", ""], ["YES", "no"]) == [0.0, NEG_INF]


def test_regex_config_errors():
    with pytest.raises(ConfigError, match="task.reward.pattern"):
        RegexReward("(")
    with pytest.raises(ConfigError, match="task.reward.mode"):
        RegexReward("a", mode="match")


# ----------------------------------------------------------------------------- LengthReward

def test_length_target_and_bounds():
    five, eight = "one two three four five", "a b c d e f g h"
    assert LengthReward(target_words=6, scale=0.5)(["", ""], [five, eight]) == [-0.5, -1.0]
    bounds = LengthReward(min_words=6, max_words=7)
    assert bounds(["", "", ""], [five, "a b c d e f", eight]) == [-1.0, 0.0, -1.0]
    hard = LengthReward(target_words=6, min_words=5, max_words=7, hard=True)
    assert hard(["", "", ""], [five, "a b c d e f", eight]) == [-1.0, 0.0, NEG_INF]
    assert LengthReward(max_words=3, hard=True)(["", ""], ["", "a b c d"]) == [0.0, NEG_INF]


def test_length_config_errors():
    with pytest.raises(ConfigError, match="target_words"):
        LengthReward()
    with pytest.raises(ConfigError, match="hard"):
        LengthReward(target_words=3, hard=True)
    with pytest.raises(ConfigError, match="min_words"):
        LengthReward(min_words=5, max_words=2)
    with pytest.raises(ConfigError, match="max_words"):
        LengthReward(max_words=-1)


# ----------------------------------------------------------------------------- ForbiddenWordsReward

def test_forbidden_words_whole_word_case_insensitive():
    completions = ["Damn, damn it.", "Damnation!", "a bad apple", "fine"]
    soft = ForbiddenWordsReward(["damn", "bad apple"], hard=False, penalty=-0.5)
    assert soft([""] * 4, completions) == [-1.0, 0.0, -0.5, 0.0]
    hard = ForbiddenWordsReward(["damn", "bad apple"])
    assert hard([""] * 4, completions) == [NEG_INF, 0.0, NEG_INF, 0.0]


def test_forbidden_words_config_errors():
    with pytest.raises(ConfigError, match="task.reward.words"):
        ForbiddenWordsReward([])
    with pytest.raises(ConfigError, match="task.reward.words"):
        ForbiddenWordsReward("damn")  # a string, not a list
    with pytest.raises(ConfigError, match="task.reward.penalty"):
        ForbiddenWordsReward(["x"], hard=False, penalty=1.0)


# ----------------------------------------------------------------------------- SentimentReward

def test_sentiment_orders_clear_sentences():
    texts = ["I love this wonderful, beautiful day!", "The table is brown.", "I hate this awful, terrible mess."]
    positive = SentimentReward(scale=2.0)([""] * 3, texts)
    assert positive[0] > 1.0 and positive[2] < -1.0 and abs(positive[1]) < 0.1
    negative = SentimentReward(target="negative")([""] * 3, texts)
    assert negative == pytest.approx([-p / 2 for p in positive])
    with pytest.raises(ConfigError, match="task.reward.target"):
        SentimentReward(target="happy")


# ----------------------------------------------------------------------------- embeddings

@pytest.fixture(scope="module")
def embedding_reward():
    from gf_odg.rewards.embedding import EmbeddingSimilarityReward

    return EmbeddingSimilarityReward(target="A dog is playing fetch in the park.")


@pytest.mark.slow
def test_embedding_paraphrase_beats_unrelated(embedding_reward):
    scores = embedding_reward(["", "", ""], [
        "In the park, a puppy chases a ball someone threw.",
        "Quarterly tax filings are due in April.",
        "A dog is playing fetch in the park.",
    ])
    assert scores[2] == pytest.approx(1.0, abs=1e-4)
    assert scores[0] > scores[1] + 0.3


def test_embed_is_normalised_and_model_shared(embedding_reward):
    from gf_odg.rewards.embedding import embed, load_minilm

    assert load_minilm() is embedding_reward.model  # loaded once per process
    vectors = embed(["hello world", "good morning", "hello world"])
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(vectors[0], vectors[2], atol=1e-5)
    assert embed([]).shape == (0, 384)


def test_embedding_bad_model_path():
    from gf_odg.rewards.embedding import EmbeddingSimilarityReward

    with pytest.raises(ConfigError, match="task.reward.model_path"):
        EmbeddingSimilarityReward(target="x", model_path="/nonexistent/model")


# ----------------------------------------------------------------------------- WeightedSum

def test_weighted_sum_combines_and_records_terms():
    reward = WeightedSum({
        "length": {"weight": 0.5, "reward": {"_target_": "gf_odg.rewards.text.LengthReward", "target_words": 2}},
        "digits": {"weight": 2.0, "reward": RegexReward(r"\d", reward=1.0, penalty=0.0)},
        "banned": {"weight": 1.0, "reward": ForbiddenWordsReward(["bad"])},
        "logged": {"weight": 0.0, "reward": RegexReward("zzz", hard=True)},  # logged only: its -inf is ignored
    })
    completions = ["a 1", "a b c d", "bad 7"]
    scores = call_reward(reward, [""] * 3, completions)
    assert scores.tolist() == [2.0, -1.0, NEG_INF]
    assert set(reward.last_terms) == {"length", "digits", "banned", "logged"}
    assert reward.last_terms["length"].tolist() == [0.0, -2.0, 0.0]
    assert reward.last_terms["digits"].tolist() == [1.0, 0.0, 1.0]
    assert reward.last_terms["logged"].tolist() == [NEG_INF] * 3


def test_weighted_sum_passes_kwargs_and_names_failing_term():
    reward = WeightedSum({"cover": {"weight": 1.0, "reward": KeywordsReward()}})
    assert reward([""], ["dogs bark"], concepts=[["dog", "cat"]]) == [0.5]

    reward = WeightedSum({"broken": {"weight": 1.0, "reward": lambda prompts, completions, **kw: [float("nan")]}})
    with pytest.raises(RewardError, match="term 'broken'.*sample 0"):
        reward([""], ["x"])


def test_weighted_sum_config_errors():
    with pytest.raises(ConfigError, match="task.reward.terms"):
        WeightedSum({})
    with pytest.raises(ConfigError, match=r"terms\.x must be"):
        WeightedSum({"x": {"weigth": 1.0, "reward": RegexReward("a")}})
    with pytest.raises(ConfigError, match=r"terms\.x\.weight"):
        WeightedSum({"x": {"weight": float("inf"), "reward": RegexReward("a")}})
    with pytest.raises(ConfigError, match=r"terms\.x\.reward: task\.reward\.pattern"):
        WeightedSum({"x": {"weight": 1.0, "reward": {"_target_": "gf_odg.rewards.text.RegexReward", "pattern": "("}}})
    with pytest.raises(ConfigError, match=r"terms\.x\.reward needs a _target_"):
        WeightedSum({"x": {"weight": 1.0, "reward": {"pattern": "a"}}})


def test_weighted_sum_from_hydra_config():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "_target_": "gf_odg.rewards.combine.WeightedSum",
        "terms": {
            "keywords": {
                "weight": 1.0,
                "reward": {"_target_": "gf_odg.rewards.text.KeywordsReward", "concepts": ["dog"]},
            },
            "length": {"weight": 0.1, "reward": {"_target_": "gf_odg.rewards.text.LengthReward", "target_words": 2}},
        },
    })
    reward = instantiate(cfg)  # nested rewards arrive already built, inside a DictConfig
    assert reward(["", ""], ["dogs bark", "cats meow loudly"]) == pytest.approx([1.0, -0.1])


# ----------------------------------------------------------------------------- call_reward

def _constant(values):
    def reward(prompts, completions, **kwargs):
        return values

    reward.name = "constant"
    return reward


def test_call_reward_accepts_lists_tensors_and_neg_inf():
    assert call_reward(_constant([1.0, NEG_INF]), ["", ""], ["a", "b"]).tolist() == [1.0, NEG_INF]
    scores = call_reward(_constant(torch.tensor([[0.5], [2.0]], dtype=torch.float64)), ["", ""], ["a", "b"])
    assert scores.dtype == torch.float32 and scores.tolist() == [0.5, 2.0]


@pytest.mark.parametrize(
    "values, message",
    [
        ([1.0], r"'constant' returned 1 scores for 2 completions"),
        ([1.0, 2.0, 3.0], r"'constant' returned 3 scores for 2 completions"),
        ([0.0, float("nan")], r"'constant' returned nan for sample 1 \(completion 'b'\)"),
        ([math.inf, 0.0], r"'constant' returned inf for sample 0 \(completion 'a'\)"),
        ("oops", r"'constant' returned str"),
    ],
)
def test_call_reward_rejects_bad_output(values, message):
    with pytest.raises(RewardError, match=message):
        call_reward(_constant(values), ["", ""], ["a", "b"])


def test_call_reward_names_a_reward_that_raises():
    with pytest.raises(RewardError, match="'regex' raised AttributeError"):
        call_reward(RegexReward("a"), [""], [None])
