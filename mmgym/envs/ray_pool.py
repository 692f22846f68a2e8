"""``RayEnvPool``: the env pool interface over Ray actors, so envs can span machines.

Each actor holds an ``EnvHost`` with several envs and runs its requests in submission order
(Ray's ordering for tasks from one caller to a sync actor), so the pool's deadline logic is
the same as for processes. A dead actor (``RayActorError``) is replaced; an actor whose head
request runs past ``step_timeout_s`` is killed with ``ray.kill`` and replaced. Observations
travel through Ray's object store (numpy arrays are zero-copy there), not shared memory.

Ray is imported lazily; without it, ``RayEnvPool`` raises one ImportError naming the extra.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from mmgym.envs.pool.base import BasePool, OnError, _Request
from mmgym.envs.pool.process import resolve_factories, split_envs
from mmgym.envs.pool.worker import EnvHost

__all__ = ["RayEnvPool", "require_ray"]

log = logging.getLogger(__name__)
_ACTOR_CLS: Any = None


def require_ray() -> Any:
    """``import ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("the Ray env pool (envs.backend=ray) needs Ray; install it with: pip install 'mmgym[ray]'") from e
    return ray


class _EnvActor:
    """Actor body: an ``EnvHost`` (wrapped with ``ray.remote`` on first use)."""

    def __init__(self, factories: dict[int, Callable[[], Any]]):
        self.host = EnvHost(factories)

    def ready(self) -> int:
        return os.getpid()

    def handle(self, req_id: int, op: str, i: int, payload: Any) -> tuple[int, str, Any]:
        status, value = self.host.handle(op, i, payload)
        return req_id, status, value


def _actor_cls(ray: Any) -> Any:
    global _ACTOR_CLS
    if _ACTOR_CLS is None:
        _ACTOR_CLS = ray.remote(max_restarts=0, max_task_retries=0)(_EnvActor)
    return _ACTOR_CLS


class RayEnvPool(BasePool):
    """Envs in Ray actors; arguments as ``ProcessEnvPool`` plus:

    Args:
        address: ``ray.init(address=...)`` when Ray is not initialised yet (e.g.
            ``"ray://head:10001"`` or ``"auto"``); ``None`` starts/joins a local cluster.
        ray_init: extra keyword arguments for ``ray.init`` (e.g. ``{"num_cpus": 2}``).
        actor_options: ``.options(...)`` for every actor (default ``{"num_cpus": 1}``).
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Any]] | None = None,
        *,
        env_id: str | None = None,
        num_envs: int | None = None,
        env_kwargs: dict[str, Any] | None = None,
        num_workers: int | None = None,
        envs_per_worker: int | None = None,
        step_timeout_s: float = 60.0,
        reset_timeout_s: float | None = None,
        start_timeout_s: float = 120.0,
        on_error: OnError = "exclude",
        max_retries: int = 1,
        address: str | None = None,
        ray_init: dict[str, Any] | None = None,
        actor_options: dict[str, Any] | None = None,
        **_ignored: Any,
    ):
        self._ray = require_ray()
        self._fns = resolve_factories(env_fns, env_id, num_envs, env_kwargs)
        self._setup(split_envs(len(self._fns), num_workers, envs_per_worker), step_timeout_s=step_timeout_s, reset_timeout_s=reset_timeout_s, start_timeout_s=start_timeout_s, on_error=on_error, max_retries=max_retries)
        if not self._ray.is_initialized():
            self._ray.init(address=address, **(ray_init or {}))
        self._opts = dict(actor_options or {"num_cpus": 1})
        n = len(self.worker_envs)
        self._actors: list[Any] = [None] * n
        self._gen = [0] * n
        self._refs: dict[Any, tuple[int, int, int | None]] = {}  # ref -> (worker, generation, req_id or None for ready)
        self.worker_pids: list[int | None] = [None] * n
        try:
            for w in range(n):
                self._start(w)
            self._wait_all_ready(what="Ray actors", hint=f"; does the cluster have free CPUs for actor_options={self._opts}?")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ transport
    def _start(self, w: int) -> None:
        import time

        self._gen[w] += 1
        actor = _actor_cls(self._ray).options(**self._opts).remote({i: self._fns[i] for i in self.worker_envs[w]})
        self._actors[w] = actor
        self._refs[actor.ready.remote()] = (w, self._gen[w], None)
        self._started_at[w] = time.monotonic()

    def _send(self, w: int, req: _Request) -> None:
        ref = self._actors[w].handle.remote(req.req_id, req.op, req.env, req.payload)
        self._refs[ref] = (w, self._gen[w], req.req_id)

    def _recv(self, timeout: float) -> list[tuple[int, int | None, str, Any]]:
        if not self._refs:
            return []
        ray = self._ray
        refs = list(self._refs)
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        out: list[tuple[int, int | None, str, Any]] = []
        dead: set[int] = set()
        ready.sort(key=lambda r: -1 if self._refs.get(r, (0, 0, None))[2] is None else self._refs[r][2])  # an actor runs in order
        for ref in ready:
            w, gen, req_id = self._refs.pop(ref, (None, None, None))
            if w is None or gen != self._gen[w] or w in dead:
                continue  # a reply from an actor that was already replaced
            try:
                value = ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as e:
                dead.add(w)
                out.append((w, None, "dead" if self._ready_w[w] else "fatal", f"Ray actor died: {e}"))
                continue
            if req_id is None:
                self.worker_pids[w] = int(value)
                out.append((w, None, "ready", value))
            else:
                out.append((w, *value))
        return out

    def _kill(self, w: int) -> None:
        actor, self._actors[w] = self._actors[w], None
        self._refs = {r: v for r, v in self._refs.items() if v[0] != w}
        if actor is not None:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception as e:  # already dead
                log.debug("ray.kill(actor %d): %s", w, e)
