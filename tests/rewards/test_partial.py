"""Partial-credit rewards: entity/attribute match (E-GRPO) and checklists (CM2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgym.rewards import (
    RUBRICS,
    ChecklistItem,
    RewardContext,
    Rubric,
    attribute_match_rate,
    attribute_match_term,
    checklist_score,
    checklist_term,
    entity_match_rate,
    entity_match_term,
    get_rubric,
    partial_credit,
    text_checklist,
)


def test_entity_match_by_hand():
    ents = ["red cube", ("sphere", "ball"), "table"]
    assert entity_match_rate("The RED cube is left of the ball.", ents) == pytest.approx(2 / 3)
    assert entity_match_rate("redder cubes", ["red", "cube"]) == 0.0  # whole words only
    assert entity_match_rate(None, ents) == 0.0
    assert entity_match_rate("anything", []) == 0.0


def test_attribute_match_by_hand():
    gold = {"color": "red", "shape": "ball", "count": 3}
    assert attribute_match_rate({"color": "Red.", "shape": "cube", "count": 3.0}, gold) == pytest.approx(2 / 3)
    assert attribute_match_rate("a red ball", gold) == pytest.approx(2 / 3)
    assert attribute_match_rate(None, gold) == 0.0 and attribute_match_rate({"a": 1}, {}) == 0.0
    assert attribute_match_rate(["not", "a", "dict"], gold) == 0.0


def test_partial_credit_by_hand():
    assert partial_credit(1.0, 0.0, alpha=0.3) == 1.0
    assert partial_credit(0.0, 0.5, alpha=0.4) == pytest.approx(0.2)
    assert partial_credit(0.5, 1.0, alpha=0.4) == pytest.approx(0.7)
    assert partial_credit(float("nan"), 2.0, alpha=0.5) == 0.5  # clipped inputs
    with pytest.raises(ValueError, match="alpha must lie in"):
        partial_credit(0.0, 0.0, alpha=1.5)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.one_of(st.floats(-1, 2), st.just(float("nan"))), st.floats(0, 1))
def test_wrong_answer_never_beats_right_one(m1, m2, alpha):
    wrong = partial_credit(0.0, m2, alpha=alpha)
    assert 0.0 <= wrong <= alpha <= 1.0 == partial_credit(1.0, m1, alpha=alpha)


def test_checklist_by_hand():
    items = [
        ChecklistItem("answered", lambda ctx: ctx.answer is not None, 2.0),
        ChecklistItem("used_tool", lambda ctx: ctx.used_tool, 1.0),
        ChecklistItem("half", lambda ctx: 0.5, 1.0),
        ChecklistItem("over", lambda ctx: 3.0, 0.0),  # weight 0: ignored, and would be clipped
    ]
    assert checklist_score(items, RewardContext(answer="x")) == pytest.approx((2 + 0 + 0.5) / 4)
    assert checklist_score([], RewardContext()) == 0.0
    phr = text_checklist(["red cube", "left"], weights=[3.0, 1.0])
    assert checklist_score(phr, RewardContext(answer="The red cube.")) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 phrases but 1 weights"):
        text_checklist(["a", "b"], weights=[1.0])


def test_terms_in_rubrics_and_presets():
    rubric = Rubric(
        [
            entity_match_term(["red cube", "ball"], alpha=0.5),
            attribute_match_term({"color": "red"}, alpha=0.5, name="attrs"),
            checklist_term(text_checklist(["cube"]), weight=0.5),
        ]
    )
    s = rubric.score(RewardContext(answer="a red cube", accuracy=0.0))
    assert s == {"accuracy": pytest.approx(0.25), "attrs": pytest.approx(0.5), "checklist": pytest.approx(0.5)}
    assert {"egrpo", "checklist"} <= set(RUBRICS.names())
    eg = get_rubric("egrpo", alpha=0.4)
    ctx = RewardContext(accuracy=0.0, format_ok=True, metrics={"entity_match": 0.5})
    assert eg.score(ctx) == {"accuracy": pytest.approx(0.2), "format": pytest.approx(0.1)}
    cl = get_rubric("checklist", accuracy_weight=1.0)
    assert cl.total(RewardContext(accuracy=1.0, metrics={"checklist": 0.25})) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="alpha"):
        entity_match_term(["x"], alpha=-0.1)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=40)), st.lists(st.text(max_size=8), max_size=4))
def test_match_rates_never_raise(text, ents):
    r = entity_match_rate(text, ents)
    assert 0.0 <= r <= 1.0
    a = attribute_match_rate(text, {str(i): e for i, e in enumerate(ents)})
    assert 0.0 <= a <= 1.0
