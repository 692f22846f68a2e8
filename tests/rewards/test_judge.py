"""Judge and rubric rewards: rule judge, policy judge, batching, caching, failures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgym.rewards import (
    RUBRICS,
    Criterion,
    JudgeRequest,
    JudgeScorer,
    PolicyJudge,
    RewardContext,
    Rubric,
    RuleJudge,
    TaskRubric,
    Verdict,
    get_rubric,
    judge_reward_term,
    parse_verdict,
)

RUBRIC = TaskRubric(
    (
        Criterion("names_object", 2.0, "mentions the red cube", keywords=("red", "cube")),
        Criterion("correct", 1.0, "gives the reference answer"),
    )
)


def req(response: str, rubric: TaskRubric = RUBRIC, reference: str | None = "ball") -> JudgeRequest:
    return JudgeRequest(question="What is left of the cube?", response=response, rubric=rubric, reference=reference)


class Counting:
    """Wraps a judge and records each call's batch size."""

    def __init__(self, inner, score_range=(0.0, 1.0)):
        self.inner, self.calls, self.score_range = inner, [], score_range

    def judge(self, requests):
        self.calls.append(len(requests))
        return self.inner(requests) if callable(self.inner) else self.inner.judge(requests)


# --------------------------------------------------------------------------- hand-worked


def test_rule_judge_weighted_sum_by_hand():
    # names_object: 1 of 2 keywords ("red"; "cubes" is not "cube") -> 0.5; correct: "ball" found -> 1
    # reward = (2 * 0.5 + 1 * 1) / 3
    [res] = JudgeScorer(RuleJudge()).score([req("A red ball, not the cubes")])
    assert res.status == "ok" and res.reward == pytest.approx(2 / 3)
    assert res.scores == {"names_object": 0.5, "correct": 1.0}
    assert "1/2 keywords" in res.rationale


def test_custom_check_is_clipped():
    rubric = TaskRubric((Criterion("len", check=lambda r, ref: len(r) / 4.0),))
    assert JudgeScorer(RuleJudge()).score([req("abcdefgh", rubric)])[0].reward == 1.0
    assert JudgeScorer(RuleJudge()).score([req("ab", rubric)])[0].reward == 0.5


def test_policy_judge_prompt_parse_and_rescale():
    seen = []

    @dataclass
    class Gen:
        text: str

    class FakePolicy:
        def generate(self, conversations, sampling):
            seen.append((conversations, sampling))
            return [Gen('Sure. {"scores": {"names_object": 10, "correct": 5}, "rationale": "close {enough}"}') for _ in conversations]

    judge = PolicyJudge(FakePolicy(), "greedy", make_conversation=lambda s, u: {"system": s, "user": u})
    [res] = JudgeScorer(judge).score([req("a red cube")])
    # 0-10 scale -> [0, 1]: names_object 1.0, correct 0.5 -> (2 * 1 + 0.5) / 3
    assert res.status == "ok" and res.reward == pytest.approx(2.5 / 3) and res.rationale == "close {enough}"
    (convs, sampling), = seen
    assert sampling == "greedy"
    assert "names_object (weight 2)" in convs[0]["user"] and "Reference answer:\nball" in convs[0]["user"]
    assert '"scores"' in convs[0]["system"]


def test_parse_verdict_forms():
    names = ["a", "b"]
    assert parse_verdict('x {"scores": {"a": 1, "b": "2"}} y', names).scores == {"a": 1.0, "b": 2.0}
    assert parse_verdict('{"a": 3, "b": 4, "rationale": "ok"}', names).scores == {"a": 3.0, "b": 4.0}
    assert parse_verdict("a: 7/10\nb = 3\n", names).scores == {"a": 7.0, "b": 3.0}
    bad = parse_verdict('{"scores": {"a": 1}}', names)
    assert bad.error is not None and "['b']" in bad.error
    # the last complete object wins; an unbalanced brace is ignored
    assert parse_verdict('{"a": 0, "b": 0} then {"a": 1, "b": 1} {', names).scores == {"a": 1.0, "b": 1.0}


# --------------------------------------------------------------------------- batching and caching


def test_batches_dedupes_and_caches():
    judge = Counting(RuleJudge())
    scorer = JudgeScorer(judge, batch_size=2)
    reqs = [req(f"answer {i}") for i in range(5)] + [req("answer 0")]
    first = scorer.score(reqs)
    assert judge.calls == [2, 2, 1]  # 5 distinct requests, duplicate judged once
    assert first[0].reward == first[5].reward
    again = scorer.score(reqs[:2])
    assert judge.calls == [2, 2, 1] and [r.status for r in again] == ["cached", "cached"]
    # a different rubric or reference is a different verdict
    scorer.score([req("answer 0", reference="cube"), req("answer 0", TaskRubric((Criterion("x"),)))])
    assert judge.calls == [2, 2, 1, 2]
    m = scorer.metrics()
    assert m["judge_requests"] == 10 and m["judge_cache_hits"] == 2 and m["judge_calls"] == 4


