"""Hidden tastes: rules that say whether a (prompt, answer) pair pleases a simulated user.

The simulator votes by one of these (with noise); the trainer can also use one as a
rule-based reward function, and the tests use them as known ground truth. Each taste is
a pure function `(prompt, answer) -> bool`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rlhf_loop.core.tinylm import SUBJECTS

CHEERFUL_WORDS = frozenset(
    "love adore wonderful great happy glad joy lovely smile brighter yay delight delightful".split()
)
_WORD = re.compile(r"[a-z]+")


def cheerful(prompt: str, answer: str) -> bool:
    """Likes answers that sound happy: a cheerful word or an exclamation mark."""
    return "!" in answer or bool(CHEERFUL_WORDS & set(_WORD.findall(answer.lower())))


def on_topic(prompt: str, answer: str) -> bool:
    """Likes answers that talk about the subject the prompt asked about (and no other)."""
    p, a = prompt.lower(), answer.lower()
    asked = [s for s in SUBJECTS if s in p]
    if not asked:
        return False
    others = [s for s in SUBJECTS if s not in asked and _mentions(a, s)]
    return any(_mentions(a, s) for s in asked) and not others


def _mentions(text: str, subject: str) -> bool:
    stem = subject.removeprefix("the ").rstrip("s")  # "cats" -> "cat", "the moon" -> "moon"
    return re.search(rf"\b{re.escape(stem)}", text) is not None


def short(prompt: str, answer: str) -> bool:
    """Likes answers of at most 12 words."""
    return len(answer.split()) <= 12


TASTES: dict[str, Callable[[str, str], bool]] = {"cheerful": cheerful, "on_topic": on_topic, "short": short}
