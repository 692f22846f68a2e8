"""Env worker pool: results match plain envs, shared-memory images, and fault recovery
(SIGKILL mid-step, a hanging env, a raising env) within the timeout."""

from __future__ import annotations

import functools
import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest

import mmgym  # noqa: F401
from mmgym.envs.pool import EnvError, LocalEnvPool, ProcessEnvPool, make_pool
from mmgym.envs.pool.chaos import make_chaos_env
from mmgym.envs.pool.worker import decode_obs, encode_obs

ENV = "mmgym/ChainOfFocus-v0"
KW = {"canvas": (256, 320)}


def chaos_fns(n: int) -> list:
    return [functools.partial(make_chaos_env, ENV, KW) for _ in range(n)]


def _oracle_rollout(pool, n: int, seed: int = 0) -> dict[int, list[float]]:
    """Run one episode per env with the oracle (asynchronously: submit as results arrive)."""
    rewards: dict[int, list[float]] = {i: [] for i in range(n)}
    for i in range(n):
        pool.submit_reset(i, seed=seed + i)
    live = set(range(n))
    while live:
        for i, r in pool.poll(timeout=5.0):
            if r.op == "reset" or (r.op == "step" and not r.done):
                if r.op == "step":
                    rewards[i].append(r.reward)
                pool.submit_call(i, "oracle_action")
            elif r.op == "call":
                pool.submit(i, r.value)
            else:
                rewards[i].append(r.reward)
                live.discard(i)
    return rewards


def test_shm_roundtrip_and_oversize_fallback() -> None:
    buf = bytearray(1 << 12)
    obs = {"text": "<image><image>", "images": (np.full((8, 8, 3), 7, np.uint8), np.ones((64, 64, 3), np.uint8)), "frames": ()}
    enc = encode_obs(obs, memoryview(buf), 0, 1 << 12)
    assert type(enc["images"][0]).__name__ == "ShmRef" and isinstance(enc["images"][1], np.ndarray)  # 12 KiB does not fit
    dec = decode_obs(enc, memoryview(buf))
    assert np.array_equal(dec["images"][0], obs["images"][0]) and np.array_equal(dec["images"][1], obs["images"][1])


def test_process_pool_matches_plain_envs() -> None:
    with ProcessEnvPool(env_id=ENV, num_envs=4, env_kwargs=KW, num_workers=2, step_timeout_s=20) as pool:
        assert len(set(pool.worker_pids)) == 2
        obs, info = pool.reset(3, seed=11)
        env = gym.make(ENV, **KW)
        ref_obs, ref_info = env.reset(seed=11)
        assert info["task_id"] == ref_info["task_id"]
        assert np.array_equal(obs["images"][0], ref_obs["images"][0])
        a = env.unwrapped.oracle_action()
        assert pool.call(3, "oracle_action") == a
        res = pool.step_many({3: a})[3]
        ref = env.step(a)
        assert res.reward == ref[1] and res.obs["text"] == ref[0]["text"]
        assert all(np.array_equal(x, y) for x, y in zip(res.obs["images"], ref[0]["images"]))
        rewards = _oracle_rollout(pool, 4)
        assert all(sum(r) > 0.9 for r in rewards.values())
        assert pool.events == []


def test_local_pool_same_interface() -> None:
    pool = make_pool("local", ENV, 2, env_kwargs=KW)
    rewards = _oracle_rollout(pool, 2)
    assert all(sum(r) > 0.9 for r in rewards.values())
    with pytest.raises(RuntimeError, match="no episode running"):
        pool.submit(0, "x")
    pool.close()


