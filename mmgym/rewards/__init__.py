"""mmgym.rewards: pure verifiers and weighted reward rubrics."""

from mmgym.rewards.rubric import RUBRICS, RewardContext, RewardFn, Rubric, get_rubric
from mmgym.rewards.verifiers import (
    LETTERS,
    bbox_iou,
    choice_match,
    exact_match,
    format_score,
    normalize_text,
    numeric_match,
    parse_choice,
    parse_number,
    parse_span,
    temporal_iou,
)

__all__ = [
    "LETTERS",
    "RUBRICS",
    "RewardContext",
    "RewardFn",
    "Rubric",
    "bbox_iou",
    "choice_match",
    "exact_match",
    "format_score",
    "get_rubric",
    "normalize_text",
    "numeric_match",
    "parse_choice",
    "parse_number",
    "parse_span",
    "temporal_iou",
]
