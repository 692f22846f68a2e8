"""Tests of ``mmgym/AskToAct-v0`` (Ask-to-Act: "Grounding Multimodal LLMs to Embodied Agents
that Ask for Help with Reinforcement Learning"): hand-checked episodes, bad input, fuzzing
of ``step`` and of the user, seeded determinism, and the baselines' expected behaviour."""

from __future__ import annotations

import functools
import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmgym  # noqa: F401  (registers the ids)
from mmgym.envs.ask_to_act import BASELINES, AskToActEnv, always_ask, never_ask, play_episode
from mmgym.envs.ask_to_act_user import DONT_UNDERSTAND, RuleBasedUser, classify_question
from mmgym.envs.ask_to_act_world import AMBIGUITY_TYPES, KINDS, SIZES, Obj, generate_scene, minimal_kinds
from mmgym.envs.scenes import PALETTE

ENV_ID = "mmgym/AskToAct-v0"
EXPECTED_MIN = {"unambiguous": 0, "attribute": 1, "spatial": 1, "size": 1, "combination": 2}
TARGET = {"category": "cup", "color": "red", "size": "small", "room": "living room", "receptacle": "coffee table",
          "location": "living room coffee table", "goal": "kitchen counter"}


def call(name: str, **arguments: object) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@functools.lru_cache(maxsize=None)
def shared_env() -> AskToActEnv:
    return AskToActEnv()


def env_of(ambiguity: str, index: int = 0, **kwargs: object) -> AskToActEnv:
    env = AskToActEnv(ambiguity_types=(ambiguity,), **kwargs)
    env.reset(options={"task_index": index})
    return env


# ---------------------------------------------------------------- conformance
def test_registered_env_passes_gymnasium_and_mmgym_checkers() -> None:
    from mmgym.envs.checker import check_mm_env

    env = gym.make(ENV_ID)
    check_env(env.unwrapped, skip_render_check=True)
    check_mm_env(env)


def test_reset_observation_has_map_and_tool_schemas() -> None:
    env = gym.make(ENV_ID)
    obs, info = env.reset(seed=3)
    assert obs["text"].count("<image>") == 1 and obs["images"][0].shape == (224, 224, 3)
    assert {s["function"]["name"] for s in info["tool_schemas"]} == {"navigate", "pick", "place", "ask", "done"}
    assert "Bring me the" in obs["text"]


# ---------------------------------------------------------------- world
def test_minimal_kinds_hand_checked() -> None:
    a = Obj("obj_1", "cup", "red", "small", "r1", 0)
    b = Obj("obj_2", "cup", "red", "large", "r1", 1)
    c = Obj("obj_3", "cup", "blue", "small", "r1", 2)
    d = Obj("obj_4", "cup", "blue", "large", "r2", 3)
    assert minimal_kinds([a, b, c], a) == ("color", "size")
    assert minimal_kinds([a, b, c], c) == ("color",)
    assert minimal_kinds([a, d], a) == ("color",)  # the first kind that suffices
    assert minimal_kinds([a], a) == ()
    with pytest.raises(ValueError, match="cannot be singled out"):
        minimal_kinds([a, Obj("obj_9", "cup", "red", "small", "r1", 3)], a)


@pytest.mark.parametrize("ambiguity", AMBIGUITY_TYPES)
def test_generated_scenes_have_the_requested_ambiguity(ambiguity: str) -> None:
    for seed in range(25):
        s = generate_scene(np.random.default_rng(seed), ambiguity)
        cands = [s.objects[c] for c in s.candidates]
        assert s.target in s.candidates and len(s.min_kinds) == EXPECTED_MIN[ambiguity]
        assert all(o.category == s.category for o in cands)
        assert not any(o.category == s.category for o in s.objects.values() if o.oid not in s.candidates)
        assert all(o.receptacle != s.goal for o in cands)
        for kind in KINDS:  # only the varied kinds differ among candidates
            assert (len({o.value(kind) for o in cands}) > 1) == (kind in s.varied)
        slots = [(o.receptacle, o.slot) for o in s.objects.values()]
        assert len(slots) == len(set(slots))