def test_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="env_id and num_envs"):
        ProcessEnvPool()
    with pytest.raises(ValueError, match="unknown pool backend 'gpu'"):
        make_pool("gpu", ENV, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error"):
        LocalEnvPool(env_id=ENV, num_envs=1, on_error="skip")  # type: ignore[arg-type]


def test_sigkill_hang_and_raise_are_recovered() -> None:
    """The issue's "done when": a worker SIGKILLed mid-step and a hanging env end their
    episodes with env_error within the bound, the rest of the batch finishes, the events are
    recorded, and the next rollout runs on fresh workers."""
    pool = ProcessEnvPool(chaos_fns(4), envs_per_worker=1, step_timeout_s=3.0, on_error="exclude")
    try:
        pool.reset_many(range(4), seed=0)
        pids = list(pool.worker_pids)
        pool.submit(0, "!sleep 30")  # killed mid-step below
        pool.submit(1, "!hang")
        pool.submit(2, "!raise")
        pool.submit(3, pool_oracle := "<tool_call>{\"name\": \"zoom\", \"arguments\": {\"bbox\": [0, 0, 64, 64]}}</tool_call>")
        time.sleep(0.5)
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        got = {}
        while len(got) < 4 and time.monotonic() - t0 < 15:
            got.update(dict(pool.poll(timeout=1.0)))
        assert time.monotonic() - t0 < 3.0 + 2.0  # within the step timeout (+ slack)
        for i in (0, 1, 2):
            assert got[i].info["termination_reason"] == "env_error" and got[i].truncated and not got[i].ok
        assert got[3].ok and got[3].info.get("termination_reason") is None and pool_oracle
        kinds = {(e["kind"], e["env"]) for e in pool.events}
        assert {("crash", 0), ("timeout", 1), ("env_raise", 2)} <= kinds
        assert all(e["step"] == 0 and e["op"] == "step" for e in pool.events)
        # next rollout: fresh workers for 0 and 1 (2's worker survived: the env was rebuilt)
        assert pool.worker_pids[0] != pids[0] and pool.worker_pids[1] != pids[1] and pool.worker_pids[2] == pids[2]
        rewards = _oracle_rollout(pool, 4, seed=100)
        assert all(sum(r) > 0.9 for r in rewards.values())
    finally:
        pool.close()


def test_retry_replays_the_episode_on_a_fresh_worker() -> None:
    pool = ProcessEnvPool(chaos_fns(2), num_workers=1, step_timeout_s=5.0, on_error="retry", max_retries=1)
    try:
        pool.reset_many(range(2), seed=5)
        first = pool.call(0, "oracle_action")
        r0 = pool.step_many({0: first})[0]
        assert r0.ok
        os.kill(pool.worker_pids[0], signal.SIGKILL)  # both envs lose their state
        res = pool.step_many({0: pool_answer(pool, 0), 1: "!raise"})
        assert res[0].ok and res[0].terminated and res[0].reward > 0.9  # replayed reset + zoom, then answered
        assert res[1].info["termination_reason"] == "env_error"  # raises again on replay: gives up after 1 retry
        assert [e["kind"] for e in pool.events].count("env_raise") == 1  # lost by the crash, raised on its one retry
        assert any(e["kind"] == "crash" for e in pool.events)
    finally:
        pool.close()


def pool_answer(pool, i: int) -> str:
    return pool.call(i, "oracle_action")  # with retry, a lost env is restored before the call


def test_lost_episode_excluded_and_blocking_call_raises() -> None:
    pool = ProcessEnvPool(chaos_fns(2), num_workers=1, step_timeout_s=5.0)
    try:
        pool.reset_many(range(2), seed=0)
        pool.submit(0, "!exit")
        res = dict(pool.poll(timeout=5.0))
        assert res[0].info["termination_reason"] == "env_error" and res[0].info["env_error"] == "crash"
        with pytest.raises(EnvError, match="lost"):
            pool.call(1, "oracle_action")  # env 1 shared the dead worker: its episode is gone
        obs, _ = pool.reset(1, seed=3)  # a new episode works
        assert obs["images"]
    finally:
        pool.close()


def test_broken_factory_fails_fast_with_traceback() -> None:
    with pytest.raises(Exception, match="could not build its envs"):
        ProcessEnvPool([functools.partial(make_chaos_env, "mmgym/NoSuchEnv-v0")], start_timeout_s=30)


def test_wait_for_an_env_with_nothing_in_flight_raises_instead_of_hanging() -> None:
    from mmgym.envs.pool import make_pool

    with make_pool("local", "mmgym/ChainOfFocus-v0", 2, env_kwargs={"canvas": (256, 320)}) as pool:
        pool.submit_reset(0, seed=1)
        got = pool.wait([0])
        assert list(got) == [0] and got[0].ok
        with pytest.raises(RuntimeError, match="nothing is in flight for envs \\[1\\]"):
            pool.wait([1])


def test_poll_linger_takes_replies_that_arrive_shortly_after_the_first() -> None:
    with ProcessEnvPool(chaos_fns(2), num_workers=2) as pool:
        pool.reset_many([0, 1], seed=0)
        pool.submit(0, "!sleep 0.0")
        pool.submit(1, "!sleep 0.3")
        first = pool.poll(timeout=10.0)
        assert [i for i, _ in first] == [0]  # without linger: what is there, at once
        pool.wait([1])
    with ProcessEnvPool(chaos_fns(2), num_workers=2) as pool:
        pool.reset_many([0, 1], seed=0)
        pool.submit(0, "!sleep 0.0")
        pool.submit(1, "!sleep 0.3")
        got = pool.poll(timeout=10.0, linger_s=2.0)
        assert sorted(i for i, _ in got) == [0, 1] and all(r.op == "step" for _, r in got)
        with pytest.raises(ValueError, match="linger_s"):
            pool.poll(linger_s=float("nan"))
    local = make_pool("local", ENV, 1, env_kwargs=KW)
    local.submit_reset(0, seed=0)
    t0 = time.monotonic()
    assert len(local.poll(timeout=1.0, linger_s=5.0)) == 1 and time.monotonic() - t0 < 2.0  # nothing in flight: no wait
    local.close()
