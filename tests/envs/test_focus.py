from __future__ import annotations

import json

import cv2
import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmgym  # noqa: F401
from mmgym.agents.episodes import run_episode
from mmgym.agents.scripted import FirstViewAgent, OracleAgent, RandomAgent
from mmgym.envs.datasets import DatasetError


def _success(env, agent, n, start=0):
    return float(np.mean([run_episode(env, agent, seed=start + i, keep_images=False).success for i in range(n)]))


@pytest.mark.parametrize("zoom", ["bbox", "region"])
def test_oracle_solves_and_first_view_does_not(zoom: str) -> None:
    env = gym.make("mmgym/ChainOfFocus-v0", zoom=zoom, question_types=("attribute",))
    assert _success(env, OracleAgent(), 40) == 1.0
    # answering from the first view alone: 4 options, generous template matching; well below the oracle
    assert _success(env, FirstViewAgent(), 60, start=500) < 0.5


def test_first_observation_contract() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0")
    obs, info = env.reset(seed=3)
    assert obs["text"].count("<image>") == 1 and max(obs["images"][0].shape[:2]) == 224
    assert info["tool_schemas"][0]["function"]["name"] == "zoom"
    task = env.unwrapped.task
    assert 1024 <= max(task.image.shape[:2]) <= 2048 and len(task.options) == 4


def test_invalid_output_budget_and_penalty() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0", max_invalid=1)
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step("garbage")
    assert obs["source"] == 2 and "Invalid reply" in obs["text"] and r == pytest.approx(-0.1) and not (term or trunc)
    obs, r, term, trunc, info = env.step("more garbage")
    assert term and info["termination_reason"] == "max_invalid" and info["success"] is False


def test_tool_error_is_an_observation() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0")
    env.reset(seed=0)
    obs, r, term, trunc, info = env.step('<tool_call>{"name": "zoom", "arguments": {"bbox": [5000, 5000, 6000, 6000]}}</tool_call>')
    assert obs["source"] == 1 and "outside the image" in obs["text"] and info["tool_errors"] and obs["images"] == ()


def test_max_turns_truncates() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0", max_turns=2)
    env.reset(seed=0)
    call = '<tool_call>{"name": "zoom", "arguments": {"bbox": [0, 0, 100, 100]}}</tool_call>'
    assert env.step(call)[3] is False
    _, _, term, trunc, info = env.step(call)
    assert trunc and not term and info["termination_reason"] == "max_turns"


def test_zoom_reward_is_paid_once_per_target() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0", zoom_reward=0.5, question_types=("attribute",))
    env.reset(seed=1)
    a = env.unwrapped.oracle_action()
    _, r1, *_ , info = env.step(a)
    assert info["reward_terms"] == {"zoom": 0.5}
    _, r2, *_ , info = env.step(a)
    assert info["reward_terms"].get("zoom", 0.0) == 0.0 and r2 == 0.0


def test_task_index_is_fixed_and_seed_independent() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0")
    o1, i1 = env.reset(seed=1, options={"task_index": 7})
    o2, i2 = env.reset(seed=2, options={"task_index": 7})
    assert i1["task_id"] == i2["task_id"] == "focus-7" and np.array_equal(o1["images"][0], o2["images"][0])
    with pytest.raises(ValueError, match="task_index"):
        env.reset(options={"task_index": -1})


def _vstar(tmp_path):
    root = tmp_path / "vstar"
    for sub in ("direct_attributes", "relative_position"):
        (root / sub).mkdir(parents=True)
    img = np.full((300, 400, 3), 90, np.uint8)
    cv2.rectangle(img, (100, 100), (120, 120), (0, 0, 255), -1)
    cv2.imwrite(str(root / "direct_attributes" / "a.png"), img)
    (root / "direct_attributes" / "a.json").write_text(json.dumps({"question": "What is the colour of the square?", "options": ["red", "blue", "green", "white"], "target_object": ["square"], "bbox": [[100, 100, 20, 20]]}))
    cv2.imwrite(str(root / "relative_position" / "b.png"), img)
    (root / "relative_position" / "b.json").write_text(json.dumps({"question": "Is the square left or right of the circle?", "options": ["left", "right"], "target_object": ["square", "circle"], "bbox": [[100, 100, 20, 20], [300, 100, 20, 20]]}))
    (root / "direct_attributes" / "missing.json").write_text(json.dumps({"question": "q", "options": ["a", "b"], "bbox": [0, 0, 5, 5]}))
    (root / "direct_attributes" / "corrupt.png").write_bytes(b"not a png")
    (root / "direct_attributes" / "corrupt.json").write_text(json.dumps({"question": "q", "options": ["a", "b"], "bbox": [0, 0, 5, 5]}))
    (root / "direct_attributes" / "badjson.json").write_text("{")
    return root