# ---------------------------------------------------------------- hand-checked episodes
@pytest.mark.parametrize("ambiguity", AMBIGUITY_TYPES)
def test_oracle_asks_exactly_the_minimum_and_earns_one(ambiguity: str) -> None:
    env = AskToActEnv(ambiguity_types=(ambiguity,))
    for i in range(4):
        info = play_episode(env, BASELINES["oracle"], np.random.default_rng(0), options={"task_index": i})
        assert info["success"] and info["termination_reason"] == "goal"
        assert info["questions_asked"] == info["min_questions"] == EXPECTED_MIN[ambiguity]
        assert info["return"] == pytest.approx(1.0) and info["ambiguity"] == ambiguity


def test_always_ask_pays_for_each_extra_question() -> None:
    env = AskToActEnv(ambiguity_types=("attribute",), question_cost=0.25)
    info = play_episode(env, always_ask, np.random.default_rng(0), options={"task_index": 1})
    assert info["success"] and info["questions_asked"] == 3 and info["min_questions"] == 1
    assert info["return"] == pytest.approx(1.0 - 2 * 0.25)
    assert info["metrics"]["extra_questions"] == 2.0


def test_never_ask_wins_unambiguous_and_pays_for_wrong_picks() -> None:
    info = play_episode(AskToActEnv(ambiguity_types=("unambiguous",)), never_ask, np.random.default_rng(0), options={"task_index": 0})
    assert info["success"] and info["questions_asked"] == 0 and info["return"] == pytest.approx(1.0)
    env = env_of("attribute", 2)
    scene, st = env.task.scene, env._state
    wrong = next(c for c in scene.candidates if c != scene.target)
    env.step(call("navigate", receptacle=scene.objects[wrong].receptacle))
    _, r, *_ , info = env.step(call("pick", object_id=wrong))
    assert info["reward_terms"] == {"wrong_pick": -0.1} and r == pytest.approx(-0.1) and st.holding == wrong
    env.step(call("navigate", receptacle=scene.goal))
    env.step(call("place", receptacle=scene.goal))
    _, r, term, trunc, info = env.step(call("done"))
    assert term and not trunc and not info["success"] and info["termination_reason"] == "failure"
    assert info["wrong_picks"] == 1 and r == 0.0


def test_progress_reward_pays_each_subgoal_once() -> None:
    env = env_of("attribute", 2, progress_reward=0.2)
    scene = env.task.scene
    wrong = next(c for c in scene.candidates if c != scene.target)
    home, wrong_home = scene.objects[scene.target].receptacle, scene.objects[wrong].receptacle
    steps = []
    if wrong_home != home:  # a detour to the wrong candidate earns nothing
        steps.append((call("navigate", receptacle=wrong_home), {}))
    steps += [
        (call("navigate", receptacle=home), {"progress": 0.2}),
        (call("pick", object_id=scene.target), {"progress": 0.2}),
        (call("place", receptacle=home), {}),  # put back: nothing lost, nothing paid again
        (call("pick", object_id=scene.target), {}),
        (call("navigate", receptacle=scene.goal), {}),
        (call("place", receptacle=scene.goal), {"progress": 0.2}),
    ]
    for action, terms in steps:
        _, r, *_, info = env.step(action)
        assert info["reward_terms"] == terms, action
        assert r == pytest.approx(sum(terms.values()))
    _, r, term, _, info = env.step(call("done"))
    assert term and info["success"] and r == pytest.approx(1.0) and info["metrics"]["progress"] == 1.0
    # Off by default: the outcome only; the metric is still logged.
    env = env_of("attribute", 2)
    for action in (call("navigate", receptacle=home), call("pick", object_id=scene.target), call("done")):
        _, r, term, _, info = env.step(action)
        assert r == 0.0 and "progress" not in info["reward_terms"]
    assert term and not info["success"] and info["metrics"]["progress"] == pytest.approx(2 / 3)


def test_answer_tag_ends_the_episode_like_done() -> None:
    env = env_of("unambiguous")
    _, r, term, _, info = env.step("<answer>finished</answer>")
    assert term and info["termination_reason"] == "answer" and not info["success"] and r == 0.0


