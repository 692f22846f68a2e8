"""Weighted reward terms (a "rubric") and published presets.

A term is ``RewardFn(name, weight, fn)`` where ``fn(ctx: RewardContext) -> float``.
``Rubric.score(ctx)`` returns ``{name: weight * fn(ctx)}``; the env's reward is the sum
and the dict goes into ``info["reward_terms"]``, so every term is visible in logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mmgym.core import Registry

__all__ = ["RewardContext", "RewardFn", "Rubric", "RUBRICS", "get_rubric"]


@dataclass(slots=True)
class RewardContext:
    """Everything an outcome reward term may read at the end of an episode.

    ``accuracy`` is the env's verified correctness in [0, 1]; ``format_ok`` whether the
    final reply was well formed; ``tags_ok`` whether every reply had balanced tags;
    ``used_tool`` whether any tool returned a result; ``metrics`` holds env-specific
    values (e.g. ``crop_iou``, ``answer_tiou``, ``last_crop_tiou``).
    """

    answer: str | None = None
    accuracy: float = 0.0
    format_ok: bool = False
    tags_ok: bool = True
    used_tool: bool = False
    num_tool_calls: int = 0
    num_invalid: int = 0
    answer_chars: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class RewardFn:
    name: str
    weight: float
    fn: Callable[[RewardContext], float]


class Rubric:
    """A weighted sum of named terms that reports each term."""

    def __init__(self, terms: Iterable[RewardFn]):
        self.terms = tuple(terms)
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"rubric term names must be unique, got {names}")

    def score(self, ctx: RewardContext) -> dict[str, float]:
        return {t.name: float(t.weight) * float(t.fn(ctx)) for t in self.terms}

    def total(self, ctx: RewardContext) -> float:
        return float(sum(self.score(ctx).values()))

    def with_term(self, term: RewardFn) -> Rubric:
        return Rubric([*self.terms, term])

    def __repr__(self) -> str:
        return "Rubric(" + " + ".join(f"{t.weight:g}*{t.name}" for t in self.terms) + ")"


def _acc(ctx: RewardContext) -> float:
    return float(ctx.accuracy)


def _deepeyes_acc(ctx: RewardContext) -> float:
    # DeepEyes: accuracy is 0 for answers of 1000 characters or more.
    return 0.0 if ctx.answer_chars >= 1000 else float(ctx.accuracy)


def _deepeyes_fmt(ctx: RewardContext) -> float:
    return 0.0 if ctx.tags_ok else -1.0


def _deepeyes_tool(ctx: RewardContext) -> float:
    return 1.0 if ctx.used_tool and _deepeyes_acc(ctx) > 0.5 else 0.0


def _fmt01(ctx: RewardContext) -> float:
    return 1.0 if ctx.format_ok and ctx.tags_ok else 0.0


def _metric(name: str) -> Callable[[RewardContext], float]:
    def fn(ctx: RewardContext) -> float:
        return float(ctx.metrics.get(name, 0.0))

    fn.__name__ = f"metric_{name}"
    return fn


RUBRICS: Registry[Callable[..., Rubric]] = Registry("reward preset")


@RUBRICS.register("deepeyes")
def deepeyes() -> Rubric:
    """DeepEyes: ``0.8 acc + 0.2 fmt + 1.2 tool`` (fmt -1 on unbalanced tags; tool only if a crop and acc > 0.5)."""
    return Rubric([RewardFn("accuracy", 0.8, _deepeyes_acc), RewardFn("format", 0.2, _deepeyes_fmt), RewardFn("tool", 1.2, _deepeyes_tool)])


@RUBRICS.register("chain_of_focus")
def chain_of_focus() -> Rubric:
    """Chain-of-Focus: ``0.9 acc + 0.1 fmt`` (fmt 1 when the answer tags are paired and non-empty)."""
    return Rubric([RewardFn("accuracy", 0.9, _acc), RewardFn("format", 0.1, _fmt01)])


@RUBRICS.register("accuracy")
def accuracy_only() -> Rubric:
    """Plain verified accuracy plus a small format term: ``1.0 acc + 0.1 fmt``."""
    return Rubric([RewardFn("accuracy", 1.0, _acc), RewardFn("format", 0.1, _fmt01)])


@RUBRICS.register("longvt")
def longvt() -> Rubric:
    """LongVT: ``acc + fmt + IoU(last crop, gt span)``, weights 1/1/1."""
    return Rubric([RewardFn("accuracy", 1.0, _acc), RewardFn("format", 1.0, _fmt01), RewardFn("crop_tiou", 1.0, _metric("last_crop_tiou"))])


@RUBRICS.register("temporal")
def temporal() -> Rubric:
    """Accuracy, format and temporal IoU of the answer span (grounding questions)."""
    return Rubric([RewardFn("accuracy", 1.0, _acc), RewardFn("format", 0.1, _fmt01), RewardFn("answer_tiou", 1.0, _metric("answer_tiou"))])


def get_rubric(name: str, **kwargs: Any) -> Rubric:
    return RUBRICS.get(name)(**kwargs)
