"""``LocalEnvPool``: the pool interface over envs in this process (no workers, no timeouts).

For debugging, for envs that cannot leave the process, and as the 1-process baseline of
``benchmarks/env_pool.py``. An env that raises is rebuilt and its episode ends with
``env_error`` (or is replayed, ``on_error="retry"``) exactly as in the process pool; a hang
cannot be interrupted in-process, so ``step_timeout_s`` is not enforced here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mmgym.envs.pool.base import BasePool, OnError, _Request
from mmgym.envs.pool.process import resolve_factories
from mmgym.envs.pool.worker import EnvHost

__all__ = ["LocalEnvPool"]


class LocalEnvPool(BasePool):
    """All envs in one in-process ``EnvHost``; requests run synchronously at ``submit``."""

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Any]] | None = None,
        *,
        env_id: str | None = None,
        num_envs: int | None = None,
        env_kwargs: dict[str, Any] | None = None,
        on_error: OnError = "exclude",
        max_retries: int = 1,
        **_ignored: Any,
    ):
        fns = resolve_factories(env_fns, env_id, num_envs, env_kwargs)
        self._setup([list(range(len(fns)))], step_timeout_s=1e9, reset_timeout_s=None, start_timeout_s=1e9, on_error=on_error, max_retries=max_retries)
        self._host: EnvHost | None = EnvHost(dict(enumerate(fns)))
        self._replies: list[tuple[int, int | None, str, Any]] = [(0, None, "ready", 0)]
        self._pump(0.0)

    def _start(self, w: int) -> None:  # never replaced: an in-process host cannot crash apart from us
        self._replies.append((0, None, "ready", 0))

    def _send(self, w: int, req: _Request) -> None:
        assert self._host is not None
        status, value = self._host.handle(req.op, req.env, req.payload)
        self._replies.append((w, req.req_id, status, value))

    def _recv(self, timeout: float) -> list[tuple[int, int | None, str, Any]]:
        out, self._replies = self._replies, []
        return out

    def _kill(self, w: int) -> None:
        if self._closed and self._host is not None:
            self._host.close()
            self._host = None