def test_step_cap_truncates() -> None:
    env = env_of("size", max_turns=2)
    env.step(call("ask", question="What size is it?"))
    _, _, term, trunc, info = env.step(call("ask", question="Where is it?"))
    assert trunc and not term and info["termination_reason"] == "max_turns" and info["questions_asked"] == 2


def test_navigate_shows_a_close_up_and_describe_objects_lists_attributes() -> None:
    env = env_of("size", 0, describe_objects=True, view_size=96)
    scene = env.task.scene
    target = scene.objects[scene.target]
    obs, *_ = env.step(call("navigate", receptacle=scene.receptacles[target.receptacle].index))  # by map number
    assert obs["images"][0].shape == (96, 96, 3) and obs["text"].count("<image>") == 1
    assert f"{target.oid} ({target.describe()})" in obs["text"]


def test_calls_after_done_in_the_same_turn_are_refused() -> None:
    env = env_of("unambiguous", max_calls_per_turn=2)
    obs, _, term, _, info = env.step(call("done") + call("navigate", receptacle=env.task.scene.goal))
    assert term and info["termination_reason"] == "failure" and "the episode is over" in obs["text"]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("question", ["", "   ", "x" * 10_000, "What is the weather like today?", "Which one do you want?"])
def test_bad_questions_are_not_understood_but_counted(question: str) -> None:
    env = env_of("unambiguous")
    obs, r, term, trunc, info = env.step(call("ask", question=question))
    assert DONT_UNDERSTAND in obs["text"] and not info["tool_errors"]
    assert info["questions_asked"] == 1 and info["reward_terms"] == {"question": -0.1}
    assert not (term or trunc) and len(obs["text"]) < 1000


@pytest.mark.parametrize(
    ("action", "expect"),
    [
        (call("pick", object_id="obj_1"), "not at a receptacle"),
        (call("place", receptacle="kitchen_counter"), "not holding anything"),
        (call("navigate", receptacle="the moon"), "unknown receptacle 'the moon'; use one of"),
        (call("pick", object_id=10**30), "not at a receptacle"),
        (call("done", now=True), "invalid arguments for 'done'"),
        (call("ask", question=7), "invalid arguments for 'ask'"),
        (call("fly", to="roof"), "unknown tool 'fly'"),
    ],
)
def test_bad_tool_calls_give_feedback(action: str, expect: str) -> None:
    env = env_of("attribute")
    obs, r, term, trunc, info = env.step(action)
    assert expect in obs["text"] and info["tool_errors"] and not (term or trunc)


def test_pick_and_place_feedback_name_the_fix() -> None:
    env = env_of("spatial", 1)
    scene = env.task.scene
    here_rec = scene.objects[scene.candidates[0]].receptacle
    elsewhere = next(c for c in scene.candidates if scene.objects[c].receptacle != here_rec)
    env.step(call("navigate", receptacle=here_rec))
    obs, *_, info = env.step(call("pick", object_id=elsewhere))
    assert f"{elsewhere} is not here" in obs["text"] and info["tool_errors"]
    obs, *_ = env.step(call("pick", object_id="obj_999"))
    assert "no object 'obj_999'" in obs["text"]
    env.step(call("pick", object_id=scene.candidates[0].upper().replace("_", " ")))  # "OBJ 3" resolves
    assert env._state.holding == scene.candidates[0]
    obs, *_ = env.step(call("pick", object_id=elsewhere))
    assert "already holding" in obs["text"]
    obs, *_ = env.step(call("place", receptacle=scene.goal))
    assert "navigate(receptacle=" in obs["text"] and env._state.holding == scene.candidates[0]


def test_malformed_replies_never_crash_and_end_after_budget() -> None:
    env = env_of("attribute")
    for i, text in enumerate(["", "<tool_call>{", "<answer>"]):
        obs, r, term, trunc, info = env.step(text)
        assert obs["source"] == 2 and info["parse_error"]
    assert term and info["termination_reason"] == "max_invalid" and not info["success"]


