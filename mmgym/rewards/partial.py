"""Partial-credit outcome rewards as ``Rubric`` terms.

- Entity / attribute match (E-GRPO: near-miss answers earn a fraction of the reward in
  proportion to the gold entities they got right). With accuracy a in [0, 1] and match
  rate m in [0, 1]:
      r = a + (1 - a) * alpha * m
  which is 1 for a correct answer and alpha * m for a wrong one (E-GRPO's form for
  binary accuracy). alpha < 1 keeps every wrong answer below every right one.
- Checklists (CM2): a list of weighted yes/no (or [0, 1]) items checked on the episode;
  the reward is the weighted fraction satisfied, sum_i w_i c_i / sum_i w_i.

Each comes as a pure function, a term factory closing over the task's gold data (for
per-task rubrics), and a ``RUBRICS`` preset reading a value the env put in
``RewardContext.metrics`` (``entity_match``, ``checklist``). No function raises on odd
answer text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmgym.rewards.rubric import RUBRICS, RewardContext, RewardFn, Rubric, _fmt01
from mmgym.rewards.verifiers import normalize_text

__all__ = [
    "ChecklistItem",
    "attribute_match_rate",
    "attribute_match_term",
    "checklist_score",
    "checklist_term",
    "entity_match_rate",
    "entity_match_term",
    "partial_credit",
    "text_checklist",
]


def _phrase_in(text_norm: str, phrase: Any) -> bool:
    p = normalize_text(str(phrase))
    return bool(p) and f" {p} " in f" {text_norm} "


def entity_match_rate(text: str | None, entities: Sequence[str | Sequence[str]]) -> float:
    """Fraction of gold entities mentioned in ``text`` (E-GRPO's entity match rate).

    An entity is a string or a sequence of aliases (any alias counts); matching is on
    whole normalised words (``normalize_text``), so "red" does not match "redder".

    >>> entity_match_rate("The red cube is left of the ball", ["red cube", ("sphere", "ball"), "table"])
    0.6666666666666666
    """
    if not entities:
        return 0.0
    norm = normalize_text(text or "")
    hits = 0
    for ent in entities:
        aliases = (ent,) if isinstance(ent, str) else tuple(ent)
        hits += any(_phrase_in(norm, a) for a in aliases)
    return hits / len(entities)


def attribute_match_rate(predicted: Mapping[str, Any] | str | None, gold: Mapping[str, Any]) -> float:
    """Fraction of gold attributes the answer gets right.

    ``predicted`` as a mapping: attribute ``k`` is right if ``predicted[k]`` equals
    ``gold[k]`` after ``normalize_text`` (numbers within 1e-9 relative). As text: the gold
    value must be mentioned in it. An empty ``gold`` gives 0.

    >>> attribute_match_rate({"color": "Red", "shape": "cube", "size": "big"}, {"color": "red", "shape": "ball"})
    0.5
    """
    if not gold:
        return 0.0
    if predicted is None:
        return 0.0
    if isinstance(predicted, str):
        norm = normalize_text(predicted)
        return sum(_phrase_in(norm, v) for v in gold.values()) / len(gold)
    if not isinstance(predicted, Mapping):
        return 0.0
    return sum(k in predicted and _same(predicted[k], v) for k, v in gold.items()) / len(gold)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return normalize_text(str(a)) == normalize_text(str(b))


def partial_credit(accuracy: float, match_rate: float, *, alpha: float = 0.3) -> float:
    """E-GRPO-style reward a + (1 - a) * alpha * m (module docstring), inputs clipped to [0, 1].

    >>> partial_credit(0.0, 0.5, alpha=0.4), partial_credit(1.0, 0.0, alpha=0.4)
    (0.2, 1.0)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (partial credit never beats a correct answer), got {alpha}")
    a = _clip01(accuracy)
    m = _clip01(match_rate)
    return a + (1.0 - a) * alpha * m


def _clip01(x: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    return min(max(x, 0.0), 1.0) if math.isfinite(x) else 0.0


def entity_match_term(
    entities: Sequence[str | Sequence[str]], *, alpha: float = 0.3, name: str = "accuracy", weight: float = 1.0
) -> RewardFn:
    """Accuracy with E-GRPO partial credit for one task's gold ``entities`` (checked in the answer)."""
    partial_credit(0.0, 0.0, alpha=alpha)  # validates alpha now, not at the first episode

    def fn(ctx: RewardContext) -> float:
        return partial_credit(ctx.accuracy, entity_match_rate(ctx.answer, entities), alpha=alpha)

    return RewardFn(name, weight, fn)


def attribute_match_term(
    gold: Mapping[str, Any], *, alpha: float = 0.3, name: str = "accuracy", weight: float = 1.0
) -> RewardFn:
    """Accuracy with partial credit for the fraction of gold attributes mentioned in the answer."""
    partial_credit(0.0, 0.0, alpha=alpha)

    def fn(ctx: RewardContext) -> float:
        return partial_credit(ctx.accuracy, attribute_match_rate(ctx.answer, gold), alpha=alpha)

    return RewardFn(name, weight, fn)


# --------------------------------------------------------------------------- checklists


@dataclass(frozen=True, slots=True)
class ChecklistItem:
    """One checklist item: ``check(ctx)`` -> bool or a score in [0, 1] (clipped)."""

    name: str
    check: Callable[[RewardContext], float | bool]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"checklist item {self.name!r}: weight must be finite and >= 0, got {self.weight}")


def checklist_score(items: Sequence[ChecklistItem], ctx: RewardContext) -> float:
    """Weighted fraction of satisfied items, sum w_i c_i / sum w_i (0 for an empty or
    all-zero-weight checklist)."""
    total = sum(it.weight for it in items)
    if total <= 0:
        return 0.0
    return sum(it.weight * _clip01(it.check(ctx)) for it in items) / total


def text_checklist(phrases: Sequence[str], *, weights: Sequence[float] | None = None) -> list[ChecklistItem]:
    """Items that each require a phrase in the final answer (whole normalised words)."""
    if weights is not None and len(weights) != len(phrases):
        raise ValueError(f"{len(phrases)} phrases but {len(weights)} weights")
    ws = list(weights) if weights is not None else [1.0] * len(phrases)

    def make(p: str) -> Callable[[RewardContext], bool]:
        return lambda ctx: _phrase_in(normalize_text(ctx.answer or ""), p)

    return [ChecklistItem(f"mentions:{p}", make(p), w) for p, w in zip(phrases, ws)]


def checklist_term(items: Sequence[ChecklistItem], *, name: str = "checklist", weight: float = 1.0) -> RewardFn:
    """A ``Rubric`` term: :func:`checklist_score` of ``items``."""
    frozen = tuple(items)
    return RewardFn(name, weight, lambda ctx: checklist_score(frozen, ctx))


# --------------------------------------------------------------------------- presets


@RUBRICS.register("egrpo")
def egrpo(alpha: float = 0.3, format_weight: float = 0.1) -> Rubric:
    """E-GRPO partial credit: ``acc + (1 - acc) * alpha * entity_match`` + 0.1 fmt, with the
    entity match rate in ``ctx.metrics["entity_match"]`` (from ``entity_match_rate``)."""
    partial_credit(0.0, 0.0, alpha=alpha)

    def acc(ctx: RewardContext) -> float:
        return partial_credit(ctx.accuracy, ctx.metrics.get("entity_match", 0.0), alpha=alpha)

    return Rubric([RewardFn("accuracy", 1.0, acc), RewardFn("format", format_weight, _fmt01)])


@RUBRICS.register("checklist")
def checklist(weight: float = 1.0, accuracy_weight: float = 0.0, format_weight: float = 0.1) -> Rubric:
    """CM2-style checklist reward: ``weight * checklist + accuracy_weight * acc + 0.1 fmt``,
    the checklist score in ``ctx.metrics["checklist"]`` (from ``checklist_score``)."""
    terms = [RewardFn("checklist", weight, lambda ctx: _clip01(ctx.metrics.get("checklist", 0.0)))]
    if accuracy_weight:
        terms.append(RewardFn("accuracy", accuracy_weight, lambda ctx: float(ctx.accuracy)))
    terms.append(RewardFn("format", format_weight, _fmt01))
    return Rubric(terms)
