"""Sentiment reward with VADER (Hutto & Gilbert 2014), a lexicon- and rule-based scorer.

    score(y) = scale * compound(y)      for target "positive"
             = -scale * compound(y)     for target "negative"

`compound` is VADER's normalised sentiment in [-1, 1]; the lexicon ships with `vaderSentiment`,
so this needs no model and no network.
"""

from __future__ import annotations

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from gf_odg.errors import ConfigError


class SentimentReward:
    name = "sentiment"

    def __init__(self, target: str = "positive", scale: float = 1.0):
        if target not in ("positive", "negative"):
            raise ConfigError(f"task.reward.target={target!r} must be 'positive' or 'negative'.")
        self.target, self.scale = target, float(scale)
        self.sign = 1.0 if target == "positive" else -1.0
        self.analyzer = SentimentIntensityAnalyzer()  # reads the lexicon file: once, not per call

    def compound(self, text: str) -> float:
        return self.analyzer.polarity_scores(text)["compound"]

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return [self.sign * self.scale * self.compound(c) for c in completions]
