"""``mmgym serve``: host any mmgym env over HTTP and WebSocket, speaking OpenEnv's protocol.

Endpoints (OpenEnv names and payloads, so OpenEnv clients and TRL's environment integration work):

- ``POST /reset`` ``{"seed"?, "episode_id"?, "options"?, "session_id"?}`` -> ``{"observation",
  "reward": null, "done": false, "session_id"}``; without ``session_id`` a session is created.
- ``POST /step`` ``{"action": {"text": "<model output>"}, "session_id"}`` -> ``{"observation",
  "reward", "done", "session_id"}``.
- ``GET /state?session_id=`` (``episode_id``, ``step_count``), ``POST /close`` ``{"session_id"}``,
  ``GET /schema`` (action/observation/state JSON Schemas), ``GET /metadata``, ``GET /health``.
- ``WS /ws``: one session per connection; messages ``{"type": "reset"|"step"|"state"|"close",
  "data": {...}}``, replies ``{"type": "observation"|"state"|"error", "data": {...}}``.

An observation is ``{"text", "images": [{"mime_type": "image/png", "data", "width", "height"}],
"frames", "frame_times", "source", "turn", "terminated", "truncated", "info"}``.

Safety: bound to 127.0.0.1 by default; any other host requires a token (``Authorization:
Bearer <token>``, or ``?token=`` on the WebSocket; ``/health`` stays open). At most
``max_sessions`` sessions (then 503 / a ``CAPACITY_REACHED`` error), idle sessions expire after
``session_timeout_s``, one env call may take ``step_timeout_s`` (then 504 and the session is
closed), bodies over ``max_body_bytes`` get 413, malformed requests a 4xx with a message.

Needs the ``server`` extra (fastapi, uvicorn, websockets): ``pip install 'mmgym[server]'``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mmgym.envs.wire import encode_observation, jsonable

__all__ = ["create_app", "serve", "SessionManager", "ServerConfig", "require_server_deps"]

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_server_deps() -> Any:
    """``import fastapi``, or an ImportError naming the extra to install."""
    try:
        import fastapi
    except ImportError as e:
        raise ImportError("the mmgym env server needs fastapi, uvicorn and websockets; install them with: pip install 'mmgym[server]'") from e
    return fastapi


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class ServerConfig:
    """Limits of one server; see the module docstring."""

    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    token: str | None = None
    max_sessions: int = 64
    session_timeout_s: float = 600.0
    step_timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    env_threads: int = 8

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.session_timeout_s <= 0 or self.step_timeout_s <= 0 or self.env_threads < 1:
            raise ValueError(f"server limits must be positive: max_sessions={self.max_sessions}, session_timeout_s={self.session_timeout_s}, step_timeout_s={self.step_timeout_s}, env_threads={self.env_threads}")


class SessionError(Exception):
    """A request the server refuses: ``status`` (HTTP) and ``code`` (OpenEnv WS error code)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(slots=True)
class _Session:
    env: Any
    lock: asyncio.Lock
    last_used: float
    episode_id: str | None = None
    step_count: int = 0
    done: bool = True
    broken: bool = False


