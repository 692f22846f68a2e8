"""The env side of every pool backend: an ``EnvHost`` holds a few envs and executes requests.

The same ``EnvHost`` runs inside a worker process (``worker_main``), inside a Ray actor
(``mmgym.envs.ray_pool``) and in-process (``LocalEnvPool``). An exception inside an env is
caught here, reported as ``("raise", message)`` and the env is rebuilt from its factory, so
the host itself never dies of an env bug.

Image arrays of observations travel through a ``multiprocessing.shared_memory`` block: each
env owns a fixed slot of ``slot_bytes`` in its worker's block (an env has at most one
observation-bearing request in flight, so slots are never overwritten before the parent
copied them out). Arrays that do not fit are pickled with the message instead.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EnvHost", "ShmRef", "make_env", "encode_obs", "decode_obs", "worker_main", "MEDIA_KEYS"]

log = logging.getLogger(__name__)
MEDIA_KEYS = ("images", "frames")


def make_env(env_id: str, kwargs: dict[str, Any]) -> Any:
    """``gymnasium.make(env_id, **kwargs)`` with mmgym's ids registered (picklable via partial)."""
    import gymnasium as gym

    import mmgym.envs.registration  # noqa: F401  (registers mmgym/... ids in this process)

    return gym.make(env_id, **kwargs)


