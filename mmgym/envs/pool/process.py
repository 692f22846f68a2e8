"""``ProcessEnvPool`` (``EnvPool``): envs in worker processes, several envs per worker.

Requests go to each worker through its own ``multiprocessing.Queue`` (``put`` never blocks);
replies come back on a pipe per worker, waited on together with the workers' process
sentinels (``multiprocessing.connection.wait``), so a worker that dies is noticed at once.
Image arrays come back through one shared-memory block per worker (see ``worker.py``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection, shared_memory
from typing import Any, Literal

from mmgym.envs.pool.base import BasePool, OnError, _Request
from mmgym.envs.pool.worker import decode_obs, env_factory, worker_main

__all__ = ["ProcessEnvPool", "EnvPool", "split_envs", "resolve_factories"]

log = logging.getLogger(__name__)


def split_envs(num_envs: int, num_workers: int | None, envs_per_worker: int | None) -> list[list[int]]:
    """Contiguous blocks of env indices, one per worker."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if envs_per_worker is None:
        workers = num_workers or min(num_envs, os.cpu_count() or 1)
        if workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        envs_per_worker = -(-num_envs // workers)
    if envs_per_worker < 1:
        raise ValueError(f"envs_per_worker must be >= 1, got {envs_per_worker}")
    return [list(range(s, min(s + envs_per_worker, num_envs))) for s in range(0, num_envs, envs_per_worker)]


def resolve_factories(env_fns: Sequence[Callable[[], Any]] | None, env_id: str | None, num_envs: int | None, env_kwargs: dict[str, Any] | None) -> list[Callable[[], Any]]:
    """``env_fns`` as given, or ``num_envs`` picklable ``gym.make(env_id, **env_kwargs)`` factories."""
    if env_fns is not None:
        if env_id is not None:
            raise ValueError("give either env_fns or env_id (+ num_envs, env_kwargs), not both")
        fns = list(env_fns)
        if not fns:
            raise ValueError("env_fns is empty; give at least one env factory")
        return fns
    if env_id is None or not num_envs:
        raise ValueError("a pool needs env_fns, or env_id and num_envs (e.g. EnvPool(env_id='mmgym/ChainOfFocus-v0', num_envs=8))")
    return [env_factory(env_id, env_kwargs) for _ in range(int(num_envs))]


class ProcessEnvPool(BasePool):
    """Envs in ``spawn``-started worker processes; see ``BasePool`` for the API and faults.

    Args:
        env_fns: picklable zero-argument env factories (one per env), or
        env_id, num_envs, env_kwargs: build ``num_envs`` envs with ``gymnasium.make``.
        num_workers / envs_per_worker: how envs are split over processes (default: one
            worker per CPU core). ManiSkill's one-sim-per-process: ``envs_per_worker=1``.
        step_timeout_s: bound on one step (or call) inside a worker; reset_timeout_s on reset.
        start_timeout_s: bound on a worker building its envs.
        on_error: ``"exclude"`` ends a failed episode with ``env_error``; ``"retry"`` replays it.
        max_retries: retries per failed request with ``on_error="retry"``.
        shm_slot_bytes: shared memory per env for observation images (0 disables it;
            images that do not fit are pickled).
        start_method: ``"spawn"`` (default) or ``"forkserver"``; never ``fork`` (torch).
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
        shm_slot_bytes: int = 4 << 20,
        start_method: Literal["spawn", "forkserver"] = "spawn",
    ):
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver' (fork is unsafe once torch is imported), got {start_method!r}")
        self._fns = resolve_factories(env_fns, env_id, num_envs, env_kwargs)
        self._setup(
            split_envs(len(self._fns), num_workers, envs_per_worker),
            step_timeout_s=step_timeout_s,
            reset_timeout_s=reset_timeout_s,
            start_timeout_s=start_timeout_s,
            on_error=on_error,
            max_retries=max_retries,
        )
        self._ctx = mp.get_context(start_method)
        self._slot_bytes = int(shm_slot_bytes)
        n = len(self.worker_envs)
        self._procs: list[Any] = [None] * n
        self._conns: list[Any] = [None] * n
        self._queues: list[Any] = [None] * n
        self._shms: list[shared_memory.SharedMemory | None] = [None] * n
        self.worker_pids: list[int | None] = [None] * n
        try:
            for w in range(n):
                if self._slot_bytes > 0:
                    self._shms[w] = shared_memory.SharedMemory(create=True, size=self._slot_bytes * len(self.worker_envs[w]))
                self._start(w)
            self._wait_all_ready()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ transport
    def _start(self, w: int) -> None:
        parent, child = self._ctx.Pipe(duplex=False)
        queue = self._ctx.Queue()
        envs = self.worker_envs[w]
        shm = self._shms[w]
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, queue, {i: self._fns[i] for i in envs}, shm.name if shm else None, self._slot_bytes, {i: k for k, i in enumerate(envs)}),
            name=f"mmgym-env-worker-{w}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._procs[w], self._conns[w], self._queues[w] = proc, parent, queue
        self.worker_pids[w] = proc.pid
        self._started_at[w] = time.monotonic()

    def _send(self, w: int, req: _Request) -> None:
        self._queues[w].put((req.req_id, req.op, req.env, req.payload))

    def _recv(self, timeout: float) -> list[tuple[int, int | None, str, Any]]:
        waitables: dict[Any, tuple[int, str]] = {}
        for w, (p, c) in enumerate(zip(self._procs, self._conns)):
            if p is not None:
                waitables[c] = (w, "conn")
                waitables[p.sentinel] = (w, "proc")
        if not waitables:
            return []
        ready = connection.wait(list(waitables), timeout=timeout)
        out: list[tuple[int, int | None, str, Any]] = []
        dead: set[int] = set()
        for obj in sorted(ready, key=lambda o: waitables[o][1] == "proc"):  # drain pipes before deaths
            w, what = waitables[obj]
            if w in dead:
                continue
            if what == "conn":
                try:
                    while self._conns[w].poll():
                        out.append((w, *self._conns[w].recv()))
                except (EOFError, OSError):
                    dead.add(w)
            else:
                dead.add(w)
        for w in dead:
            self._drain(w, out)
            code = self._procs[w].exitcode if self._procs[w] is not None else None
            out.append((w, None, "dead", f"worker process {self.worker_pids[w]} died (exit code {code})"))
        return out

    def _drain(self, w: int, out: list) -> None:
        try:
            while self._conns[w].poll():
                out.append((w, *self._conns[w].recv()))
        except (EOFError, OSError):
            pass

    def _kill(self, w: int) -> None:
        proc, conn, queue = self._procs[w], self._conns[w], self._queues[w]
        self._procs[w] = self._conns[w] = self._queues[w] = None
        if proc is not None:
            if proc.is_alive() and self._closed:
                queue.put(None)  # polite stop at close; killed below if it does not listen
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5.0)
        if queue is not None:
            queue.cancel_join_thread()
            queue.close()
        if conn is not None:
            conn.close()
        if self._closed and self._shms[w] is not None:
            shm, self._shms[w] = self._shms[w], None
            shm.close()
            shm.unlink()

    def _decode(self, w: int, obs: Any) -> Any:
        shm = self._shms[w]
        return decode_obs(obs, shm.buf if shm is not None else None)


EnvPool = ProcessEnvPool