class SessionManager:
    """Sessions ``{id: env}``: bounded in number, reaped when idle, env calls run in threads
    with a bound (``step_timeout_s``); a session whose call overran is closed."""

    def __init__(self, cfg: ServerConfig):
        import gymnasium as gym

        import mmgym.envs.registration  # noqa: F401  (registers the ids)

        self.cfg = cfg
        self._make = lambda: gym.make(cfg.env_id, **cfg.env_kwargs)
        self.sessions: dict[str, _Session] = {}
        self._reserved = 0
        self._pool = ThreadPoolExecutor(max_workers=cfg.env_threads, thread_name_prefix="mmgym-env")

    @property
    def active(self) -> int:
        return len(self.sessions) + self._reserved

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.wait_for(fut, timeout=self.cfg.step_timeout_s)
        except asyncio.TimeoutError:
            raise SessionError(504, "EXECUTION_ERROR", f"the env did not answer within step_timeout_s={self.cfg.step_timeout_s:g}; the session is closed") from None

    async def create(self) -> str:
        if self.active >= self.cfg.max_sessions:
            raise SessionError(503, "CAPACITY_REACHED", f"server at capacity ({self.cfg.max_sessions} sessions); close a session or retry later")
        self._reserved += 1
        try:
            env = await self._run(self._make)
        finally:
            self._reserved -= 1
        sid = uuid.uuid4().hex
        self.sessions[sid] = _Session(env, asyncio.Lock(), time.monotonic())
        return sid

    def get(self, sid: Any) -> _Session:
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise SessionError(404, "SESSION_ERROR", f"unknown session_id {str(sid)[:64]!r}; POST /reset without session_id creates one (sessions expire after {self.cfg.session_timeout_s:g} s idle)")
        return s

    async def close(self, sid: str) -> bool:
        s = self.sessions.pop(sid, None)
        if s is None:
            return False
        s.broken = True
        if not s.lock.locked():  # a hung call keeps its env; closing it would race the thread
            self._pool.submit(s.env.close)
        return True

    async def reset(self, sid: str, seed: int | None, options: dict[str, Any] | None, episode_id: str | None) -> dict[str, Any]:
        s = self.get(sid)
        async with s.lock:
            try:
                obs, info = await self._run(s.env.reset, seed=seed, options=options)
            except SessionError:
                await self.close(sid)
                raise
            except ValueError as e:  # bad options (e.g. task_index out of range): the caller's fault
                raise SessionError(400, "VALIDATION_ERROR", str(e)) from None
            s.episode_id, s.step_count, s.done, s.last_used = episode_id or uuid.uuid4().hex, 0, False, time.monotonic()
        return _payload(obs, None, False, False, info, sid)

    async def step(self, sid: str, text: str) -> dict[str, Any]:
        s = self.get(sid)
        if s.done:
            raise SessionError(409, "VALIDATION_ERROR", "no episode is running in this session; POST /reset first (episodes end at done)")
        async with s.lock:
            try:
                obs, r, term, trunc, info = await self._run(s.env.step, text)
            except SessionError:
                await self.close(sid)
                raise
            s.step_count += 1
            s.done, s.last_used = bool(term or trunc), time.monotonic()
        return _payload(obs, float(r), bool(term), bool(trunc), info, sid)

    def state(self, sid: str) -> dict[str, Any]:
        s = self.get(sid)
        s.last_used = time.monotonic()
        return {"episode_id": s.episode_id, "step_count": s.step_count, "done": s.done, "session_id": sid}

    async def reap(self) -> int:
        """Close sessions idle longer than ``session_timeout_s``; returns how many."""
        now = time.monotonic()
        idle = [sid for sid, s in self.sessions.items() if now - s.last_used > self.cfg.session_timeout_s and not s.lock.locked()]
        for sid in idle:
            await self.close(sid)
        return len(idle)

    async def shutdown(self) -> None:
        for sid in list(self.sessions):
            await self.close(sid)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _payload(obs: dict[str, Any], reward: float | None, term: bool, trunc: bool, info: dict[str, Any], sid: str) -> dict[str, Any]:
    o = encode_observation(obs)
    o.update(terminated=term, truncated=trunc, info=jsonable(info))
    return {"observation": o, "reward": reward, "done": term or trunc, "session_id": sid}


