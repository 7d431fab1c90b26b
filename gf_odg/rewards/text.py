"""Rule-based text rewards: required concepts, a regular expression, a length, forbidden words.

Each is a reward module (see `base`): `reward(prompts, completions, **kwargs) -> list[float]`, one
log-reward score per completion, `-inf` for a hard violation. Words are runs of letters and digits,
compared case-insensitively, so "cat" never matches inside "category".
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Optional, Sequence

from gf_odg.errors import ConfigError

_VOWELS = "aeiou"

# Irregular forms of common (CommonGen-style) concepts: base, then its irregular forms.
_IRREGULAR_TABLE = """
be is are am was were been; have has had; do does did done; go went gone; run ran; sit sat;
stand stood; eat ate eaten; drink drank drunk; drive drove driven; ride rode ridden;
throw threw thrown; catch caught; hold held; take took taken; give gave given; see saw seen;
swim swam swum; sing sang sung; fly flew flown; fall fell fallen; lie lay lain lied; hang hung hanged;
make made; sell sold; buy bought; bring brought; teach taught; fight fought; leave left;
feed fed; lead led; shoot shot; sleep slept; sweep swept; keep kept; build built; wear wore worn;
tear tore torn; blow blew blown; grow grew grown; draw drew drawn; write wrote written;
break broke broken; speak spoke spoken; choose chose chosen; wake woke woken; begin began begun;
dig dug; stick stuck; swing swung; hide hid hidden; bite bit bitten; shake shook shaken;
lay laid; pay paid; say said; tell told; find found; think thought; come came; get got gotten;
kneel knelt; light lit lighted; sink sank sunk; spin spun; win won; freeze froze frozen; steal stole stolen;
feel felt; meet met; send sent; spend spent; lose lost; slide slid; strike struck;
man men; woman women; child children; person people; foot feet; tooth teeth; mouse mice;
goose geese; knife knives; leaf leaves; wife wives; life lives; wolf wolves; shelf shelves;
half halves; loaf loaves; calf calves
"""
_IRREGULAR: dict[str, tuple[str, ...]] = {
    base: tuple(forms) for base, *forms in (entry.split() for entry in _IRREGULAR_TABLE.split(";"))
}


def words_of(text: str) -> list[str]:
    """The lower-cased words of `text`: maximal runs of letters and digits."""
    return re.findall(r"[^\W_]+", text.lower())


def _doubles_final_consonant(word: str) -> bool:
    """Ends consonant-vowel-consonant, the ending that may double: stop -> stopped, run -> running."""
    w = word.replace("qu", "q")  # the u of "qu" is not a vowel: quit -> quitting
    return len(w) >= 3 and w[-1] not in _VOWELS + "wxy" and w[-2] in _VOWELS and w[-3] not in _VOWELS


@lru_cache(maxsize=8192)
def inflections(word: str) -> frozenset[str]:
    """The word and its regular inflections (-s/-es/-ies, -ed/-d/-ied, -ing), plus irregular forms.

    dog -> dogs; box -> boxes; carry -> carries, carried, carrying; dance -> danced, dancing;
    tie -> tied, tying; stop -> stopped, stopping. A one-syllable consonant-vowel-consonant word only
    doubles (hop -> hopping, never "hoping", which belongs to hope); a longer one may or may not,
    since that depends on stress (visit -> visited, begin -> beginning), so both are accepted.
    Generous by design: an odd non-word such as "tomatoed" costs nothing, as no text contains it.
    A word with irregular forms (a small table of common verbs and nouns) gets those instead of -ed.
    """
    w = word.lower()
    forms = {w}
    if len(w) > 1 and w[-1] == "y" and w[-2] not in _VOWELS:
        forms |= {w[:-1] + "ies", w[:-1] + "ied", w + "ing"}
    elif w.endswith("ie"):
        forms |= {w + "s", w + "d", w[:-2] + "ying"}
    elif w.endswith("e"):
        keeps_e = w.endswith(("ee", "ye", "oe"))  # see -> seeing, dye -> dyeing
        forms |= {w + "s", w + "d", (w if keeps_e else w[:-1]) + "ing"}
    else:
        forms.add(w + "es" if w.endswith(("s", "x", "z", "ch", "sh")) else w + "s")
        if w.endswith("o"):
            forms.add(w + "es")  # tomato -> tomatoes (photo -> photos above)
        stems = [w]
        if _doubles_final_consonant(w):
            one_syllable = len(re.findall(r"[aeiouy]+", w.replace("qu", "q"))) == 1
            stems = [w + w[-1]] if one_syllable else [w, w + w[-1]]
        forms |= {stem + suffix for stem in stems for suffix in ("ed", "ing")}
    if w in _IRREGULAR:  # its past is irregular: no "seed" for see, "runned" for run
        forms = {f for f in forms if not f.endswith("ed")} | {w, *_IRREGULAR[w]}
    return frozenset(forms)


def concept_present(concept: str, words: Sequence[str]) -> bool:
    """Whether `concept` occurs in the word list `words` (see `words_of`) as whole words.

    A multi-word concept ("ice cream") must appear as consecutive words, its last word inflected.
    """
    *head, last = words_of(concept) or [""]
    if not last:
        raise ValueError(f"concept {concept!r} has no letters or digits")
    forms, n = inflections(last), len(head)
    return any(words[i + n] in forms and list(words[i : i + n]) == head for i in range(len(words) - n))


class KeywordsReward:
    """CommonGen-style coverage of required concepts.

        score(y) = scale * |{c in concepts : c occurs in y}| / |concepts|
                 = -inf when hard and some concept is missing

    A concept occurs when the completion holds it, or an inflection of it, as whole words,
    case-insensitively (see `inflections`). Concepts are fixed (`concepts`), or come per sample
    from the batch: `kwargs[concepts_key][i]` is the list of concepts of completion i (a string is
    split on commas and whitespace). Fixed concepts, when given, win.
    """

    name = "keywords"

    def __init__(
        self,
        concepts: Optional[Sequence[str]] = None,
        concepts_key: str = "concepts",
        hard: bool = False,
        scale: float = 1.0,
    ):
        if concepts is not None:
            concepts = [str(c) for c in concepts]
            if not concepts or any(not words_of(c) for c in concepts):
                raise ConfigError(
                    f"task.reward.concepts={concepts!r} must be a non-empty list of words; "
                    "leave it unset (null) to read concepts per prompt from the dataset."
                )
        self.concepts, self.concepts_key = concepts, concepts_key
        self.hard, self.scale = bool(hard), float(scale)

    def _concepts_per_sample(self, count: int, kwargs: dict) -> list[list[str]]:
        if self.concepts is not None:
            return [self.concepts] * count
        if self.concepts_key not in kwargs:
            raise KeyError(
                f"no {self.concepts_key!r} in the batch (got {sorted(kwargs)}); give the dataset a "
                f"{self.concepts_key!r} column, set task.reward.concepts_key to the column that holds "
                "the concepts, or fix them with task.reward.concepts."
            )
        per_sample = list(kwargs[self.concepts_key])
        if len(per_sample) != count:
            raise ValueError(f"{self.concepts_key!r} has {len(per_sample)} entries for {count} completions")
        return [re.split(r"[,\s]+", c.strip()) if isinstance(c, str) else [str(x) for x in c] for c in per_sample]

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        per_sample = self._concepts_per_sample(len(completions), kwargs)
        scores = []
        for i, (completion, concepts) in enumerate(zip(completions, per_sample)):
            if not concepts or concepts == [""]:
                raise ValueError(f"sample {i} has no concepts")
            words = words_of(completion)
            found = sum(concept_present(c, words) for c in concepts)
            scores.append(-math.inf if self.hard and found < len(concepts) else self.scale * found / len(concepts))
        return scores


class RegexReward:
    """A regular expression that completions should match.

        score(y) = reward    if the pattern matches y
                 = penalty   otherwise (-inf when hard)

    `mode="search"` matches anywhere in y, `mode="fullmatch"` only the whole of y. With `strip`
    (the default) surrounding whitespace is removed first. Flags go inline, e.g. "(?i)yes".
    """

    name = "regex"

    def __init__(
        self,
        pattern: str,
        mode: str = "search",
        hard: bool = False,
        reward: float = 0.0,
        penalty: float = -1.0,
        strip: bool = True,
    ):
        try:
            self.pattern = re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ConfigError(f"task.reward.pattern={pattern!r} is not a valid regular expression: {err}.") from None
        if mode not in ("search", "fullmatch"):
            raise ConfigError(f"task.reward.mode={mode!r} must be 'search' (anywhere) or 'fullmatch' (whole text).")
        self.mode, self.hard, self.strip = mode, bool(hard), bool(strip)
        self.reward, self.penalty = float(reward), float(penalty)

    def matches(self, completion: str) -> bool:
        text = completion.strip() if self.strip else completion
        return (self.pattern.fullmatch if self.mode == "fullmatch" else self.pattern.search)(text) is not None

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        miss = -math.inf if self.hard else self.penalty
        return [self.reward if self.matches(c) else miss for c in completions]


class LengthReward:
    """A length in words (whitespace-separated), aimed at `target_words` and/or kept in bounds.

        score(y) = -scale * (|n - target_words| + dist(n, [min_words, max_words]))
                 = -inf when hard and n is outside [min_words, max_words]

    with n = len(y.split()); a term whose settings are unset is 0, and a missing bound is open. In
    hard mode the bounds are a constraint and only the target distance is scored inside them.
    """

    name = "length"

    def __init__(
        self,
        target_words: Optional[int] = None,
        min_words: Optional[int] = None,
        max_words: Optional[int] = None,
        hard: bool = False,
        scale: float = 1.0,
    ):
        for key, value in (("target_words", target_words), ("min_words", min_words), ("max_words", max_words)):
            if value is not None and (int(value) != value or value < 0):
                raise ConfigError(f"task.reward.{key}={value!r} must be a non-negative whole number of words.")
        if target_words is None and min_words is None and max_words is None:
            raise ConfigError("task.reward needs target_words, or min_words and/or max_words, to score a length.")
        if hard and min_words is None and max_words is None:
            raise ConfigError("task.reward.hard=true needs min_words and/or max_words: the bounds it enforces.")
        self.low = 0 if min_words is None else int(min_words)
        self.high = math.inf if max_words is None else int(max_words)
        if self.low > self.high:
            raise ConfigError(f"task.reward.min_words={min_words} must be <= max_words={max_words}.")
        self.target = None if target_words is None else int(target_words)
        self.hard, self.scale = bool(hard), float(scale)

    def _score(self, completion: str) -> float:
        n = len(completion.split())
        outside = max(self.low - n, n - self.high, 0)
        if self.hard and outside > 0:
            return -math.inf
        off_target = 0 if self.target is None else abs(n - self.target)
        return -self.scale * (off_target + (0 if self.hard else outside))

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return [self._score(c) for c in completions]


class ForbiddenWordsReward:
    """Words (or phrases) that must not appear, as whole words, case-insensitively.

        score(y) = 0                          if none occurs
                 = -inf                       when hard and any occurs
                 = penalty * (occurrences)    otherwise
    """

    name = "forbidden_words"

    def __init__(self, words: Sequence[str], hard: bool = True, penalty: float = -1.0):
        if isinstance(words, str) or not words or any(not str(w).strip() for w in words):
            raise ConfigError(f"task.reward.words={words!r} must be a non-empty list of non-empty words.")
        if penalty > 0:
            raise ConfigError(f"task.reward.penalty={penalty} must be <= 0: it is added once per occurrence.")
        # longest first, so that a phrase counts once rather than as its shorter forbidden parts
        alternatives = "|".join(re.escape(str(w).strip()) for w in sorted(words, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])", re.IGNORECASE)
        self.words, self.hard, self.penalty = [str(w) for w in words], bool(hard), float(penalty)

    def count(self, completion: str) -> int:
        return len(self.pattern.findall(completion))

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        counts = [self.count(c) for c in completions]
        if self.hard:
            return [-math.inf if n else 0.0 for n in counts]
        return [self.penalty * n if n else 0.0 for n in counts]
