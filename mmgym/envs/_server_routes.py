"""The FastAPI routes of ``mmgym.envs.server`` (imported only when fastapi is installed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from mmgym.envs.server import ServerConfig, SessionError, SessionManager, _reset_args, action_text, check_token, parse_ws_message, schemas

log = logging.getLogger("mmgym.envs.server")


def _error(status: int, message: str, code: str = "VALIDATION_ERROR") -> JSONResponse:
    return JSONResponse({"error": message, "code": code, "detail": message}, status_code=status)


async def _json_body(request: Request, cfg: ServerConfig) -> dict[str, Any]:
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > cfg.max_body_bytes):
        raise SessionError(413, "VALIDATION_ERROR", f"request body over max_body_bytes={cfg.max_body_bytes}")
    raw = await request.body()
    if len(raw) > cfg.max_body_bytes:
        raise SessionError(413, "VALIDATION_ERROR", f"request body over max_body_bytes={cfg.max_body_bytes}")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SessionError(400, "INVALID_JSON", f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise SessionError(422, "VALIDATION_ERROR", "the body must be a JSON object")
    return body


def build_app(cfg: ServerConfig, sessions: SessionManager) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # the idle-session reaper runs for the app's lifetime
        async def reaper() -> None:
            while True:
                await asyncio.sleep(min(5.0, cfg.session_timeout_s / 2))
                n = await sessions.reap()
                if n:
                    log.info("closed %d idle sessions", n)

        task = asyncio.create_task(reaper())
        yield
        task.cancel()
        await sessions.shutdown()

    app = FastAPI(title=f"mmgym env server: {cfg.env_id}", lifespan=lifespan)
    app.state.sessions = sessions

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if request.url.path != "/health" and not check_token(cfg, request.headers.get("authorization")):
            return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>'", "UNAUTHORIZED")
        try:
            return await call_next(request)
        except SessionError as e:
            return _error(e.status, e.message, e.code)

    @app.exception_handler(SessionError)
    async def on_session_error(request: Request, e: SessionError) -> JSONResponse:
        return _error(e.status, e.message, e.code)

    @app.post("/reset")
    async def reset(request: Request) -> dict[str, Any]:
        body = await _json_body(request, cfg)
        seed, options, episode_id = _reset_args(body)
        sid = body.get("session_id")
        if sid is not None:
            return await sessions.reset(sid, seed, options, episode_id)
        sid = await sessions.create()
        try:
            return await sessions.reset(sid, seed, options, episode_id)
        except BaseException:  # a new session whose first reset failed is nobody's: close it
            await sessions.close(sid)
            raise

    @app.post("/step")
    async def step(request: Request) -> dict[str, Any]:
        body = await _json_body(request, cfg)
        if "session_id" not in body:
            raise SessionError(400, "VALIDATION_ERROR", "POST /step needs the session_id that /reset returned (or use the WebSocket /ws)")
        text = action_text(body.get("action"))
        return await sessions.step(body["session_id"], text)

    @app.get("/state")
    async def state(session_id: str = "") -> dict[str, Any]:
        return sessions.state(session_id)

    @app.post("/close")
    async def close(request: Request) -> dict[str, Any]:
        body = await _json_body(request, cfg)
        sessions.get(body.get("session_id"))
        return {"closed": await sessions.close(body["session_id"])}

    @app.get("/schema")
    async def schema() -> dict[str, Any]:
        return schemas(cfg.env_id)

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        from mmgym.envs.registration import ENV_IDS

        desc = ENV_IDS.get(cfg.env_id, ("", {}, ""))[2]
        return {"name": cfg.env_id, "description": desc, "version": cfg.env_id.rsplit("-v", 1)[-1], "env_kwargs": cfg.env_kwargs}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "active_sessions": sessions.active, "max_sessions": cfg.max_sessions}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await _ws_session(websocket, cfg, sessions)

    return app


async def _ws_session(websocket: WebSocket, cfg: ServerConfig, sessions: SessionManager) -> None:
    """One WebSocket = one session; every message gets a reply, errors never close it."""
    if not check_token(cfg, websocket.headers.get("authorization"), websocket.query_params.get("token")):
        await websocket.close(code=1008, reason="missing or wrong token")
        return
    await websocket.accept()
    sid = None
    try:
        sid = await sessions.create()
        while True:
            raw = await websocket.receive_text()
            if len(raw) > cfg.max_body_bytes:
                await websocket.send_text(json.dumps({"type": "error", "data": {"message": "message too large", "code": "VALIDATION_ERROR"}}))
                continue
            try:
                kind, data = parse_ws_message(raw)
                if kind == "close":
                    break
                reply = await _ws_handle(kind, data, sid, sessions)
            except SessionError as e:
                reply = {"type": "error", "data": {"message": e.message, "code": e.code}}
                if e.status == 504:  # the session was closed with its hung env
                    await websocket.send_text(json.dumps(reply))
                    break
            await websocket.send_text(json.dumps(reply))
    except SessionError as e:  # at capacity
        with contextlib.suppress(Exception):
            await websocket.send_text(json.dumps({"type": "error", "data": {"message": e.message, "code": e.code, "max_sessions": cfg.max_sessions}}))
    except WebSocketDisconnect:
        pass
    finally:
        if sid is not None:
            await sessions.close(sid)
        with contextlib.suppress(Exception):
            await websocket.close()


async def _ws_handle(kind: str, data: Any, sid: str, sessions: SessionManager) -> dict[str, Any]:
    if kind == "reset":
        seed, options, episode_id = _reset_args(data if data is not None else {})
        payload = await sessions.reset(sid, seed, options, episode_id)
        return {"type": "observation", "data": payload}
    if kind == "step":
        # OpenEnv's client sends the action itself as data; also accept {"action": {...}}
        action = data.get("action", data) if isinstance(data, dict) else data
        payload = await sessions.step(sid, action_text(action))
        return {"type": "observation", "data": payload}
    if kind == "state":
        return {"type": "state", "data": sessions.state(sid)}
    raise SessionError(400, "UNKNOWN_TYPE", f"Unknown message type: {kind[:40]!r}; known: reset, step, state, close")
