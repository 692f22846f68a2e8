"""RL rollouts through the env worker pool: the process backend plays the same episodes
as the in-process path, an env failure ends only its own episode (``env_error``), the
trainer config takes ``env.backend``, and one trainer iteration runs on worker processes."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import mmgym  # noqa: F401  (registers env ids)
from mmgym.agents import Conversation, RolloutCollector, ScriptedPolicy
from mmgym.agents.scripted import OracleAgent
from mmgym.envs.pool import ProcessEnvPool
from mmgym.envs.pool.chaos import make_chaos_env

ENV = "mmgym/ChainOfFocus-v0"
KW = {"canvas": (256, 320)}
SEEDS = [3, 11]
ZOOM = '<tool_call>{"name": "zoom", "arguments": {"bbox": [0, 0, 128, 128]}}</tool_call>'


def scripted(fault: Callable[[int, int], str | None] = lambda k, turn: None) -> ScriptedPolicy:
    """A policy that needs no env object: episode ``k`` (its slot in the first policy call)
    zooms first when ``k`` is even, then answers letter ``k % 4``; ``fault(k, turn)`` may
    replace a reply (a ``ChaosEnv`` command)."""
    counter = itertools.count()

    def act(conv: Conversation) -> str:
        k = conv.meta.setdefault("episode", next(counter))
        turn = int(conv.meta["obs"].get("turn", 0))
        bad = fault(k, turn)
        if bad is not None:
            return bad
        if turn == 0 and k % 2 == 0:
            return ZOOM
        return f"<answer>{'ABCD'[k % 4]}</answer>"

    return ScriptedPolicy(act)


def summary(trajs) -> list[tuple]:
    return [(t.task_id, t.group, t.success, t.score, t.termination_reason, t.error, t.info.get("final_text"),
             [(u.observation, u.action, u.reward, u.reward_terms, u.num_images, u.state_key) for u in t.turns]) for t in trajs]


def test_process_backend_matches_local_and_needs_an_env_id() -> None:
    local = RolloutCollector(ENV, num_tasks=2, group_size=2, env_kwargs=KW)
    ref = local.collect(scripted(), seeds=SEEDS)
    local.close()
    col = RolloutCollector(ENV, num_tasks=2, group_size=2, env_kwargs=KW, backend="process",
                           pool_kwargs={"num_workers": 2, "step_timeout_s": 30})
    try:
        assert isinstance(col.pool, ProcessEnvPool) and len(set(col.pool.worker_pids)) == 2
        got = col.collect(scripted(), seeds=SEEDS)
        assert summary(got) == summary(ref)
        assert {t.num_turns for t in got} == {1, 2} and col.stats["env_errors"] == 0 and col.pool.events == []
        for a, b in zip(got, ref):  # the images the agent saw came through shared memory intact
            for ua, ub in zip(a.turns, b.turns):
                assert len(ua.images) == len(ub.images) and all(np.array_equal(x, y) for x, y in zip(ua.images, ub.images))
        # fixed tasks (task_index) as evaluation uses them
        fixed = RolloutCollector(ENV, num_tasks=2, group_size=2, env_kwargs=KW)
        ref_fixed = fixed.collect(scripted(), task_indices=[0, 5])
        fixed.close()
        assert summary(col.collect(scripted(), task_indices=[0, 5])) == summary(ref_fixed)
        # agents that read the env object cannot run on a pool; the collector stays usable
        with pytest.raises(ValueError, match="backend='local'"):
            col.collect(ScriptedPolicy.from_agent(OracleAgent()), seeds=SEEDS)
        assert summary(col.collect(scripted(), seeds=SEEDS)) == summary(ref)
    finally:
        col.close()
    with pytest.raises(ValueError, match="env id"):
        RolloutCollector(lambda: None, num_tasks=1, group_size=2, backend="process")
    with pytest.raises(ValueError, match="known: local, process, ray"):
        RolloutCollector(ENV, backend="threads")


def test_env_that_raises_ends_only_its_episode() -> None:
    pool = ProcessEnvPool([functools.partial(make_chaos_env, ENV, KW) for _ in range(4)], num_workers=2, step_timeout_s=30)
    col = RolloutCollector(None, num_tasks=2, group_size=2, pool=pool)
    try:
        # episode 1 raises at its first step, episode 2 (a zoomer) at its second
        fault = {(1, 0): "!raise", (2, 1): "!raise"}
        trajs = col.collect(scripted(lambda k, turn: fault.get((k, turn))), seeds=SEEDS)
        reasons = [t.termination_reason for t in trajs]
        assert reasons[1] == reasons[2] == "env_error" and "env_error" not in (reasons[0], reasons[3])
        for k in (1, 2):
            t = trajs[k]
            assert t.error.startswith("env_raise") and t.info["env_error"] == "env_raise" and not t.success
            assert t.turns[-1].action == "!raise" and t.num_turns == k  # the failed step is recorded
        assert trajs[0].num_turns == 2 and trajs[0].error is None and "env_error" not in trajs[0].info
        assert col.stats["env_errors"] == 2 and [e["kind"] for e in pool.events] == ["env_raise", "env_raise"]
        # the raising envs were rebuilt: the next collect plays every episode to its end
        again = col.collect(scripted(), seeds=SEEDS)
        assert all(t.termination_reason != "env_error" and t.error is None for t in again)
    finally:
        col.close()


def test_demonstrations_need_the_in_process_env() -> None:
    from mmgym.trainer.common import DemonstrationPolicy

    conv = Conversation()
    conv.meta.update(env=None, obs={}, info={})
    with pytest.raises(ValueError, match="backend='local'"):
        DemonstrationPolicy(policy=None).generate([conv], None)  # type: ignore[arg-type]


def test_train_config_env_backend() -> None:
    from mmgym.core import load_config
    from mmgym.trainer import TrainConfig

    cfg = load_config(TrainConfig, overrides=["env.backend=process", "env.workers=2", "env.step_timeout_s=5"])
    assert (cfg.env.backend, cfg.env.workers, cfg.env.step_timeout_s, cfg.env.address) == ("process", 2, 5.0, None)
    assert load_config(TrainConfig).env.backend == "local"
    for bad, needle in [("env.backend=bogus", "choose one of: local, process, ray"), ("env.workers=0", "env.workers must be >= 1"),
                        ("env.workers=2", "env.backend=process"), ("env.address=auto", "needs env.backend=ray"),
                        ("env.step_timeout_s=0", "env.step_timeout_s must be > 0")]:
        with pytest.raises(ValueError, match=needle):
            load_config(TrainConfig, overrides=[bad] + (["env.backend=process"] if "step_timeout" in bad else []))


def test_one_rl_iteration_on_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmgym.agents import rollout
    from mmgym.core import load_config
    from mmgym.trainer import TrainConfig, train

    made: list[tuple] = []
    real = rollout.make_pool

    def spy(backend, env_id, n, **kw):
        made.append((backend, env_id, n, kw.get("num_workers"), kw.get("step_timeout_s")))
        return real(backend, env_id, n, **kw)

    monkeypatch.setattr(rollout, "make_pool", spy)
    cfg = load_config(TrainConfig, overrides=[
        f"out_root={tmp_path}", "run_name=run", "model.path=embedded:focus_warm", "iterations=1", "rollout.tasks_per_iter=2",
        "rollout.group_size=2", "rollout.max_new_tokens=24", "env.eval_episodes=1", "env.eval_every=0", "checkpoint_every=1",
        "sample_episodes=0", "algo.minibatch_size=4", "threads=1", "env.backend=process", "env.workers=2", "env.step_timeout_s=30",
    ])
    summary = train(cfg, progress=False)
    assert summary["run_dir"] == str(tmp_path / "run") and "eval/success" in summary
    assert made == [("process", ENV, 4, 2, 30.0)]  # RL only: evaluation stays local
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(rl) == 1 and rl[0]["step"] == 1 and rl[0]["env_errors"] == 0 and rl[0]["episodes"] == 4
    state = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1].joinpath("state.json").read_text())
    assert state["phase"] == "done" and state["iteration"] == 1