# ---------------------------------------------------------------- user
@pytest.mark.parametrize(
    ("question", "kind", "answer"),
    [
        ("What colour is it?", "color", "It is red."),
        ("Is it green?", "color", "No, it is not green; it is red."),
        ("Is it the small one?", "size", "Yes, it is the small one."),
        ("How big is the cup?", "size", "It is the small one."),
        ("Where is it?", "location", "It is on the coffee table in the living room."),
        ("Is it in the kitchen?", "location", "No, it is on the coffee table in the living room."),
        ("Where should I put it?", "goal", "Please put it on the kitchen counter."),
        ("Is the book red?", None, "I only need the cup, not a book."),
        ("What colour is the sky today?", None, DONT_UNDERSTAND),
    ],
)
def test_rule_based_user_hand_checked(question: str, kind: str | None, answer: str) -> None:
    assert classify_question(question, "cup") == kind
    assert RuleBasedUser()(question, TARGET) == answer


def test_pluggable_user_gets_the_target_description() -> None:
    seen: list[tuple[str, dict]] = []

    def user(question: str, target: dict) -> str:
        seen.append((question, target))
        return "ask me later"

    env = env_of("size", user=user)
    obs, *_ = env.step(call("ask", question="What size is it?"))
    assert "User: ask me later" in obs["text"] and seen[0][0] == "What size is it?"
    assert set(seen[0][1]) == set(TARGET) and seen[0][1]["size"] == env.task.scene.objects[env.task.scene.target].size
    env2 = env_of("size", user=lambda q, t: None)  # a broken user: no crash, no answer
    obs, *_ = env2.step(call("ask", question="What size is it?"))
    assert DONT_UNDERSTAND in obs["text"]
    with pytest.raises(TypeError, match="user must be a callable"):
        AskToActEnv(user="alice")


@settings(max_examples=300, deadline=None)
@given(question=st.text(max_size=600))
def test_user_fuzz_answers_are_strings_and_never_lie(question: str) -> None:
    answer = RuleBasedUser()(question, TARGET)
    kind = classify_question(question, "cup")
    assert isinstance(answer, str) and answer
    truth = {"color": "red", "size": "small", "location": "coffee table in the living room", "goal": "kitchen counter"}
    if kind is None:
        assert answer == DONT_UNDERSTAND or answer.startswith("I only need the cup, not a")
    else:
        assert truth[kind] in answer


@settings(max_examples=300, deadline=None)
@given(question=st.lists(st.sampled_from([*PALETTE, *SIZES, "it", "cup", "book", "where", "kitchen", "how big", "is", "the", "what", "?", "sky", "put"]), max_size=12).map(" ".join))
def test_user_fuzz_with_task_words(question: str) -> None:
    answer = RuleBasedUser()(question, TARGET)
    kind = classify_question(question, "cup")
    assert (answer == DONT_UNDERSTAND or answer.startswith("I only need")) == (kind is None)


# ---------------------------------------------------------------- fuzzing step
_names = st.sampled_from(["navigate", "pick", "place", "ask", "done", "Navigate", "zoom", ""])
_values = st.one_of(
    st.text(max_size=40), st.integers(min_value=-(10**30), max_value=10**30), st.floats(allow_nan=False), st.booleans(), st.none(),
    st.sampled_from(["kitchen_counter", "obj_1", "obj_2", "1", "What colour is it?", "bedroom bed", "x" * 3000]),
    st.lists(st.integers(), max_size=3),
)
_args = st.dictionaries(st.sampled_from(["receptacle", "object_id", "question", "extra"]), _values, max_size=3)
_call = st.builds(lambda n, a: call(n, **a), _names, _args)


def _mangle(s: str, cut: int, wrap: int) -> str:
    s = s[: max(0, len(s) - cut)] if cut else s
    return ["{}", "<tool_call>{}</tool_call>", "<answer><tool_call>{}</tool_call></answer>", "<think>{}</think>", "{}<image>"][wrap].format(s)


_action = st.one_of(
    _call,
    st.builds(_mangle, _call, st.integers(0, 30), st.integers(0, 4)),
    st.text(max_size=200),
    st.builds(lambda t: f"<answer>{t}</answer>", st.text(max_size=50)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), actions=st.lists(_action, min_size=1, max_size=4))
