"""``BasePool``: the bookkeeping every pool backend shares (episodes, deadlines, faults, retries).

A backend (``ProcessEnvPool``, ``LocalEnvPool``, ``RayEnvPool``) only moves requests to its
workers and replies back (``_start``, ``_send``, ``_recv``, ``_kill``). This class owns:

- the public API: ``submit_reset`` / ``submit`` / ``submit_call`` then ``poll``, and the
  blocking ``reset`` / ``step_many`` / ``reset_many`` / ``call``;
- deadlines: a worker runs its requests in order, so the request at the head of a worker's
  queue started when the previous one finished; it fails with ``timeout`` once it has run
  longer than its bound, and the worker is replaced (``start_timeout`` for a worker that
  never came up);
- faults: ``crash`` (worker died), ``timeout``, ``env_raise`` (the env raised; the worker
  rebuilt it) and ``lost`` (an episode whose env lived in a replaced worker). With
  ``on_error="exclude"`` the episode ends with ``termination_reason="env_error"``; with
  ``"retry"`` it is rebuilt on the fresh env by replaying its seeded reset and actions
  (at most ``max_retries`` times), then it goes on as if nothing happened.

Every fault appends a dict to ``events``: ``kind``, ``worker``, ``env``, ``step``, ``op``,
``message``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["BasePool", "PoolResult", "EnvError", "EnvPoolError", "error_observation"]

log = logging.getLogger(__name__)
OnError = Literal["exclude", "retry"]


class EnvError(RuntimeError):
    """A blocking pool call (``reset``, ``call``) whose env failed and could not be recovered."""


class EnvPoolError(RuntimeError):
    """The pool itself cannot go on (e.g. workers fail to start again and again)."""


def error_observation() -> dict[str, Any]:
    """The observation given with an ``env_error`` result (every DESIGN §2 key present)."""
    return {"text": "", "images": (), "frames": (), "frame_times": (), "source": 2, "turn": 0}


@dataclass(slots=True)
class PoolResult:
    """One finished request. StepResult-like: ``obs, reward, terminated, truncated, info, done``.

    ``op`` is ``reset``, ``step`` or ``call`` (``value`` holds a call's return value).
    ``error`` is set when the env failed; a failed step or reset then has ``truncated=True``
    and ``info["termination_reason"] == "env_error"``.
    """

    env_index: int
    op: str
    obs: dict[str, Any] | None = None
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class _Episode:
    seed: int | None = None
    options: dict[str, Any] | None = None
    actions: list[str] = field(default_factory=list)
    active: bool = False
    lost: bool = False
    pending: int = 0


@dataclass(slots=True)
class _Request:
    req_id: int
    op: str  # reset | step | call | replay
    env: int
    payload: Any
    timeout_s: float
    public: str  # what the caller asked for: reset | step | call | restore (internal replay)
    action: str | None = None
    attempt: int = 0


class BasePool:
    """Shared logic; see the module docstring. Subclasses call ``_setup`` then start workers."""

    def _setup(self, worker_envs: list[list[int]], *, step_timeout_s: float, reset_timeout_s: float | None, start_timeout_s: float, on_error: OnError, max_retries: int, max_restarts: int = 3) -> None:
        if on_error not in ("exclude", "retry"):
            raise ValueError(f"on_error must be 'exclude' or 'retry', got {on_error!r}")
        if step_timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got step_timeout_s={step_timeout_s}, start_timeout_s={start_timeout_s}")
        self.worker_envs = [list(ws) for ws in worker_envs]
        self.num_envs = sum(len(ws) for ws in worker_envs)
        self._worker_of = {i: w for w, ws in enumerate(worker_envs) for i in ws}
        if sorted(self._worker_of) != list(range(self.num_envs)):
            raise ValueError("worker_envs must partition env indices 0..num_envs-1")
        self.step_timeout_s = float(step_timeout_s)
        self.reset_timeout_s = float(reset_timeout_s or step_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.on_error: OnError = on_error
        self.max_retries = int(max_retries)
        self.max_restarts = int(max_restarts)
        self.events: list[dict[str, Any]] = []
        self._episodes = [_Episode() for _ in range(self.num_envs)]
        self._ids = itertools.count()
        n = len(worker_envs)
        self._inflight: list[deque[_Request]] = [deque() for _ in range(n)]
        self._head_start = [0.0] * n
        self._ready_w = [False] * n
        self._started_at = [0.0] * n
        self._failed_starts = [0] * n
        self._results: deque[PoolResult] = deque()
        self._closed = False

    # ------------------------------------------------------------ backend hooks
    # A backend (LocalEnvPool, ProcessEnvPool, RayEnvPool) defines the transport:
    # _start, _send, _recv and _kill; everything else is shared here.
    def _start(self, w: int) -> None:
        """Start (or restart) worker ``w`` with its envs."""
        raise NotImplementedError(f"{type(self).__name__} must define the transport hook _start(worker)")

    def _send(self, w: int, req: _Request) -> None:
        """Send ``req`` to worker ``w``."""
        raise NotImplementedError(f"{type(self).__name__} must define the transport hook _send(worker, request)")

    def _wait_all_ready(self, *, what: str = "workers", hint: str = "") -> None:
        """Block until every worker has built its envs (bounded by ``start_timeout_s``)."""
        end = time.monotonic() + self.start_timeout_s
        while not all(self._ready_w):
            left = end - time.monotonic()
            if left <= 0:
                late = [w for w, r in enumerate(self._ready_w) if not r]
                raise EnvPoolError(f"{what} {late} did not build their envs within start_timeout_s={self.start_timeout_s}{hint}")
            for w, req, status, value in self._recv(min(left, 1.0)):
                if status in ("fatal", "dead"):
                    raise EnvPoolError(f"{what} {w} could not build its envs:\n{value}")
                self._on_message(w, req, status, value)

    def _recv(self, timeout: float) -> list[tuple[int, int | None, str, Any]]:
        """Replies ``(worker, req_id, status, value)``; status ok | raise | ready | fatal | dead."""
        raise NotImplementedError(f"{type(self).__name__} must define the transport hook _recv(timeout)")

    def _kill(self, w: int) -> None:
        """Stop worker ``w`` (it may already be dead)."""
        raise NotImplementedError(f"{type(self).__name__} must define the transport hook _kill(worker)")

    def _decode(self, w: int, obs: Any) -> Any:
        return obs

    # ------------------------------------------------------------ public API
    def __len__(self) -> int:
        return self.num_envs

    def worker_of(self, i: int) -> int:
        """Index of the worker that hosts env ``i``."""
        return self._worker_of[self._check_index(i)]

    def submit_reset(self, i: int, *, seed: int | None = None, options: dict[str, Any] | None = None) -> None:
        """Start resetting env ``i``; its result (``op="reset"``) comes from ``poll``."""
        ep = self._take(i)
        ep.seed, ep.options, ep.actions, ep.active, ep.lost = seed, dict(options) if options else None, [], False, False
        self._dispatch(self._request("reset", i, (seed, ep.options), self.reset_timeout_s, "reset"))

    def submit(self, i: int, action: str) -> None:
        """Start stepping env ``i`` with ``action`` (the model's raw text); result via ``poll``."""
        ep = self._take(i)
        if not ep.active and not ep.lost:
            ep.pending -= 1
            raise RuntimeError(f"env {i} has no episode running; submit_reset({i}) first (episodes end at done or env_error)")
        req = self._request("step", i, action, self.step_timeout_s, "step", action=action)
        if ep.lost:  # its env died with a replaced worker
            self._fail(req, "lost", "the env's worker was replaced; the episode state is gone")
        else:
            self._dispatch(req)

    def submit_call(self, i: int, name: str, *args: Any, **kwargs: Any) -> None:
        """Start ``getattr(env.unwrapped, name)(*args, **kwargs)`` in env ``i``'s worker (an
        attribute's value if it is not callable), e.g. ``"oracle_action"``; result via ``poll``."""
        ep = self._take(i)
        req = self._request("call", i, (name, args, kwargs), self.step_timeout_s, "call")
        if ep.lost:
            self._fail(req, "lost", "the env's worker was replaced; the episode state is gone")
        else:
            self._dispatch(req)

    def poll(self, timeout: float | None = 0.0, *, linger_s: float = 0.0) -> list[tuple[int, PoolResult]]:
        """Results ready now, or the first ones within ``timeout`` seconds (``None``: until one
        arrives; still bounded, because every request has a deadline). ``[]`` if none.

        ``linger_s``: once a result is there and requests are still in flight, wait this much
        longer and take what else arrived, so a caller that handles each batch quickly wakes
        once per batch instead of once per reply (on a machine with as many workers as
        cores, a wake-up of the caller can preempt a worker). Worth it with many envs per
        worker; with few it can leave workers idle. ``benchmarks/env_pool.py`` measures it."""
        if not (math.isfinite(linger_s) and linger_s >= 0):
            raise ValueError(f"linger_s must be a finite number >= 0, got {linger_s}")
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            self._pump(0.0 if self._results else self._wait_bound(end))
            if self._results or (end is not None and time.monotonic() >= end) or not self._busy():
                break
        if self._results and linger_s > 0 and self._busy():
            time.sleep(linger_s)
            self._pump(0.0)
        out = [(r.env_index, r) for r in self._results]
        self._results.clear()
        return out

    def pending(self) -> int:
        """Number of envs with a request in flight."""
        return sum(1 for ep in self._episodes if ep.pending)

    def wait(self, indices: Iterable[int]) -> dict[int, PoolResult]:
        """Wait for the results of the requests in flight for envs ``indices`` (bounded: every
        request has a deadline); ``{env: result}`` in arrival order. Results of other envs
        stay queued for ``poll``. Raises ``RuntimeError`` for an env with nothing in flight."""
        return self._collect(set(indices))

    def step_many(self, actions: dict[int, str]) -> dict[int, PoolResult]:
        """Step several envs and wait for all of them (bounded by the step timeout and retries)."""
        for i, a in actions.items():
            self.submit(i, a)
        return self._collect(set(actions))

    def reset_many(self, indices: list[int] | range, *, seed: int | None = None, options: dict[str, Any] | None = None) -> dict[int, PoolResult]:
        """Reset several envs (env ``i`` gets ``seed + i`` when ``seed`` is given) and wait."""
        for i in indices:
            self.submit_reset(i, seed=None if seed is None else seed + i, options=options)
        return self._collect(set(indices))

    def reset(self, i: int, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reset env ``i`` and wait; raises ``EnvError`` if it failed beyond recovery."""
        self.submit_reset(i, seed=seed, options=options)
        res = self._collect({i})[i]
        if res.error is not None:
            raise EnvError(f"reset of env {i} failed: {res.error}")
        return res.obs or {}, res.info

    def call(self, i: int, name: str, *args: Any, **kwargs: Any) -> Any:
        """``submit_call`` and wait for the value; raises ``EnvError`` if the env failed."""
        self.submit_call(i, name, *args, **kwargs)
        res = self._collect({i})[i]
        if res.error is not None:
            raise EnvError(f"call {name!r} on env {i} failed: {res.error}")
        return res.value

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w in range(len(self.worker_envs)):
            try:
                self._kill(w)
            except Exception as e:  # closing is best effort
                log.debug("closing worker %d: %s", w, e)

    def __enter__(self) -> BasePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------ internals
    def _check_index(self, i: int) -> int:
        if not isinstance(i, int) or not 0 <= i < self.num_envs:
            raise IndexError(f"env index {i!r} out of range; this pool has envs 0..{self.num_envs - 1}")
        return i

    def _take(self, i: int) -> _Episode:
        if self._closed:
            raise RuntimeError("the pool is closed")
        ep = self._episodes[self._check_index(i)]
        if ep.pending:
            raise RuntimeError(f"env {i} has a request in flight; poll() for its result before submitting again")
        ep.pending += 1
        return ep

    def _request(self, op: str, i: int, payload: Any, timeout_s: float, public: str, *, action: str | None = None) -> _Request:
        return _Request(next(self._ids), op, i, payload, timeout_s, public, action=action)

    def _dispatch(self, req: _Request) -> None:
        w = self._worker_of[req.env]
        if not self._inflight[w]:
            self._head_start[w] = time.monotonic()
        self._inflight[w].append(req)
        self._send(w, req)

    def _busy(self) -> bool:
        return any(self._inflight)

    def _wait_bound(self, end: float | None) -> float:
        now = time.monotonic()
        bound = 1.0 if end is None else max(0.0, end - now)
        for w, q in enumerate(self._inflight):
            if q:
                dl = self._started_at[w] + self.start_timeout_s if not self._ready_w[w] else self._head_start[w] + q[0].timeout_s
                bound = min(bound, max(0.0, dl - now) + 0.001)
        return bound

    def _collect(self, want: set[int]) -> dict[int, PoolResult]:
        got: dict[int, PoolResult] = {}
        keep: list[PoolResult] = []
        while len(got) < len(want):
            self._pump(0.0 if self._results else 1.0)
            while self._results:
                r = self._results.popleft()
                (got.__setitem__(r.env_index, r) if r.env_index in want and r.env_index not in got else keep.append(r))
            if len(got) < len(want) and not self.pending():
                self._results.extendleft(reversed(keep))
                raise RuntimeError(f"nothing is in flight for envs {sorted(want - set(got))}: their results would never come")
        self._results.extendleft(reversed(keep))
        return got

    def _pump(self, timeout: float) -> None:
        for w, req_id, status, value in self._recv(timeout):
            self._on_message(w, req_id, status, value)
        self._check_deadlines()

    def _on_message(self, w: int, req_id: int | None, status: str, value: Any) -> None:
        if status == "ready":
            self._ready_w[w], self._failed_starts[w] = True, 0
            self._head_start[w] = time.monotonic()
            return
        if status in ("fatal", "dead"):
            kind = "crash" if self._ready_w[w] else "start_failure"
            self._replace_worker(w, kind, str(value))
            return
        q = self._inflight[w]
        if not q or q[0].req_id != req_id:
            log.warning("worker %d sent a reply to unknown request %s; ignored", w, req_id)
            return
        req = q.popleft()
        self._head_start[w] = time.monotonic()
        if status == "ok":
            self._succeed(w, req, value)
        else:
            ep = self._episodes[req.env]
            self._event("env_raise", w, req, str(value))
            ep.lost = ep.active or req.op == "replay"  # the worker rebuilt the env: its state is gone
            self._fail(req, "env_raise", str(value).splitlines()[0] if value else "env raised")

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for w, q in enumerate(self._inflight):
            if not q:
                continue
            if not self._ready_w[w]:
                if now - self._started_at[w] > self.start_timeout_s:
                    self._replace_worker(w, "start_timeout", f"worker did not come up within start_timeout_s={self.start_timeout_s}")
            elif now - self._head_start[w] > q[0].timeout_s:
                self._replace_worker(w, "timeout", f"{q[0].op} ran past its {q[0].timeout_s:g} s bound")

    def _replace_worker(self, w: int, kind: str, message: str) -> None:
        """Kill worker ``w``, start a fresh one, and fail (or retry) everything it held."""
        failed = list(self._inflight[w])
        self._inflight[w].clear()
        head = failed[0] if failed else None
        self._event(kind, w, head, message)
        if kind in ("start_failure", "start_timeout"):
            self._failed_starts[w] += 1
            if self._failed_starts[w] > self.max_restarts:
                self.close()
                raise EnvPoolError(f"worker {w} failed to start {self._failed_starts[w]} times in a row; last error: {message[-2000:]}")
        for i in self.worker_envs[w]:
            ep = self._episodes[i]
            ep.lost = ep.lost or ep.active
        self._kill(w)
        self._ready_w[w] = False
        self._started_at[w] = time.monotonic()
        self._start(w)
        for k, req in enumerate(failed):
            self._fail(req, kind if k == 0 else "lost", message if k == 0 else f"worker {w} was replaced ({kind})")

    def _event(self, kind: str, w: int, req: _Request | None, message: str) -> None:
        ev = {
            "kind": kind,
            "worker": w,
            "env": None if req is None else req.env,
            "step": None if req is None else len(self._episodes[req.env].actions),
            "op": None if req is None else req.public,
            "message": message[-2000:],
        }
        log.warning("env pool %s: worker %d env %s op %s: %s", kind, w, ev["env"], ev["op"], message.splitlines()[0] if message else "")
        self.events.append(ev)

    def _succeed(self, w: int, req: _Request, value: Any) -> None:
        ep = self._episodes[req.env]
        if req.op == "replay" and req.action is None:  # restored a lost episode; now run the call
            ep.lost = False
            self._dispatch(self._request("call", req.env, req.payload[4], req.timeout_s, "call", action=None))
            return
        ep.pending -= 1
        if req.op == "reset":
            obs, info = value
            ep.active, ep.lost = True, False
            self._results.append(PoolResult(req.env, "reset", self._decode(w, obs), info=info))
        elif req.op in ("step", "replay"):
            obs, reward, term, trunc, info = value
            ep.lost = False
            ep.actions.append(req.action or "")
            ep.active = not (term or trunc)
            self._results.append(PoolResult(req.env, "step", self._decode(w, obs), reward, term, trunc, info))
        else:
            self._results.append(PoolResult(req.env, "call", value=value))

    def _fail(self, req: _Request, kind: str, message: str) -> None:
        ep = self._episodes[req.env]
        retry = self._retry_request(req, ep)
        if retry is not None and req.attempt < self.max_retries:
            retry.attempt = req.attempt + 1
            self._dispatch(retry)
            return
        ep.pending -= 1
        error = f"{kind}: {message}"
        if req.public in ("call", "restore"):
            self._results.append(PoolResult(req.env, "call", error=error))
            return
        ep.active, ep.lost = False, False
        info = {"termination_reason": "env_error", "env_error": kind, "error": message, "reward_terms": {}, "success": False, "score": 0.0}
        self._results.append(PoolResult(req.env, req.public, error_observation(), 0.0, False, True, info, error=error))

    def _retry_request(self, req: _Request, ep: _Episode) -> _Request | None:
        """The request that retries ``req`` on a fresh env, or None (exclude, or not replayable)."""
        if self.on_error != "retry":
            return None
        if req.public == "reset":
            return self._request("reset", req.env, (ep.seed, ep.options), self.reset_timeout_s, "reset")
        if ep.seed is None:  # an unseeded reset cannot be replayed faithfully
            return None
        bound = self.reset_timeout_s + self.step_timeout_s * (len(ep.actions) + 1)
        if req.public == "step":
            return self._request("replay", req.env, (ep.seed, ep.options, list(ep.actions), req.action), bound, "step", action=req.action)
        call_args = req.payload if req.op == "call" else req.payload[4]
        return self._request("replay", req.env, (ep.seed, ep.options, list(ep.actions), None, call_args), bound, "restore")
