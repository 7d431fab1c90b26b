"""Reward modules: any callable (prompts, completions, **kwargs) -> scores. See `base` for the contract."""

from gf_odg.rewards.base import call_reward, reward_name
from gf_odg.rewards.combine import WeightedSum
from gf_odg.rewards.embedding import EmbeddingSimilarityReward, embed, load_minilm
from gf_odg.rewards.rng import RandomIntegerReward
from gf_odg.rewards.sentiment import SentimentReward
from gf_odg.rewards.text import ForbiddenWordsReward, KeywordsReward, LengthReward, RegexReward

__all__ = [
    "call_reward", "reward_name", "RandomIntegerReward", "KeywordsReward", "RegexReward", "LengthReward",
    "ForbiddenWordsReward", "SentimentReward", "EmbeddingSimilarityReward", "WeightedSum", "embed", "load_minilm",
]
