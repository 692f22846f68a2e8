"""VLA action tokens, ``mmgym/PushBlock-v0`` and its scripted expert, process groups."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import mmgym  # noqa: F401
from mmgym.envs.checker import check_mm_env
from mmgym.envs.runner import GroupRunner
from mmgym.envs.scenes import PALETTE
from mmgym.envs.vla import FLOOR_RGB, TABLE_RGB, ActionTokenizer, PushBlockEnv, push_block_expert, reward_step_terms

TOK = ActionTokenizer()


# ---------------------------------------------------------------------- tokenizer
def test_bins_by_hand() -> None:
    # 256 bins of width 2/256 over [-1, 1]: -1 -> 0, 0 -> 128, 1 -> 255 (clipped), centres at -1 + (k + .5)/128
    assert TOK.to_bins(np.array([[-1.0, 0.0, 1.0, -0.999, 0.0078125, 5.0, -5.0]])).tolist() == [[0, 128, 255, 0, 129, 255, 0]]
    np.testing.assert_allclose(TOK.from_bins(np.array([0, 128, 255])), [-1 + 0.5 / 128, 0.5 / 128, 1 - 0.5 / 128], atol=1e-7)
    assert TOK.encode(np.zeros(7)) == "<act_128>" * 7
    assert len(TOK.vocab) == 256 and TOK.vocab[0] == "<act_0>" and TOK.vocab[-1] == "<act_255>"


def test_round_trip_error_is_below_half_a_bin() -> None:
    a = np.random.default_rng(0).uniform(-1, 1, size=(8, 7))
    dec, err = TOK.decode(TOK.format(a), 8)
    assert err is None and dec.shape == (8, 7)
    assert np.max(np.abs(dec - a)) <= TOK.bin_width / 2 + 1e-6


@pytest.mark.parametrize(
    "text, why",
    [
        ("<act_1>" * 55, "got 55 action tokens"),
        ("<act_1>" * 57, "got 57 action tokens"),
        ("<act_1>" * 55 + "<act_256>", "out of range"),
        ("<act_1>" * 55 + "<act_99999999999999>", "out of range"),
        ("<act_1>" * 28 + " move left " + "<act_1>" * 28, "unexpected text"),
        ("<action>" + "<act_1>" * 56 + "</action><action></action>", "exactly one"),
        ("<action>" + "<act_1>" * 56, "exactly one"),
        ("<act_-1>" + "<act_1>" * 55, "unexpected text"),
        ("", "got 0 action tokens"),
        (None, "must be text"),
    ],
)
def test_malformed_tokens_are_reported(text: object, why: str) -> None:
    acts, err = TOK.decode(text, 8)
    assert acts is None and why in err


def test_think_and_bare_tokens_are_accepted() -> None:
    body = "<act_0>" * 56
    for text in (body, f"<think>go left</think>\n<action>{body}</action>", f"  {body}\n"):
        acts, err = TOK.decode(text, 8)
        assert err is None and np.all(acts < -0.99)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("<>act_0123456789/ion x\n") + ["<act_", "<action>", "</action>", "<think>", "</think>", "<act_7>" * 7]), max_size=200).map("".join))
def test_decode_never_raises(text: str) -> None:
    acts, err = TOK.decode(text, 2)
    assert (acts is None) != (err is None)
    if acts is not None:
        assert acts.shape == (2, 7) and np.all(np.abs(acts) <= 1)


def test_reward_terms_by_hand() -> None:
    assert reward_step_terms("sparse", success=True, grasped=False, prev_grasped=False, needs_grasp=True) == {"success": 1.0}
    # RLinf: success only counts while grasping on grasp tasks
    t = reward_step_terms("shaped", success=True, grasped=False, prev_grasped=True, needs_grasp=True)
    assert t == {"grasp": 0.0, "consecutive_grasp": 0.0, "success": 0.0}
    t = reward_step_terms("shaped", success=False, grasped=True, prev_grasped=False, needs_grasp=True)
    assert t == {"grasp": 0.1, "consecutive_grasp": 0.0, "success": 0.0}


# ---------------------------------------------------------------------- PushBlock
@pytest.mark.parametrize("kwargs", [{}, {"action": "continuous"}, {"proprio": "key", "reward": "shaped_delta", "chunk_size": 1}, {"proprio": "text", "reward": "shaped"},
                                    {"layout": "aligned", "chunk_size": 4, "max_steps": 32},
                                    {"layout": "aligned", "chunk_size": 4, "max_steps": 32, "cameras": ["top", "wrist"]}])
def test_pushblock_passes_both_checkers(kwargs: dict) -> None:
    env = gym.make("mmgym/PushBlock-v0", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)
        check_env(env.unwrapped, skip_render_check=True)
    check_mm_env(env, oracle_steps=120)  # chunk_size=1 needs up to 96 turns


def test_expert_succeeds_through_the_text_path() -> None:
    env = gym.make("mmgym/PushBlock-v0")
    wins, n = 0, 60
    for ep in range(n):
        env.reset(seed=1000 + ep)
        done = False
        while not done:
            reply = push_block_expert(env)
            assert reply.startswith("<action>") and reply.count("<act_") == 56
            _, _, term, trunc, info = env.step(reply)
            done = term or trunc
        assert info["parse_error"] is None and info["num_invalid"] == 0
        wins += info["success"]
        if info["success"]:
            assert info["termination_reason"] == "goal" and 0 < info["episode_length"] <= 96
    assert wins / n >= 0.95


def test_aligned_layout_is_a_push_in_one_of_four_directions() -> None:
    env = PushBlockEnv(layout="aligned", chunk_size=4, max_steps=32)
    dirs, wins = set(), {"expert": 0, "straight": 0, "constant": 0}
    n = 80
    for ep in range(n):
        for policy in wins:
            env.reset(seed=ep)
            s = env.s
            assert s is not None and np.all(np.abs(s.block) <= 0.15 + 1e-9) and np.all(np.abs(s.goal) <= 0.15 + 1e-9)
            err = s.goal - s.block
            ax = int(abs(err[1]) > abs(err[0]))
            assert abs(err[1 - ax]) < 1e-12 and 0.08 <= abs(err[ax]) <= 0.2  # on one axis
            behind = s.block[ax] - s.ee[ax]
            assert np.sign(behind) == np.sign(err[ax]) and abs(s.ee[1 - ax] - s.block[1 - ax]) < 1e-12
            dirs.add((ax, float(np.sign(err[ax]))))
            a = np.zeros((4, 7))
            a[:, 6] = 1
            a[:, ax if policy == "straight" else 0] = np.sign(err[ax]) if policy == "straight" else 1.0
            done = False
            while not done:
                reply = push_block_expert(env) if policy == "expert" else TOK.format(a)
                _, _, term, trunc, info = env.step(reply)
                done = term or trunc
            wins[policy] += info["success"]
    assert len(dirs) == 4
    assert wins["expert"] == n and wins["straight"] == n  # pushing straight at the target is enough
    assert wins["constant"] / n < 0.45  # one fixed direction fits about a quarter of the tasks
    with pytest.raises(ValueError, match="layout"):
        PushBlockEnv(layout="maze")


def test_wrist_camera_follows_the_end_effector() -> None:
    env = PushBlockEnv(layout="aligned", chunk_size=4, max_steps=32, cameras=["wrist", "top"], image_size=64)
    obs, _ = env.reset(seed=3)
    assert len(obs["images"]) == 2 and obs["text"].endswith("<image> <image>")
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in obs["images"])
    wrist, top = obs["images"]
    assert env.s is not None
    centre = wrist[28:36, 28:36].reshape(-1, 3)
    assert (np.abs(centre.astype(int) - np.array(TABLE_RGB)).sum(-1) > 60).mean() > 0.5  # the end effector sits in the middle
    # the block lies next to the centre, on the side of the target, in both views
    d = env.s.goal - env.s.block
    ax = int(abs(d[1]) > abs(d[0]))
    shift = np.array([1.0, -1.0])  # image x right, rows down
    for im, centre_xy, span in ((wrist, env.s.ee[:2], env.wrist_span), (top, np.zeros(2), 0.4)):
        colour = np.array(PALETTE[env.s.color])
        ys, xs = np.nonzero(np.all(im == colour, -1))
        assert len(xs) > 0
        block_px = np.array([xs.mean(), ys.mean()]) + 0.5
        expect = ((env.s.block - centre_xy) * shift / span + 0.5) * 64
        assert np.allclose(block_px, expect, atol=1.5)
    # a far corner of the wrist view shows the floor when the end effector is near an edge
    env.s.ee[:2] = [0.19, 0.19]
    wrist = env._sim_images()[0]
    assert tuple(wrist[0, -1]) == FLOOR_RGB and tuple(wrist[-1, 0]) == TABLE_RGB
    # moving the end effector moves the wrist view, not the top view
    before = env._sim_images()
    env.s.ee[:2] = [0.0, 0.0]
    after = env._sim_images()
    assert not np.array_equal(before[0], after[0])


@pytest.mark.parametrize("kwargs", [{"cameras": []}, {"cameras": ["side"]}, {"wrist_span": 0.0}, {"cameras": "front"}])
def test_bad_camera_options_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="cameras|wrist_span"):
        PushBlockEnv(**kwargs)


def test_invalid_reply_holds_still_with_feedback_and_penalty() -> None:
    env = PushBlockEnv(max_invalid=1)
    obs0, _ = env.reset(seed=3)
    ee, block = env.s.ee.copy(), env.s.block.copy()
    obs, r, term, trunc, info = env.step("<act_1>" * 13 + "<image>")
    assert obs["source"] == 2 and "unexpected text" in obs["text"] and obs["text"].count("<image>") == len(obs["images"]) == 1
    assert r == pytest.approx(-0.1) and info["reward_terms"]["format"] == pytest.approx(-0.1)
    assert not term and not trunc and info["num_invalid"] == 1 and info["elapsed_steps"] == 8
    np.testing.assert_array_equal(env.s.ee, ee)
    np.testing.assert_array_equal(env.s.block, block)
    np.testing.assert_array_equal(obs["images"][0], obs0["images"][0])
    _, _, term, trunc, info = env.step("<act_999>" * 56)
    assert term and not trunc and info["termination_reason"] == "max_invalid" and info["success"] is False


def test_moves_follow_the_action_tokens() -> None:
    env = PushBlockEnv(chunk_size=1, max_steps=50)
    env.reset(seed=0)
    x0 = env.s.ee.copy()
    a = np.zeros(7)
    a[0] = 1.0 if x0[0] < 0 else -1.0
    env.step(TOK.format(a))
    assert env.s.ee[0] - x0[0] == pytest.approx(np.sign(a[0]) * 0.02 * (1 - 1 / 256), abs=1e-6)


def test_shaped_delta_telescopes_and_episode_ends_on_success() -> None:
    totals = {}
    for mode in ("shaped", "shaped_delta"):
        env = PushBlockEnv(reward=mode)
        env.reset(seed=11)
        sums: dict[str, float] = {}
        while True:
            _, r, term, trunc, info = env.step(env.oracle_action())
            assert r == pytest.approx(sum(info["reward_terms"].values()))
            for k, v in info["reward_terms"].items():
                sums[k] = sums.get(k, 0.0) + v
            if term or trunc:
                break
        assert term and info["success"] is True
        totals[mode] = sums
    assert totals["shaped_delta"]["success"] == pytest.approx(1.0)
    assert totals["shaped"]["success"] == pytest.approx(1.0)
    # pushing means many contact steps: shaped pays each, delta pays only the last level
    assert totals["shaped"]["grasp"] > 0.5
    assert totals["shaped_delta"]["grasp"] in (pytest.approx(0.0), pytest.approx(0.1))


def test_proprio_key_and_fixed_tasks() -> None:
    env = PushBlockEnv(proprio="key")
    o1, i1 = env.reset(options={"task_index": 5})
    o2, i2 = env.reset(seed=99, options={"task_index": 5})
    assert i1["task_id"] == i2["task_id"] == "pushblock-5"
    np.testing.assert_array_equal(o1["images"][0], o2["images"][0])
    assert o1["proprio"].shape == (4,) and o1["proprio"].dtype == np.float32
    assert env.observation_space.contains(o1)
    info_keys = set(i1)
    assert {"task_id", "tool_schemas", "max_turns", "instruction", "chunk_size"} <= info_keys


def test_group_runner_drives_pushblock_in_lock_step() -> None:
    runner = GroupRunner([gym.make("mmgym/PushBlock-v0") for _ in range(3)])
    obs, infos = runner.reset(seed=4)
    assert len({i["task_id"] for i in infos}) == 1
    while not runner.done:
        out = runner.step({i: push_block_expert(runner.envs[i]) for i in sorted(runner.active)})
    assert all(r.info["success"] for r in out.values())


def test_process_group_has_the_runner_interface() -> None:
    from mmgym.envs.maniskill import ProcessGroup

    group = ProcessGroup.from_id("mmgym/PushBlock-v0", 2, chunk_size=1, max_steps=4)
    try:
        obs, infos = group.reset(seed=2)
        assert len(obs) == 2 and infos[0]["task_id"] == infos[1]["task_id"]
        np.testing.assert_array_equal(obs[0]["images"][0], obs[1]["images"][0])
        hold = TOK.format(np.array([0, 0, 0, 0, 0, 0, 1.0]))
        out = group.step({0: hold, 1: "garbage"})
        assert out[0].info["parse_error"] is None and out[1].info["parse_error"] is not None
        with pytest.raises(ValueError, match="not active"):
            group.step({5: hold})
        while not group.done:
            out = group.step({i: hold for i in sorted(group.active)})
        assert all(r.info["termination_reason"] in ("max_turns", "max_invalid") for r in out.values())
    finally:
        group.close()