def test_step_fuzz_never_raises_and_keeps_the_contract(seed: int, actions: list[str]) -> None:
    env = shared_env()
    env.reset(seed=seed)
    for a in actions:
        obs, reward, term, trunc, info = env.step(a)
        assert type(term) is bool and type(trunc) is bool and not (term and trunc)
        assert obs["text"].count("<image>") == len(obs["images"]) and env.observation_space.contains(obs)
        assert reward == pytest.approx(sum(info["reward_terms"].values()))
        if term or trunc:
            assert {"success", "questions_asked", "min_questions", "ambiguity"} <= set(info)
            break


# ---------------------------------------------------------------- determinism, state keys
def test_seeded_determinism_and_fixed_tasks() -> None:
    e1, e2 = AskToActEnv(), AskToActEnv()
    o1, i1 = e1.reset(seed=11)
    o2, i2 = e2.reset(seed=11)
    assert o1["text"] == o2["text"] and np.array_equal(o1["images"][0], o2["images"][0]) and i1["task_id"] == i2["task_id"]
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    done = False
    while not done:
        s1, s2 = e1.step(never_ask(e1, rng1)), e2.step(never_ask(e2, rng2))
        assert s1[0]["text"] == s2[0]["text"] and s1[1:4] == s2[1:4] and s1[4]["state_key"] == s2[4]["state_key"]
        assert all(np.array_equal(a, b) for a, b in zip(s1[0]["images"], s2[0]["images"]))
        done = s1[2] or s1[3]
    a, _ = e1.reset(seed=1, options={"task_index": 7})
    b, _ = e2.reset(seed=99, options={"task_index": 7})
    assert a["text"] == b["text"] and np.array_equal(a["images"][0], b["images"][0])


def test_state_key_tracks_location_holding_and_facts_not_question_count() -> None:
    env = env_of("attribute", 3)
    k0 = env.state_key()
    env.step(call("ask", question="Is it about the weather?"))
    assert env.state_key() == k0  # a wasted question reveals nothing
    env.step(call("ask", question="What colour is it?"))
    k1 = env.state_key()
    assert k1 != k0
    env.step(call("navigate", receptacle=env.task.scene.objects[env.task.scene.target].receptacle))
    assert env.state_key() != k1


def test_constructor_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="ambiguity_types"):
        AskToActEnv(ambiguity_types=("colour",))
    with pytest.raises(ValueError, match="max_candidates"):
        AskToActEnv(max_candidates=2)
    with pytest.raises(ValueError, match="question_cost"):
        AskToActEnv(question_cost=float("nan"))
    with pytest.raises(ValueError, match="progress_reward"):
        AskToActEnv(progress_reward=-0.1)
    with pytest.raises(ValueError, match="view_size"):
        AskToActEnv(view_size=10)


# ---------------------------------------------------------------- baselines (small sample)
def test_baselines_on_sixty_tasks() -> None:
    env = AskToActEnv()
    res = {name: [play_episode(env, pol, np.random.default_rng(1), options={"task_index": i}) for i in range(60)] for name, pol in BASELINES.items()}
    assert all(r["success"] and r["questions_asked"] == r["min_questions"] for r in res["oracle"])
    assert all(r["success"] and r["questions_asked"] == 3 for r in res["always_ask"])
    amb = [r for r in res["never_ask"] if r["ambiguity"] != "unambiguous"]
    expected = np.mean([1.0 / r["num_candidates"] for r in amb])
    assert abs(np.mean([r["success"] for r in amb]) - expected) < 0.25
    assert all(r["success"] for r in res["never_ask"] if r["ambiguity"] == "unambiguous")


def test_describe_objects_lists_the_map_in_text_and_only_then() -> None:
    env = env_of("combination", 3, describe_objects=True)
    scene = env.task.scene
    prompt = env.task.prompt
    listing = prompt.split("On the map: ", 1)[1].split("\n", 1)[0]
    for o in scene.objects.values():  # every object, under its own receptacle
        seg = next(s for s in listing.rstrip(".").split("; ") if s.startswith(f"{o.receptacle}: "))
        assert f"{o.oid} ({o.describe()})" in seg
    assert "On the map:" not in env_of("combination", 3).task.prompt
