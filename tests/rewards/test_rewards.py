from __future__ import annotations

import pytest

from mmgym.rewards import (RUBRICS, RewardContext, bbox_iou, choice_match, exact_match, format_score, get_rubric, numeric_match,
                           parse_number, parse_span, temporal_iou)


def test_choice_match() -> None:
    opts = ["red", "green", "blue", "yellow"]
    for a in ("B", "(B)", "b.", "B) green", "green", " Green "):
        assert choice_match(a, opts, 1) == 1.0, a
    for a in ("A", "B) red", "greenish", "", None, "E"):
        assert choice_match(a, opts, 1) == 0.0, a


def test_exact_and_numeric() -> None:
    assert exact_match("The  Cube!", "cube") == 1.0
    assert exact_match("cubes", "cube") == 0.0
    assert numeric_match("1,234.5 apples", 1234.5) == 1.0
    assert numeric_match("3.2", 3, abs_tol=0.25) == 1.0 and numeric_match("3.3", 3, abs_tol=0.25) == 0.0
    assert parse_number("no digits") is None and parse_number("x=-2e3") == -2000.0
    assert numeric_match("1e999", 1.0) == 0.0


def test_ious() -> None:
    assert bbox_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert bbox_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert bbox_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert temporal_iou([0, 4], [2, 6]) == pytest.approx(1 / 3)
    assert temporal_iou([5, 1], [0, 10]) == 0.0
    assert parse_span("from 12.5 to 17 s") == (12.5, 17.0) and parse_span("[3, 9]") == (3.0, 9.0)


def test_format_score() -> None:
    assert format_score("<answer>A</answer>") == 1.0
    assert format_score("<answer></answer>") == 0.0
    assert format_score("<answer>A") == 0.0
    assert format_score("<answer>A</answer>", require_think=True) == 0.0
    assert format_score("<think>x</think><answer>A</answer>", require_think=True) == 1.0


def test_deepeyes_preset_numbers() -> None:
    r = get_rubric("deepeyes")
    right_with_crop = RewardContext(answer="A", accuracy=1.0, tags_ok=True, used_tool=True, answer_chars=1)
    assert r.score(right_with_crop) == {"accuracy": 0.8, "format": 0.0, "tool": 1.2}
    wrong_with_crop = RewardContext(answer="B", accuracy=0.0, tags_ok=True, used_tool=True, answer_chars=1)
    assert r.total(wrong_with_crop) == 0.0
    right_no_crop_bad_tags = RewardContext(answer="A", accuracy=1.0, tags_ok=False, used_tool=False, answer_chars=1)
    assert r.total(right_no_crop_bad_tags) == pytest.approx(0.8 - 0.2)
    too_long = RewardContext(answer="A" * 1000, accuracy=1.0, tags_ok=True, used_tool=True, answer_chars=1000)
    assert r.total(too_long) == 0.0


def test_chain_of_focus_preset_numbers() -> None:
    r = get_rubric("chain_of_focus")
    assert r.score(RewardContext(accuracy=1.0, format_ok=True)) == {"accuracy": 0.9, "format": 0.1}
    assert r.total(RewardContext(accuracy=0.0, format_ok=False)) == 0.0
    assert {"deepeyes", "chain_of_focus", "longvt", "accuracy"} <= set(RUBRICS.names())
