"""The Ray env pool: same interface and fault recovery as the process pool, on a local
``ray.init(num_cpus=2)`` (token auth off, nothing written into the repository)."""

from __future__ import annotations

import functools
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'mmgym[ray]')")

import mmgym  # noqa: E402,F401
from mmgym.envs.pool import make_pool  # noqa: E402
from mmgym.envs.pool.chaos import make_chaos_env  # noqa: E402
from mmgym.envs.ray_pool import RayEnvPool  # noqa: E402

ENV = "mmgym/ChainOfFocus-v0"
KW = {"canvas": (256, 320)}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


def _episode(pool, i: int, seed: int) -> float:
    pool.reset(i, seed=seed)
    total = 0.0
    while True:
        r = pool.step_many({i: pool.call(i, "oracle_action")})[i]
        total += r.reward
        if r.done:
            return total


def test_ray_pool_runs_and_recovers(ray_cluster) -> None:
    fns = [functools.partial(make_chaos_env, ENV, KW) for _ in range(3)]
    pool = RayEnvPool(fns, envs_per_worker=1, step_timeout_s=4.0, actor_options={"num_cpus": 0.5})
    try:
        assert _episode(pool, 0, seed=1) > 0.9
        pool.reset_many(range(3), seed=0)
        pids = list(pool.worker_pids)
        pool.submit(0, "!hang")
        pool.submit(1, "!sleep 30")
        pool.submit(2, "!raise")
        time.sleep(1.0)
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        got: dict = {}
        while len(got) < 3 and time.monotonic() - t0 < 20:
            got.update(dict(pool.poll(timeout=1.0)))
        assert time.monotonic() - t0 < 4.0 + 3.0
        assert all(got[i].info["termination_reason"] == "env_error" for i in range(3))
        kinds = {(e["kind"], e["env"]) for e in pool.events}
        assert {("timeout", 0), ("crash", 1), ("env_raise", 2)} <= kinds
        assert all(_episode(pool, i, seed=10 + i) > 0.9 for i in range(3))  # fresh actors
        assert pool.worker_pids[0] != pids[0] and pool.worker_pids[1] != pids[1]
    finally:
        pool.close()


def test_make_pool_ray_backend(ray_cluster) -> None:
    pool = make_pool("ray", ENV, 2, env_kwargs=KW, num_workers=1, actor_options={"num_cpus": 0.5})
    try:
        res = pool.reset_many([0, 1], seed=3)
        assert all(r.ok and r.obs["images"][0].ndim == 3 for r in res.values())
    finally:
        pool.close()


def test_missing_ray_names_the_extra(monkeypatch) -> None:
    import builtins

    from mmgym.envs import ray_pool

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"pip install 'mmgym\[ray\]'"):
        ray_pool.require_ray()