def env_factory(env_id: str, kwargs: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A picklable zero-argument factory for ``env_id`` (what spawn-started workers need)."""
    return functools.partial(make_env, env_id, dict(kwargs or {}))


@dataclass(slots=True, frozen=True)
class ShmRef:
    """An array written at ``offset`` of the worker's shared-memory block."""

    offset: int
    shape: tuple[int, ...]
    dtype: str


def encode_obs(obs: Any, buf: memoryview | None, base: int, size: int) -> Any:
    """Move the image arrays of ``obs`` into ``buf[base:base+size]`` and leave ``ShmRef``s.

    Arrays past the slot's capacity (and everything when ``buf`` is None) stay in the dict
    and are pickled with the message.
    """
    if buf is None or not isinstance(obs, dict):
        return obs
    out = dict(obs)
    pos = base
    for key in MEDIA_KEYS:
        items = obs.get(key)
        if not isinstance(items, tuple):
            continue
        enc: list[Any] = []
        for arr in items:
            if isinstance(arr, np.ndarray) and arr.nbytes and pos + arr.nbytes <= base + size:
                view = np.ndarray(arr.shape, dtype=arr.dtype, buffer=buf, offset=pos)
                view[...] = arr
                enc.append(ShmRef(pos, tuple(arr.shape), arr.dtype.str))
                pos += (arr.nbytes + 63) // 64 * 64  # keep arrays 64-byte aligned
            else:
                enc.append(arr)
        out[key] = tuple(enc)
    return out


def decode_obs(obs: Any, buf: memoryview | None) -> Any:
    """Inverse of ``encode_obs``: copy every ``ShmRef`` out of ``buf`` into its own array."""
    if not isinstance(obs, dict):
        return obs
    out = dict(obs)
    for key in MEDIA_KEYS:
        items = obs.get(key)
        if not isinstance(items, tuple) or not any(isinstance(a, ShmRef) for a in items):
            continue
        if buf is None:
            raise RuntimeError("observation refers to shared memory but the pool has none attached")
        out[key] = tuple(np.ndarray(a.shape, dtype=np.dtype(a.dtype), buffer=buf, offset=a.offset).copy() if isinstance(a, ShmRef) else a for a in items)
    return out


class EnvHost:
    """Holds envs ``{global index: env}`` built from factories and runs requests on them.

    ``handle(op, i, payload)`` returns ``("ok", value)`` or ``("raise", message)``; ops:
    ``reset`` (payload ``(seed, options)``), ``step`` (``action``), ``call``
    (``(name, args, kwargs)`` on ``env.unwrapped``) and ``replay`` (``(seed, options,
    actions, action)``: reset, re-apply ``actions``, then step ``action`` if not None —
    how the pool retries an episode whose env was lost).
    """

    def __init__(self, factories: dict[int, Callable[[], Any]], *, buf: memoryview | None = None, slot_bytes: int = 0, slot_of: dict[int, int] | None = None):
        self.factories = dict(factories)
        self.envs: dict[int, Any] = {i: fn() for i, fn in self.factories.items()}
        self.buf = buf
        self.slot_bytes = int(slot_bytes)
        self.slot_of = dict(slot_of or {i: k for k, i in enumerate(sorted(self.factories))})

    def handle(self, op: str, i: int, payload: Any) -> tuple[str, Any]:
        if i not in self.envs:
            return "raise", f"env index {i} is not hosted here (hosted: {sorted(self.envs)})"
        try:
            return "ok", self._run(op, i, payload)
        except Exception as e:  # an env bug: report it and rebuild the env so the host lives on
            msg = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
            log.warning("env %d raised during %s: %s", i, op, e)
            self._rebuild(i)
            return "raise", msg

    def _rebuild(self, i: int) -> None:
        try:
            self.envs[i].close()
        except Exception:  # the env is already broken; closing it is best effort
            pass
        self.envs[i] = self.factories[i]()

    def _encode(self, i: int, obs: Any) -> Any:
        return encode_obs(obs, self.buf, self.slot_of[i] * self.slot_bytes, self.slot_bytes)

    def _run(self, op: str, i: int, payload: Any) -> Any:
        env = self.envs[i]
        if op == "step":
            obs, r, term, trunc, info = env.step(payload)
            return self._encode(i, obs), float(r), bool(term), bool(trunc), info
        if op == "reset":
            seed, options = payload
            obs, info = env.reset(seed=seed, options=options)
            return self._encode(i, obs), info
        if op == "call":
            name, args, kwargs = payload
            attr = getattr(env.unwrapped, name)
            return attr(*args, **kwargs) if callable(attr) else attr
        if op == "replay":
            return self._replay(i, env, *payload[:4])  # a 5th item (a call to run next) is the pool's
        raise ValueError(f"unknown op {op!r}; known: reset, step, call, replay")

    def _replay(self, i: int, env: Any, seed: int | None, options: dict | None, actions: Sequence[str], action: str | None) -> Any:
        obs, info = env.reset(seed=seed, options=options)
        for a in actions:
            obs, r, term, trunc, info = env.step(a)
        if action is None:
            return None
        obs, r, term, trunc, info = env.step(action)
        return self._encode(i, obs), float(r), bool(term), bool(trunc), info

    def close(self) -> None:
        for env in self.envs.values():
            try:
                env.close()
            except Exception:  # closing is best effort at shutdown
                pass


def limit_threads(n: int) -> None:
    """Cap the thread pools of OpenCV, OpenMP/BLAS and torch (if loaded) in this process."""
    import os
    import sys

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def worker_main(conn: Any, cmd_queue: Any, factories: dict[int, Callable[[], Any]], shm_name: str | None, slot_bytes: int, slot_of: dict[int, int]) -> None:
    """Process entry point: build the envs, say ``ready``, then serve ``cmd_queue`` until ``None``.

    Replies go to ``conn`` as ``(req_id, status, value)``; ``(None, "ready", pid)`` once at start,
    ``(None, "fatal", traceback)`` if the envs cannot be built.
    """
    import os

    shm = None
    limit_threads(1)  # one env worker per core: nested thread pools only oversubscribe the cores
    try:
        if shm_name is not None:
            from multiprocessing import shared_memory

            shm = shared_memory.SharedMemory(name=shm_name)
        host = EnvHost(factories, buf=shm.buf if shm is not None else None, slot_bytes=slot_bytes, slot_of=slot_of)
    except Exception:
        conn.send((None, "fatal", traceback.format_exc()))
        return
    conn.send((None, "ready", os.getpid()))
    try:
        while True:
            msg = cmd_queue.get()
            if msg is None:
                break
            req_id, op, i, payload = msg
            status, value = host.handle(op, i, payload)
            conn.send((req_id, status, value))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent went away
        pass
    finally:
        host.close()
        if shm is not None:
            host.buf = None
            try:
                shm.close()
            except BufferError:  # a view is still alive; the parent unlinks the block anyway
                pass
