"""Env worker pools: step many envs concurrently, recover from crashed, hung or raising envs.

>>> from mmgym.envs.pool import make_pool
>>> pool = make_pool("local", "mmgym/ChainOfFocus-v0", 2, env_kwargs={"canvas": (256, 320)})
>>> sorted(pool.reset_many([0, 1], seed=0))
[0, 1]
>>> pool.close()

``make_pool("process", ...)`` runs envs in worker processes (``ProcessEnvPool``);
``make_pool("ray", ...)`` in Ray actors that may span machines (extra ``ray``).
"""

from __future__ import annotations

from typing import Any, Literal

from mmgym.envs.pool.base import BasePool, EnvError, EnvPoolError, PoolResult, error_observation
from mmgym.envs.pool.local import LocalEnvPool
from mmgym.envs.pool.process import EnvPool, ProcessEnvPool
from mmgym.envs.pool.worker import env_factory

__all__ = ["BasePool", "EnvPool", "ProcessEnvPool", "LocalEnvPool", "PoolResult", "EnvError", "EnvPoolError", "error_observation", "env_factory", "make_pool", "BACKENDS"]

BACKENDS = ("local", "process", "ray")


def make_pool(backend: Literal["local", "process", "ray"], env_id: str, num_envs: int, **kwargs: Any) -> BasePool:
    """A pool of ``num_envs`` copies of ``env_id`` on ``backend``.

    ``kwargs`` go to the backend: ``env_kwargs`` (for ``gymnasium.make``), ``num_workers``,
    ``envs_per_worker``, ``step_timeout_s``, ``on_error``, ``max_retries``; for ``ray`` also
    ``address`` (``ray.init`` address; default: the running/local cluster) and ``ray_init``.
    """
    if backend == "local":
        return LocalEnvPool(env_id=env_id, num_envs=num_envs, **kwargs)
    if backend == "process":
        return ProcessEnvPool(env_id=env_id, num_envs=num_envs, **kwargs)
    if backend == "ray":
        from mmgym.envs.ray_pool import RayEnvPool

        return RayEnvPool(env_id=env_id, num_envs=num_envs, **kwargs)
    raise ValueError(f"unknown pool backend {backend!r}; known: {', '.join(BACKENDS)}")
