"""Scores of a short answer against its reference: exact match and token F1 after light normalization.

Normalization follows the convention of extractive question answering (SQuAD): lower case,
punctuation removed, the articles "a", "an" and "the" removed, whitespace collapsed. Both scores
compare normalized texts, so "The Red." matches "red".
"""

from __future__ import annotations

import re
import statistics
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

# A reference of at most this many words (median over the evaluation set) is a short answer,
# one that exact match and token F1 judge fairly; longer free text would score near zero however good.
SHORT_ANSWER_WORDS = 3

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """``text`` lower-cased, without punctuation or articles, its words separated by single spaces.

    Punctuation is every character of a Unicode punctuation category (ASCII ones included), so
    "¿qué?" loses its marks as "what?" does; a punctuation mark between words joins them
    ("yes-no" → "yesno"), as SQuAD's normalization does.
    """
    lowered = text.lower()
    kept = "".join(ch for ch in lowered if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", kept).split())


def answer_tokens(text: str) -> list[str]:
    """The words of the normalized ``text``."""
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized texts are equal, else 0.0 (two empty answers match)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """The harmonic mean of precision and recall of the normalized words, counted with multiplicity.

    When either side has no word left after normalization the score is 1.0 if both are empty
    and 0.0 otherwise: there is nothing to overlap.
    """
    predicted, wanted = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def median_words(references: Sequence[str]) -> float:
    """The median number of words (whitespace-separated, before normalization) of ``references``; 0 when none."""
    return float(statistics.median(len(r.split()) for r in references)) if references else 0.0


def answers_are_short(references: Sequence[str], max_words: int = SHORT_ANSWER_WORDS) -> bool:
    """Whether exact match and token F1 suit ``references``: their median is at most ``max_words`` words."""
    return bool(references) and median_words(references) <= max_words


__all__ = [
    "SHORT_ANSWER_WORDS",
    "answer_tokens",
    "answers_are_short",
    "exact_match",
    "median_words",
    "normalize_answer",
    "token_f1",
]