def schemas(env_id: str) -> dict[str, Any]:
    """``/schema``: JSON Schemas of the action, observation and state."""
    image = {"type": "object", "properties": {"mime_type": {"const": "image/png"}, "data": {"type": "string", "contentEncoding": "base64"}, "width": {"type": "integer"}, "height": {"type": "integer"}}, "required": ["mime_type", "data"]}
    return {
        "action": {"title": f"{env_id} action", "type": "object", "properties": {"text": {"type": "string", "description": "the model's raw output (tool calls / answer)"}}, "required": ["text"]},
        "observation": {
            "title": f"{env_id} observation",
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "images": {"type": "array", "items": image},
                "frames": {"type": "array", "items": image},
                "frame_times": {"type": "array", "items": {"type": "number"}},
                "source": {"type": "integer", "enum": [0, 1, 2]},
                "turn": {"type": "integer"},
                "terminated": {"type": "boolean"},
                "truncated": {"type": "boolean"},
                "info": {"type": "object"},
            },
        },
        "state": {"type": "object", "properties": {"episode_id": {"type": ["string", "null"]}, "step_count": {"type": "integer"}, "done": {"type": "boolean"}, "session_id": {"type": "string"}}},
    }


def action_text(action: Any) -> str:
    """The action's text: ``{"text": str}`` (or ``"message"`` / ``"content"``), or a bare string."""
    if isinstance(action, str):
        return action
    if isinstance(action, dict):
        for key in ("text", "message", "content"):
            if isinstance(action.get(key), str):
                return action[key]
    raise SessionError(422, "VALIDATION_ERROR", 'action must be {"text": "<model output>"} (a JSON object with a string "text")')


def _reset_args(data: Any) -> tuple[int | None, dict[str, Any] | None, str | None]:
    if not isinstance(data, dict):
        raise SessionError(422, "VALIDATION_ERROR", "reset data must be a JSON object like {\"seed\": 0, \"options\": {\"task_index\": 3}}")
    seed, options, episode_id = data.get("seed"), data.get("options"), data.get("episode_id")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise SessionError(422, "VALIDATION_ERROR", f"seed must be a non-negative integer or null, got {str(seed)[:40]}")
    if options is not None and not isinstance(options, dict):
        raise SessionError(422, "VALIDATION_ERROR", "options must be a JSON object, e.g. {\"task_index\": 3}")
    if episode_id is not None and not isinstance(episode_id, str):
        raise SessionError(422, "VALIDATION_ERROR", "episode_id must be a string")
    return seed, options, episode_id


def create_app(cfg: ServerConfig) -> Any:
    """The FastAPI app serving ``cfg.env_id`` (see the module docstring)."""
    require_server_deps()
    from mmgym.envs._server_routes import build_app

    return build_app(cfg, SessionManager(cfg))


def serve(env_id: str, *, host: str = "127.0.0.1", port: int = 8000, env_kwargs: dict[str, Any] | None = None, token: str | None = None, max_sessions: int = 64, session_timeout_s: float = 600.0, step_timeout_s: float = 60.0, log_level: str = "warning") -> None:
    """Run the server until interrupted (what ``mmgym serve`` calls)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"binding to {host!r} exposes the env beyond this machine; set a token (--token or MMGYM_SERVER_TOKEN) or bind to 127.0.0.1")
    cfg = ServerConfig(env_id, dict(env_kwargs or {}), token=token, max_sessions=max_sessions, session_timeout_s=session_timeout_s, step_timeout_s=step_timeout_s)
    app = create_app(cfg)
    import uvicorn

    log.warning("serving %s on http://%s:%d (max %d sessions)", env_id, host, port, max_sessions)
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws_max_size=cfg.max_body_bytes)


def check_token(cfg: ServerConfig, header: str | None, query: str | None = None) -> bool:
    """True if no token is set, or the request carries it (constant-time comparison)."""
    if not cfg.token:
        return True
    given = query or ""
    if header and header.lower().startswith("bearer "):
        given = header[7:].strip()
    return hmac.compare_digest(given.encode(), cfg.token.encode())


def parse_ws_message(raw: str) -> tuple[str, Any]:
    """``(type, data)`` of a WebSocket message, or ``SessionError`` saying what is wrong."""
    try:
        msg = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise SessionError(400, "INVALID_JSON", f"Invalid JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise SessionError(400, "VALIDATION_ERROR", 'a message must be {"type": "reset"|"step"|"state"|"close", "data": {...}}')
    return msg["type"], msg.get("data", {})