def test_vstar_loader_skips_bad_rows_and_shuffles(tmp_path) -> None:
    root = _vstar(tmp_path)
    with pytest.warns(UserWarning, match="skipped 3 bad row"):
        env = gym.make("mmgym/ChainOfFocus-v0", dataset=str(root))
    assert env.unwrapped.num_tasks() == 2
    correct_positions = set()
    for seed in range(20):
        env.reset(seed=seed, options={"task_index": 0})
        t = env.unwrapped.task
        assert t.options[t.correct] == "red"
        correct_positions.add(t.correct)
    assert len(correct_positions) > 1  # the first (correct) option was shuffled
    assert run_episode(env, OracleAgent(), seed=0, task_index=0).success
    assert run_episode(env, OracleAgent(), seed=0, task_index=1).success


def test_vstar_with_no_valid_row_is_one_error(tmp_path) -> None:
    root = tmp_path / "empty"
    (root / "direct_attributes").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no valid row"):
        gym.make("mmgym/ChainOfFocus-v0", dataset=str(root))
    with pytest.raises(DatasetError, match="does not exist"):
        gym.make("mmgym/ChainOfFocus-v0", dataset=str(tmp_path / "nope"))


def test_pixel_limit(tmp_path) -> None:
    root = _vstar(tmp_path)
    with pytest.raises(DatasetError):
        with pytest.warns(UserWarning):
            gym.make("mmgym/ChainOfFocus-v0", dataset=str(root), max_pixels=1000)


_tags = st.sampled_from(["<tool_call>", "</tool_call>", "<answer>", "</answer>", "{", "}", '"name": "zoom"', '"arguments": {"bbox": [',
                          '"region": ', "1e309", "-99999999999999999999", "NaN", "]}", ", ", "A", "中🙂", "<image>", "\n"])
_actions = st.lists(st.one_of(_tags, st.text(max_size=15)), max_size=25).map("".join)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_actions)
def test_step_fuzz_never_raises(action: str) -> None:
    env = _FUZZ_ENV
    if env.unwrapped._done or env.unwrapped.task is None:
        env.reset(seed=0)
    obs, r, term, trunc, info = env.step(action)
    assert obs["text"].count("<image>") == len(obs["images"]) and np.isfinite(r)


_FUZZ_ENV = gym.make("mmgym/ChainOfFocus-v0", canvas=(256, 320))


def test_random_agent_runs() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0")
    rs = [run_episode(env, RandomAgent(seed=i), seed=i, keep_images=False) for i in range(10)]
    assert all(t.termination_reason for t in rs)


def test_model_text_cannot_forge_image_placeholders() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0", canvas=(256, 320))
    env.reset(seed=0)
    for action in ('<tool_call>{"name": "<image><image>", "arguments": 3}</tool_call>',
                   '<tool_call>{"name": "<image>", "arguments": {}}</tool_call>'):
        obs, *_ = env.step(action)
        assert obs["text"].count("<image>") == len(obs["images"]) == 0


def test_stripes_have_equal_ink_and_distinct_zoomed_patterns() -> None:
    from mmgym.envs.scenes import STRIPES, draw_stripes

    tiles = {}
    for p in STRIPES:
        img = np.zeros((40, 40, 3), np.uint8)
        draw_stripes(img, p, 0, 0, 40, 40)
        tiles[p] = img[..., 0].astype(np.float32)
        assert abs(float((img[..., 0] < 100).mean()) - 0.5) < 0.06  # half dark whatever the orientation
    for a in STRIPES:
        for b in STRIPES:
            if a < b:
                assert np.abs(tiles[a] - tiles[b]).mean() > 40  # readable once large
    with pytest.raises(ValueError, match="unknown stripe pattern"):
        draw_stripes(np.zeros((8, 8, 3), np.uint8), "wavy", 0, 0, 8, 8)


@pytest.mark.parametrize("zoom", ["bbox", "region"])
def test_stripe_symbols_need_the_zoom(zoom: str) -> None:
    from mmgym.trainer.config import _default_env_kwargs

    kw = {**_default_env_kwargs(), "zoom": zoom}
    env = gym.make("mmgym/ChainOfFocus-v0", **kw)
    obs, _ = env.reset(seed=1)
    task = env.unwrapped.task
    assert "stripe pattern" in task.question and set(task.options) == {"horizontal", "vertical", "rising", "falling"}
    assert _success(env, OracleAgent(), 30) == 1.0
    # the generous first-view template matcher, told where the marker is, stays far below the oracle
    assert _success(env, FirstViewAgent(), 80, start=700) < 0.55
    with pytest.raises(ValueError, match="symbols"):
        gym.make("mmgym/ChainOfFocus-v0", symbols="emoji")


def test_relative_stripe_question_names_both_patterns() -> None:
    env = gym.make("mmgym/ChainOfFocus-v0", symbols="stripes", question_types=("relative",))
    env.reset(seed=2)
    q = env.unwrapped.task.question
    assert q.count(" stripes") == 2 and q.startswith("Where is the marker with the ")
    assert _success(env, OracleAgent(), 10) == 1.0
