"""The simulated user of ``mmgym/AskToAct-v0``: answers clarifying questions about the
hidden target (Ask-to-Act, "Grounding Multimodal LLMs to Embodied Agents that Ask for Help
with Reinforcement Learning", whose user is an LLM that knows the target instance).

Any callable ``(question: str, target_description: dict) -> str`` can play the user (a VLM,
a person at a terminal); ``RuleBasedUser`` is the built-in one. It recognises a small
question grammar (``What colour is it?``, ``Is it the red one?``, ``How big is it?``,
``Where is it?``, ``Is it in the kitchen?``, ``Where should I put it?``) and falls back to
keyword matching for free text. It answers exactly one attribute per question (the first
one the question mentions), so one question reveals one fact and the minimum number of
questions of an episode is a true lower bound. Anything else gets "I don't understand."
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Literal

from mmgym.envs.ask_to_act_world import CATEGORIES, ROOMS, SIZES
from mmgym.envs.scenes import PALETTE

__all__ = ["DONT_UNDERSTAND", "MAX_QUESTION_CHARS", "QuestionKind", "RuleBasedUser", "UserFn", "classify_question"]

UserFn = Callable[[str, dict], str]
QuestionKind = Literal["color", "size", "location", "goal"]
DONT_UNDERSTAND = "I don't understand."
MAX_QUESTION_CHARS = 500  # longer questions are not read (answered DONT_UNDERSTAND)

_COLOR_WORDS = {"color": None, "colour": None, "colored": None, "coloured": None, **{c: c for c in PALETTE}}
_SIZE_WORDS = {
    "size": None, "sized": None, "big": "large", "bigger": "large", "biggest": "large", "large": "large",
    "larger": "large", "largest": "large", "huge": "large", "small": "small", "smaller": "small",
    "smallest": "small", "little": "small", "tiny": "small", "medium": "medium", "mid": "medium",
}
_RECEPTACLE_KINDS = sorted({k for ks in ROOMS.values() for k in ks}, key=len, reverse=True)
_ROOM_NAMES = sorted(ROOMS, key=len, reverse=True)
_LOCATION_WORDS = ("where", "located", "location", "room", "receptacle", "furniture")
_GOAL_VERBS = {"put", "place", "leave", "drop", "deliver", "bring", "store"}
_OPEN_SIZE = re.compile(r" how (?:big|large|small|little|tiny|huge)(?= )")
_REFERENCES = {"it", "its", "one", "object", "item", "thing", "target", "you", "your", "want", "need", "this", "that", "which"}


def _normalize(question: str) -> str:
    """Lowercase words separated by single spaces, padded (so `` cup `` matches whole words)."""
    words = re.findall(r"[a-z0-9]+", question.lower().replace("colour", "color"))
    return " " + " ".join(words) + " "


def _find(text: str, phrases: list[str] | tuple[str, ...]) -> list[tuple[int, str]]:
    """Whole-word occurrences of ``phrases`` (longest first, no overlaps) as (position, phrase)."""
    found: list[tuple[int, str]] = []
    for p in sorted(phrases, key=len, reverse=True):
        needle = f" {p} "
        start = text.find(needle)
        while start >= 0:
            found.append((start, p))
            text = text[:start + 1] + "#" * len(p) + text[start + 1 + len(p):]
            start = text.find(needle)
    return sorted(found)


def _first(found: list[tuple[int, str]]) -> int:
    return found[0][0] if found else 1 << 30


def classify_question(question: str, category: str = "") -> QuestionKind | None:
    """Which fact about the target a question asks for, or ``None`` if it is not a
    question about the task (empty, too long, unrelated, or asking for several facts at
    once without naming one first).

    >>> classify_question("What colour is the cup?", "cup"), classify_question("Is it the big one?")
    ('color', 'size')
    >>> classify_question("Where should I put it?"), classify_question("What colour is the sky today?")
    ('goal', None)
    """
    if not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS:
        return None
    text = _normalize(question)
    words = set(text.split())
    if not words:
        return None
    cat_words = {category, category + "s"} if category else set()
    if _other_category(text, category) is not None:
        return None  # about another object ("is the book red?")
    if not (words & (_REFERENCES | cat_words)) and len(words) > 3:
        return None  # e.g. "what colour is the sky": names neither the object nor "it"
    if "where" in words and words & _GOAL_VERBS:
        return "goal"
    hits = {
        "color": _first(_find(text, list(_COLOR_WORDS))),
        "size": _first(_find(text, list(_SIZE_WORDS))),
        "location": _first(_find(text, [*_LOCATION_WORDS, *_ROOM_NAMES, *_RECEPTACLE_KINDS])),
    }
    kind, pos = min(hits.items(), key=lambda kv: kv[1])
    return kind if pos < 1 << 30 else None  # type: ignore[return-value]


def _other_category(text: str, category: str) -> str | None:
    """An object category the question names instead of the target's own."""
    words = set(text.split())
    if category in words or category + "s" in words:
        return None
    for c in CATEGORIES:
        if c != category and (c in words or c + "s" in words):
            return c
    return None


class RuleBasedUser:
    """The built-in user: ``user(question, target_description) -> answer``.

    ``target_description`` has ``category``, ``color``, ``size``, ``room``, ``receptacle``
    (its kind, e.g. ``"counter"``), ``location`` (``"kitchen counter"``) and ``goal``.
    Yes/no questions get "Yes, ..." or "No, ..." followed by the true value, as a person
    would answer ("No, it is not green; it is red."), so either form reveals the fact.
    """

    def __call__(self, question: str, target_description: Mapping[str, Any]) -> str:
        t = {k: str(v) for k, v in dict(target_description).items()}
        category = t.get("category", "")
        if not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS:
            return DONT_UNDERSTAND
        text = _normalize(question)
        other = _other_category(text, category)
        if other is not None:
            return f"I only need the {category}, not a {other}."
        kind = classify_question(question, category)
        if kind is None:
            return DONT_UNDERSTAND
        if kind == "goal":
            return f"Please put it on the {t.get('goal', '')}."
        return getattr(self, f"_answer_{kind}")(text, t)

    @staticmethod
    def _answer_color(text: str, t: dict[str, str]) -> str:
        named = [p for _, p in _find(text, [c for c in PALETTE])]
        return _yes_no(named, t.get("color", ""), f"it is {t.get('color', '')}", "it is not {}")

    @staticmethod
    def _answer_size(text: str, t: dict[str, str]) -> str:
        text = _OPEN_SIZE.sub(" ", text)  # "how big is it" asks for the size, it names none
        named = [_SIZE_WORDS[p] for _, p in _find(text, list(_SIZE_WORDS)) if _SIZE_WORDS[p] in SIZES]
        size = t.get("size", "")
        return _yes_no(named, size, f"it is the {size} one", "it is not the {} one")

    @staticmethod
    def _answer_location(text: str, t: dict[str, str]) -> str:
        rooms = [p for _, p in _find(text, _ROOM_NAMES)]
        recs = [p for _, p in _find(text, _RECEPTACLE_KINDS)]
        where = f"it is on the {t.get('receptacle', '')} in the {t.get('room', '')}"
        if not rooms and not recs:
            return where[0].upper() + where[1:] + "."
        ok = (not rooms or t.get("room") in rooms) and (not recs or t.get("receptacle") in recs)
        return f"Yes, {where}." if ok else f"No, {where}."


def _yes_no(named: list[str], truth: str, statement: str, negation: str) -> str:
    if not named:
        return statement[0].upper() + statement[1:] + "."
    if truth in named:
        return f"Yes, {statement}."
    return f"No, {negation.format(named[0])}; {statement}."