def test_cache_is_bounded():
    judge = Counting(RuleJudge())
    scorer = JudgeScorer(judge, cache_size=2)
    scorer.score([req("a"), req("b"), req("c")])
    scorer.score([req("a")])  # evicted (least recently used)
    assert judge.calls == [3, 1]


# --------------------------------------------------------------------------- failures never crash


def _verdicts(scores):
    return lambda requests: [Verdict(dict(scores)) for _ in requests]


@pytest.mark.parametrize(
    "inner, status, counter",
    [
        (lambda requests: 1 / 0, "failed", "judge_failures"),
        (lambda requests: ["garbage"] * len(requests), "unparsable", "judge_unparsable"),
        (lambda requests: [Verdict({}, error="no json")] * len(requests), "unparsable", "judge_unparsable"),
        (_verdicts({"names_object": 1.5, "correct": 1.0}), "out_of_range", "judge_out_of_range"),
        (_verdicts({"names_object": float("nan"), "correct": 1.0}), "out_of_range", "judge_out_of_range"),
        (_verdicts({"names_object": "high", "correct": 1.0}), "out_of_range", "judge_out_of_range"),
        (lambda requests: [], "failed", "judge_failures"),
    ],
    ids=["raises", "garbage", "error", "above_range", "nan", "text", "wrong_length"],
)
def test_bad_judges_score_zero_and_are_counted(inner, status, counter):
    judge = Counting(inner)
    scorer = JudgeScorer(judge)
    res = scorer.score([req("x"), req("y")])
    assert [r.status for r in res] == [status, status] and [r.reward for r in res] == [0.0, 0.0]
    assert scorer.metrics()[counter] == 2
    scorer.score([req("x")])  # failures are not cached: the judge is asked again
    assert len(judge.calls) == 2


def test_timeout_scores_zero_and_is_counted():
    def slow(requests):
        time.sleep(0.5)
        return [Verdict({"names_object": 1.0, "correct": 1.0})] * len(requests)

    scorer = JudgeScorer(Counting(slow), timeout_s=0.05)
    start = time.perf_counter()
    [res] = scorer.score([req("x")])
    assert time.perf_counter() - start < 0.4
    assert res.status == "timeout" and res.reward == 0.0
    assert scorer.metrics()["judge_timeouts"] == 1 and scorer.metrics()["judge_failures"] == 1


def test_reward_term_in_a_rubric_never_raises():
    ok = judge_reward_term(JudgeScorer(RuleJudge()), lambda ctx: req(ctx.answer or ""), weight=2.0)
    broken = judge_reward_term(JudgeScorer(Counting(lambda r: 1 / 0)), lambda ctx: req("x"), name="judge2")
    skipped = judge_reward_term(JudgeScorer(RuleJudge()), lambda ctx: None, name="none")
    rubric = Rubric([ok, broken, skipped])
    scores = rubric.score(RewardContext(answer="red cube ball"))
    assert scores == {"rubric": pytest.approx(2.0), "judge2": 0.0, "none": 0.0}


def test_preset_reads_batch_scored_metric():
    assert "rubric_judge" in RUBRICS
    r = get_rubric("rubric_judge")
    assert r.total(RewardContext(format_ok=True, metrics={"rubric_score": 0.5})) == pytest.approx(0.6)


def test_rubric_validation_and_from_dicts():
    with pytest.raises(ValueError, match="unique"):
        TaskRubric((Criterion("a"), Criterion("a")))
    with pytest.raises(ValueError, match="sum to 0"):
        TaskRubric((Criterion("a", 0.0),))
    with pytest.raises(ValueError, match="weight must be"):
        Criterion("a", -1.0)
    r = TaskRubric.from_dicts([{"name": "a", "weight": 2, "keywords": ["x"]}, {"name": "b"}])
    assert r.combine({"a": 1.0, "b": 0.0}) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rubric item 0"):
        TaskRubric.from_dicts([{"weight": 1}])


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('{}":,ab 0123456789.\\-n\nel[]')) , max_size=60))
def test_parse_verdict_never_raises(text):
    v = parse_verdict(text, ["a", "b"])
    assert isinstance(v, Verdict)
    assert v.error is not None or set(v.scores) == {"a", "b"}


def test_scorer_rejects_bad_setup():
    with pytest.raises(TypeError, match="judge\\(requests\\)"):
        JudgeScorer(object())
    with pytest.raises(TypeError, match="generate"):
        PolicyJudge(object(), None, make_conversation=lambda s, u: None)
    json.dumps(RUBRIC.key())  # the cache key text is plain JSON
