"""Tests of the MMedAgent-RL medical triage environments: the PettingZoo ``MedTriage``
env, its single-agent Gymnasium views, scripted specialists, the C-MARL curriculum and
the medical VQA loader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env, data_equivalence
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pettingzoo.test import api_test, parallel_api_test

import mmgym  # noqa: F401  (registers the ids)
from mmgym.envs.checker import check_mm_env
from mmgym.envs.datasets import DatasetError
from mmgym.envs.medtriage import env as aec_env
from mmgym.envs.medtriage import parallel_env
from mmgym.envs.medtriage_cases import SPECIALTIES, medvqa_rows, normalize_specialty, procedural_case, specialty_for, verify_case
from mmgym.envs.medtriage_common import ReferState, ReferTool, Team, role_system_prompt, routing_score
from mmgym.envs.medtriage_specialists import (
    CURRICULA,
    CurriculumSchedule,
    Opinion,
    ScriptedSpecialist,
    bucket_of,
    majority_attending,
    opinion_from_reply,
    plan_correctness,
    scripted_opinions,
)

VIEW_IDS = ("mmgym/MedTriage-Attending-v0", "mmgym/MedTriage-Triage-v0", "mmgym/MedTriage-TwoRole-v0")


def refer(*names: Any) -> str:
    return '<tool_call>{"name": "refer", "arguments": {"specialties": %s}}</tool_call>' % json.dumps(list(names))


def assert_obs_ok(env: Any, obs: dict) -> None:
    for agent, o in obs.items():
        assert env.observation_space(agent).contains(o), f"{agent}: observation outside its space"
        assert o["text"].count("<image>") == len(o["images"])
        assert len(o["frames"]) == len(o["frame_times"])


# ---------------------------------------------------------------------- hand-checked pieces
def test_routing_score_and_specialty_names() -> None:
    assert routing_score(["neuro"], "neuro") == 1.0
    assert routing_score(["chest", "neuro"], "neuro") == 0.5
    assert routing_score(["chest"], "neuro") == 0.0
    assert routing_score([], "neuro") == 0.0
    assert normalize_specialty("Specialist_Neuro") == "neuro"
    assert normalize_specialty("pulmonology") == "chest"
    assert normalize_specialty("dermatology") is None
    assert normalize_specialty(7) is None
    assert specialty_for("Lung", "X-Ray", "pathology") == "chest"
    assert specialty_for("", "", "pathology") == "pathology"
    assert specialty_for("ABD", "CT", "pathology") == "abdomen"


def test_refer_tool_bad_inputs_name_the_fix() -> None:
    tool = ReferTool(max_referrals=2)
    state = ReferState()
    res = tool(state, specialties=[])
    assert res.error and "referred nobody" in res.error and "neuro" in res.error
    res = tool(state, specialties=["dermatology"])
    assert res.error and "unknown specialty 'dermatology'" in res.error and "known: neuro" in res.error
    assert state.referred is None
    res = tool(state, specialties=["Neurology", "neuro"])
    assert res.error is None and state.referred == ["neuro"]
    assert "already referred" in (tool(state, specialties=["chest"]).error or "")


def test_majority_attending_and_buckets() -> None:
    text = (
        "[from specialist_neuro] Answer: B (cyst). Rationale: a.\n"
        "[from specialist_chest] Answer: A (mass). Rationale: b.\n"
        "[from specialist_abdomen] Answer: B (cyst). Rationale: c."
    )
    assert majority_attending(text) == "<answer>B</answer>"
    assert majority_attending("no opinions here") == "<answer>A</answer>"
    # a tie goes to the first-listed answer
    assert majority_attending(text.split("\n[from specialist_abdomen]")[0]) == "<answer>B</answer>"
    mk = lambda ok: Opinion("neuro", "A", "r", ok)  # noqa: E731
    assert bucket_of([mk(True), mk(True)]) == "correct"
    assert bucket_of([mk(True), mk(False)]) == "conflict"
    assert bucket_of([mk(False)]) == "wrong"
    assert bucket_of([]) == "none"


def test_plan_correctness_forces_buckets() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 4):
        for _ in range(20):
            mixed = plan_correctness(rng, [0.9] * n, "conflict")
            assert 0 < sum(mixed) < n
    assert plan_correctness(rng, [0.0] * 3, "correct") == [True] * 3
    assert plan_correctness(rng, [1.0] * 3, "wrong") == [False] * 3
    assert plan_correctness(rng, [1.0, 0.0], None) == [True, False]


def test_scripted_specialist_accuracy_inside_and_outside() -> None:
    rng = np.random.default_rng(1)
    case = procedural_case(rng, "c", question_types=("finding",), p_normal=0.0)
    inside = ScriptedSpecialist(case.specialty, accuracy=0.9)
    outside = ScriptedSpecialist(next(s for s in SPECIALTIES if s != case.specialty))
    assert inside.accuracy_on(case) == 0.9
    assert outside.accuracy_on(case) == pytest.approx(0.25)  # chance over 4 options
    hits = [scripted_opinions(case, [inside], rng, None)[0].correct for _ in range(400)]
    assert 0.85 <= np.mean(hits) <= 0.95
    ops = scripted_opinions(case, [inside, outside, inside], rng, "wrong", wrong_agreement=1.0)
    assert len({o.answer for o in ops}) == 1 and not any(o.correct for o in ops)
    with pytest.raises(ValueError, match="unknown specialty 'derm'"):
        ScriptedSpecialist("derm")


def test_curriculum_moves_from_easy_to_hard() -> None:
    sched = CURRICULA["easy_to_hard"]
    assert sched.weights(0.0) == (1.0, 0.0, 0.0)
    assert sched.weights(0.9)[2] > 0
    rng = np.random.default_rng(0)
    assert {sched.draw(rng, 0.0) for _ in range(50)} == {"correct"}
    assert "wrong" in {sched.draw(rng, 1.0) for _ in range(200)}
    assert CURRICULA["natural"].draw(rng, 0.5) is None
    with pytest.raises(ValueError, match="begin at 0.0"):
        CurriculumSchedule("bad", ((0.5, (1.0, 0.0, 0.0)),))
    team = Team.build(curriculum="easy_to_hard", curriculum_episodes=4)
    drawn = [team.next_bucket(rng, {}) for _ in range(8)]
    assert drawn[0] == "correct" and team.progress == 1.0
    with pytest.raises(ValueError, match="unknown curriculum 'hardest'"):
        Team.build(curriculum="hardest")


def test_opinion_from_reply() -> None:
    case = procedural_case(np.random.default_rng(3), "c", question_types=("side",), p_normal=0.0)
    op, err = opinion_from_reply("neuro", f"<answer>{case.answer_key}</answer> It is <image> there.", case)
    assert err is None and op.correct and "<image>" not in op.render()
    op, err = opinion_from_reply("neuro", refer("neuro"), case)
    assert op is None and "no tools" in err


# ---------------------------------------------------------------------- multi-agent env
def test_parallel_api_and_aec_api() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel_api_test(parallel_env(), num_cycles=20)
        parallel_api_test(parallel_env(specialists="agent"), num_cycles=20)
        api_test(aec_env(), num_cycles=20)


def _rollout(env: Any, seed: int, policy: Any, options: dict | None = None) -> list:
    obs, infos = env.reset(seed=seed, options=options)
    trace: list = [obs, json.dumps(infos, sort_keys=True, default=str)]
    assert_obs_ok(env, obs)
    while env.agents:
        obs, rew, term, trunc, infos = env.step(policy(env, obs))
        assert_obs_ok(env, obs)
        for a in obs:
            assert isinstance(term[a], bool) and isinstance(trunc[a], bool)
            assert rew[a] == pytest.approx(sum(infos[a]["reward_terms"].values()))
        trace.append((obs, rew, term, trunc, json.dumps(infos, sort_keys=True, default=str)))
    return trace


def _random_policy(env: Any, obs: dict) -> dict:
    return {a: env.action_space(a).sample() for a in env.agents}


def test_parallel_observations_in_space_and_seeded_determinism() -> None:
    for kwargs in ({}, {"specialists": "agent"}):
        env = parallel_env(**kwargs)
        oracle = lambda e, o: e.oracle_actions()  # noqa: E731
        assert data_equivalence(_rollout(env, 7, oracle), _rollout(env, 7, oracle))
        for a in env.possible_agents:
            env.action_space(a).seed(5)
        t1 = _rollout(env, 8, _random_policy)
        for a in env.possible_agents:
            env.action_space(a).seed(5)
        assert data_equivalence(t1, _rollout(env, 8, _random_policy))


def test_parallel_oracle_episode_hand_checked() -> None:
    env = parallel_env()
    obs, infos = env.reset(seed=3, options={"bucket": "wrong"})
    assert obs["triage"]["active"] == 1 and obs["attending"]["active"] == 0
    assert obs["triage"]["text"].startswith("<image>") and len(obs["triage"]["images"]) == 1
    assert obs["attending"]["text"] == "" and obs["attending"]["images"] == ()
    assert infos["triage"]["tool_schemas"][0]["function"]["name"] == "refer"
    assert "triage doctor" in infos["triage"]["system_prompt"]
    spec = env.case.specialty
    other = next(s for s in SPECIALTIES if s != spec)
    obs, rew, term, _, infos = env.step({"triage": refer(spec, other)})
    assert rew["triage"] == 0.5 and infos["triage"]["reward_terms"] == {"routing": 0.5}
    assert obs["attending"]["active"] == 1 and obs["triage"]["active"] == 0
    text = obs["attending"]["text"]
    assert text.count(f"[from specialist_{spec}]") == 1 and text.count(f"[from specialist_{other}]") == 1
    assert infos["attending"]["bucket"] == "wrong" and not any(term.values())
    # following the (all wrong) opinions fails, and the format term is still paid
    obs, rew, term, _, infos = env.step({"attending": majority_attending(text)})
    assert all(term.values()) and env.agents == []
    assert infos["attending"]["reward_terms"] == {"accuracy": 0.0, "format": pytest.approx(0.1)}
    assert infos["attending"]["termination_reason"] == "answer" and infos["triage"]["success"] is False
    assert infos["triage"]["metrics"]["routing"] == 0.5
    with pytest.raises(RuntimeError, match="call reset"):
        env.step({})


def test_parallel_bad_inputs_give_feedback_not_crashes() -> None:
    env = parallel_env(max_invalid=2)
    env.reset(seed=0, options={"bucket": "correct"})
    cases = [
        (refer("dermatology"), "unknown specialty 'dermatology'"),
        (refer(), "referred nobody"),
        ("<answer>A</answer>", "does not answer"),
    ]
    for action, needle in cases[:2]:
        obs, rew, term, _, infos = env.step({"triage": action, "attending": "<answer>A</answer>"})
        assert needle in infos["triage"]["parse_error"] and needle in obs["triage"]["text"]
        assert obs["triage"]["source"] == 2 and obs["triage"]["active"] == 1
        assert rew["triage"] == pytest.approx(-0.1)
        # the inactive attending's answer is ignored and recorded, not acted on
        assert infos["attending"]["ignored_action"] == "<answer>A</answer>" and rew["attending"] == 0.0
        assert not any(term.values())
    # third invalid reply exceeds max_invalid=2: the case goes to the attending unreferred
    obs, rew, _, _, infos = env.step({"triage": cases[2][0]})
    assert "does not answer" in infos["triage"]["parse_error"]
    assert obs["attending"]["active"] == 1 and "No specialist was consulted" in obs["attending"]["text"]
    assert infos["attending"]["bucket"] == "none"
    obs, rew, *_ = env.step({"attending": refer("neuro")})
    assert "has no tools" in obs["attending"]["text"] and rew["attending"] == pytest.approx(-0.1)
    env.step({"attending": "garbage"})
    obs, rew, term, _, infos = env.step({"attending": None})
    assert all(term.values()) and infos["attending"]["termination_reason"] == "max_invalid"
    assert rew["attending"] == pytest.approx(-0.1)


def test_agent_specialists_answer_through_the_api() -> None:
    env = parallel_env(specialists={"neuro": "agent", "chest": "agent"})
    env.reset(seed=0)
    while env.case.specialty != "neuro":
        env.reset()
    obs, _, _, _, infos = env.step({"triage": refer("neuro", "chest")})
    assert obs["specialist_neuro"]["active"] == 1 and obs["specialist_chest"]["active"] == 1
    assert obs["attending"]["active"] == 0 and len(obs["specialist_neuro"]["images"]) == 1
    key = env.case.answer_key
    obs, rew, _, _, infos = env.step({"specialist_neuro": f"<answer>{key}</answer> Clear on the image.", "specialist_chest": "no tags"})
    assert rew["specialist_neuro"] == 1.0 and rew["specialist_chest"] == pytest.approx(-0.1)
    assert obs["specialist_chest"]["active"] == 1 and obs["attending"]["active"] == 0
    obs, rew, _, _, infos = env.step({"specialist_chest": f"<answer>{key}</answer>"})
    assert obs["attending"]["active"] == 1 and "[from specialist_neuro] Answer: " in obs["attending"]["text"]
    assert infos["attending"]["bucket"] == "correct"


def test_policy_and_callable_specialists() -> None:
    class FakePolicy:
        def __init__(self) -> None:
            self.seen: list = []

        def generate(self, conversations: list, sampling: Any) -> list:
            self.seen.append(conversations[0])
            return [type("G", (), {"text": "<answer>Z</answer> looks so"})()]

    pol = FakePolicy()
    env = parallel_env(specialists={s: pol if s == "neuro" else (lambda obs: "bad reply") for s in SPECIALTIES})
    env.reset(seed=1)
    obs, *_ = env.step({"triage": refer("neuro", "chest")})
    conv = pol.seen[0]
    assert conv[0]["role"] == "system" and "neuro specialist" in conv[0]["content"]
    assert conv[1]["content"][0]["type"] == "image"
    text = obs["attending"]["text"]
    assert "[from specialist_neuro] Answer: Z" in text and "specialist_chest gave no valid opinion" in text
    with pytest.raises(TypeError, match="specialist 'neuro'"):
        parallel_env(specialists={"neuro": 42})
    with pytest.raises(ValueError, match="unknown specialties"):
        parallel_env(specialists={"derm": "scripted"})


# ---------------------------------------------------------------------- single-agent views
@pytest.mark.parametrize("env_id", VIEW_IDS)
def test_views_pass_check_env_and_check_mm_env(env_id: str) -> None:
    env = gym.make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env.unwrapped, skip_render_check=True)
    check_mm_env(env)


def _bucket_accuracy(env: Any, bucket: str, n: int, act: Any) -> float:
    scores = []
    for i in range(n):
        obs, info = env.reset(seed=i, options={"bucket": bucket})
        assert info["bucket"] == bucket
        _, _, term, _, info = env.step(act(env, obs))
        assert term
        scores.append(info["score"])
    return float(np.mean(scores))


def test_attending_view_majority_vs_oracle_per_bucket() -> None:
    env = gym.make("mmgym/MedTriage-Attending-v0").unwrapped
    majority = lambda e, o: majority_attending(o["text"])  # noqa: E731
    oracle = lambda e, o: e.oracle_action()  # noqa: E731
    assert _bucket_accuracy(env, "correct", 60, majority) == 1.0
    assert _bucket_accuracy(env, "wrong", 60, majority) == 0.0
    assert 0.2 < _bucket_accuracy(env, "conflict", 60, majority) < 0.8
    for b in ("correct", "conflict", "wrong"):
        assert _bucket_accuracy(env, b, 30, oracle) == 1.0


def test_attending_view_hand_checked() -> None:
    env = gym.make("mmgym/MedTriage-Attending-v0").unwrapped
    obs, info = env.reset(seed=0, options={"bucket": "conflict", "task_index": 4})
    assert info["role"] == "attending" and "attending physician" in info["system_prompt"]
    assert obs["text"].count("[from specialist_") == 3 and info["bucket"] == "conflict"
    obs2, info2 = env.reset(seed=99, options={"bucket": "conflict", "task_index": 4})
    assert obs2["text"] == obs["text"] and info2["task_id"] == "med-4"  # fixed task, independent of the seed
    obs, rew, term, trunc, info = env.step(refer("neuro"))
    assert not term and obs["source"] == 2 and rew == pytest.approx(-0.1) and "no tools" in obs["text"]
    obs, rew, term, trunc, info = env.step(env.oracle_action())
    assert term and rew == pytest.approx(1.1) and info["score"] == 1.0


def test_triage_view_rewards_and_bad_inputs() -> None:
    env = gym.make("mmgym/MedTriage-Triage-v0").unwrapped
    obs, info = env.reset(seed=5)
    assert info["tool_schemas"][0]["function"]["name"] == "refer" and info["role"] == "triage"
    spec = env.task.case.specialty
    obs, rew, term, _, info = env.step("<answer>A</answer>")
    assert not term and "does not answer" in obs["text"] and rew == pytest.approx(-0.1)
    obs, rew, term, _, info = env.step(refer("cardiology"))
    assert not term and "unknown specialty 'cardiology'" in obs["text"] and info["tool_errors"]
    other = next(s for s in SPECIALTIES if s != spec)
    obs, rew, term, _, info = env.step(refer(other, spec))
    assert term and info["termination_reason"] == "goal"
    assert info["reward_terms"] == {"accuracy": 0.5, "format": pytest.approx(0.1)}
    assert info["metrics"]["routing"] == 0.5 and info["metrics"]["team_accuracy"] in (0.0, 1.0)
    env.reset(seed=5)
    _, rew, term, _, info = env.step(env.oracle_action())
    assert term and rew == pytest.approx(1.1) and info["success"]


def test_two_role_env_alternates_and_names_the_role() -> None:
    env = gym.make("mmgym/MedTriage-TwoRole-v0").unwrapped
    roles = []
    for i in range(4):
        obs, info = env.reset(seed=0 if i == 0 else None)
        roles.append(info["role"])
        assert obs["text"].startswith(f"Role: {info['role']}.")
        assert info["system_prompt"] == role_system_prompt(info["role"])
        _, _, term, _, info = env.step(env.oracle_action())
        assert term and info["score"] == 1.0
    assert roles == ["triage", "attending", "triage", "attending"]
    _, info = env.reset(options={"role": "attending"})
    assert info["role"] == "attending"
    with pytest.raises(ValueError, match="options\\['role'\\]"):
        env.reset(options={"role": "nurse"})


def test_constructor_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="num_consulted"):
        gym.make("mmgym/MedTriage-Attending-v0", num_consulted=9)
    with pytest.raises(ValueError, match="single-agent views"):
        gym.make("mmgym/MedTriage-Attending-v0", specialists={"neuro": "agent"})
    with pytest.raises(ValueError, match="question_types"):
        parallel_env(question_types=("why",))
    env = gym.make("mmgym/MedTriage-Attending-v0").unwrapped
    with pytest.raises(ValueError, match="options\\['bucket'\\]"):
        env.reset(options={"bucket": "medium"})


# ---------------------------------------------------------------------- datasets
def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), shade, np.uint8)).save(path)


def test_slake_and_vqarad_layouts(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "xmlab1" / "source.jpg", 100)
    _png(tmp_path / "imgs" / "xmlab2" / "source.jpg", 150)
    (tmp_path / "imgs" / "xmlab3").mkdir()
    (tmp_path / "imgs" / "xmlab3" / "source.jpg").write_bytes(b"not an image")
    rows = [
        {"img_name": "xmlab1/source.jpg", "question": "Is the lung healthy?", "answer": "No", "q_lang": "en", "modality": "X-Ray", "location": "Lung", "answer_type": "CLOSED", "qid": 1},
        {"img_name": "xmlab2/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver", "q_lang": "en", "modality": "CT", "location": "Abdomen", "answer_type": "OPEN", "qid": 2},
        {"img_name": "xmlab2/source.jpg", "question": "哪个器官?", "answer": "肝", "q_lang": "zh", "modality": "CT", "location": "Abdomen", "answer_type": "OPEN", "qid": 3},
        {"img_name": "xmlab3/source.jpg", "question": "Corrupt?", "answer": "yes", "q_lang": "en", "qid": 4},
        {"img_name": "../../etc/passwd", "question": "Escape?", "answer": "yes", "q_lang": "en", "qid": 5},
        {"img_name": "xmlab1/source.jpg", "question": "Missing answer", "q_lang": "en", "qid": 6},
    ]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match="skipped 3 bad row"):
        parsed = medvqa_rows(tmp_path / "test.json")
    assert [(r.specialty, r.closed) for r in parsed] == [("chest", True), ("abdomen", False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("mmgym/MedTriage-Attending-v0", dataset=str(tmp_path / "test.json")).unwrapped
    assert env.num_tasks() == 2
    obs, info = env.reset(seed=0, options={"task_index": 1, "bucket": "wrong"})
    assert "Options" not in obs["text"] and "Liver" not in obs["text"].split("Specialist opinions")[1]
    _, rew, term, _, info = env.step("<answer>liver</answer>")
    assert term and info["score"] == 1.0
    obs, _ = env.reset(seed=0, options={"task_index": 0})
    assert "A. yes B. no" in obs["text"]
    assert verify_case(env.task.case, "B") == 1.0 and verify_case(env.task.case, "yes") == 0.0
    # VQA-RAD: image_name + image_organ, images in "VQA_RAD Image Folder", JSONL accepted
    _png(tmp_path / "rad" / "VQA_RAD Image Folder" / "synpic1.jpg", 80)
    (tmp_path / "rad" / "rows.jsonl").write_text(json.dumps({"image_name": "synpic1.jpg", "question": "Is this the brain?", "answer": "yes", "answer_type": "CLOSED", "image_organ": "HEAD"}) + "\n{bad json\n")
    with pytest.warns(UserWarning, match="skipped 1"):
        rad = medvqa_rows(tmp_path / "rad" / "rows.jsonl")
    assert rad[0].specialty == "neuro"
    with pytest.raises(DatasetError, match="does not exist"):
        medvqa_rows(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DatasetError, match="no valid row"):
        medvqa_rows(tmp_path / "empty.json")


# ---------------------------------------------------------------------- fuzzing
_FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<answer>", "</answer>", "<think>", "</think>", "<image>", "<video>",
    '{"name": "refer", "arguments": {"specialties": ["neuro"', '{"name": "refer", "arguments": {"specialties": []}}',
    '{"name": "refer", "arguments": {"specialties": [1e999, null, {"x": []}]}}', '{"name": "refer", "arguments": "[]"}',
    "99999999999999999999999", "-1e308", "NaN", "A", "yes", "[from specialist_neuro] Answer: A. Rationale: x.", "🙂", "\x00", "中文",
]
_TEXT = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=12).map("".join),
    st.builds(lambda names, cut: refer(*names)[:cut], st.lists(st.one_of(st.sampled_from([*SPECIALTIES, "x", ""]), st.integers(), st.floats()), max_size=5), st.integers(0, 200)),
    st.builds(lambda n: refer("neuro", "chest", "abdomen")[: n], st.integers(0, 120)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXT, min_size=1, max_size=6), seed=st.integers(0, 2**16), agent_mode=st.sampled_from(["scripted", "agent"]))
def test_fuzz_parallel_step_never_raises(texts: list[str], seed: int, agent_mode: str) -> None:
    env = _FUZZ_ENVS[agent_mode]
    obs, _ = env.reset(seed=seed)
    for i, text in enumerate(texts):
        if not env.agents:
            break
        actions = {a: (text if (len(a) + i) % 3 else texts[-1]) for a in env.agents}
        obs, rew, term, trunc, infos = env.step(actions)
        assert_obs_ok(env, obs)
        for a in obs:
            assert np.isfinite(rew[a]) and rew[a] == pytest.approx(sum(infos[a]["reward_terms"].values()))


_FUZZ_ENVS = {"scripted": parallel_env(), "agent": parallel_env(specialists="agent", max_invalid=1)}
_FUZZ_VIEWS = {i: gym.make(i) for i in VIEW_IDS}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXT, min_size=1, max_size=4), seed=st.integers(0, 2**16), env_id=st.sampled_from(VIEW_IDS))
def test_fuzz_views_step_never_raises(texts: list[str], seed: int, env_id: str) -> None:
    env = _FUZZ_VIEWS[env_id]
    env.reset(seed=seed)
    for text in texts:
        obs, rew, term, trunc, info = env.step(text)
        assert env.observation_space.contains(obs) and obs["text"].count("<image>") == len(obs["images"])
        assert isinstance(term, bool) and not (term and trunc)
        assert rew == pytest.approx(sum(info["reward_terms"].values()))
        if term or trunc:
            break
