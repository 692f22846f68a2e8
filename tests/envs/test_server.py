"""The env server: OpenEnv protocol (HTTP + WebSocket), the RemoteEnv client, auth, limits,
malformed requests, and 1,000 concurrent session attempts leaving no leaked sessions."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import threading
import time

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install 'mmgym[server]')")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import mmgym  # noqa: E402,F401
from mmgym.envs.pool.chaos import make_chaos_env  # noqa: E402
from mmgym.envs.remote import RemoteEnv, RemoteEnvError  # noqa: E402
from mmgym.envs.server import ServerConfig, create_app, serve  # noqa: E402

ENV = "mmgym/ChainOfFocus-v0"
KW = {"canvas": (256, 320)}
CHAOS = "mmgymtest/ChaosFocus-v0"
if CHAOS not in gym.registry:
    gym.register(CHAOS, entry_point=functools.partial(make_chaos_env, ENV, KW))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, cfg: ServerConfig):
        self.app = create_app(cfg)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error", backlog=2048))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("test server did not start")

    @property
    def sessions(self):
        return self.app.state.sessions

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def srv():
    s = _Server(ServerConfig(ENV, dict(KW), max_sessions=16, session_timeout_s=60.0, step_timeout_s=10.0, max_body_bytes=1 << 18))
    yield s
    s.stop()


def test_remote_env_matches_local(srv) -> None:
    env, remote = gym.make(ENV, **KW), RemoteEnv(srv.url)
    obs, info = env.reset(seed=4)
    robs, rinfo = remote.reset(seed=4)
    assert robs["text"] == obs["text"] and rinfo["task_id"] == info["task_id"]
    assert all(np.array_equal(a, b) for a, b in zip(robs["images"], obs["images"]))  # PNG is lossless
    assert remote.observation_space.contains(robs)
    while True:
        a = env.unwrapped.oracle_action()
        ref, got = env.step(a), remote.step(a)
        assert got[1:4] == ref[1:4] and got[0]["text"] == ref[0]["text"]
        if ref[2] or ref[3]:
            assert got[4]["termination_reason"] == "answer" and got[4]["success"] is True
            break
    remote.close()
    assert srv.sessions.active == 0


def test_openenv_client_drives_the_server(srv) -> None:
    generic = pytest.importorskip("openenv.core.generic_client", reason="OpenEnv's client package (openenv-core) is not installed")
    with generic.GenericEnvClient(base_url=srv.url).sync() as client:
        r = client.reset(seed=4)
        assert r.done is False and r.observation["images"][0]["mime_type"] == "image/png"
        assert r.observation["text"].count("<image>") == len(r.observation["images"])
        r = client.step({"text": "not a tool call"})
        assert r.observation["source"] == 2 and r.reward < 0  # format feedback, episode goes on
        r = client.step({"text": "<answer>A</answer>"})
        assert r.done is True and r.observation["info"]["termination_reason"] == "answer"
        assert client.state()["step_count"] == 2
    time.sleep(0.2)
    assert srv.sessions.active == 0


def test_schema_health_metadata(srv) -> None:
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/health").json()["status"] == "healthy"
        sch = c.get("/schema").json()
        assert set(sch) == {"action", "observation", "state"} and sch["action"]["required"] == ["text"]
        assert c.get("/metadata").json()["name"] == ENV


@pytest.mark.parametrize(
    ("path", "body", "status", "match"),
    [
        ("/reset", b"{not json", 400, "not valid JSON"),
        ("/reset", b"[1, 2]", 422, "JSON object"),
        ("/reset", b'{"seed": "x"}', 422, "seed"),
        ("/reset", b'{"options": {"task_index": -3}}', 400, "task_index"),
        ("/reset", b'{"session_id": 7}', 404, "unknown session_id"),
        ("/step", b'{"action": {"text": "x"}}', 400, "session_id"),
        ("/step", b'{"session_id": "nope", "action": {"text": "x"}}', 404, "unknown session_id"),
        ("/step", b'{"session_id": "nope", "action": 5}', 422, "action must be"),
        ("/reset", b'{"x": "' + b"a" * (1 << 18) + b'"}', 413, "max_body_bytes"),
        ("/close", b"{}", 404, "unknown session_id"),
        ("/reset", b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    ],
)
def test_garbage_gets_4xx_with_message(srv, path, body, status, match) -> None:
    with httpx.Client(base_url=srv.url) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and match in r.json()["error"]
        assert c.get("/health").status_code == 200
    assert srv.sessions.active == 0


def test_websocket_garbage_keeps_the_session(srv) -> None:
    from websockets.sync.client import connect

    with connect(srv.url.replace("http", "ws") + "/ws") as ws:
        for bad in ["{oops", "[]", json.dumps({"type": "fly"}), json.dumps({"type": "step", "data": {"text": "x"}}), json.dumps({"type": "reset", "data": {"seed": -1}})]:
            ws.send(bad)
            reply = json.loads(ws.recv(timeout=10))
            assert reply["type"] == "error" and reply["data"]["message"]
        ws.send(json.dumps({"type": "reset", "data": {"seed": 1}}))
        assert json.loads(ws.recv(timeout=10))["type"] == "observation"
    time.sleep(0.2)
    assert srv.sessions.active == 0


def test_thousand_concurrent_session_attempts_leave_no_leaks(srv) -> None:
    async def main() -> tuple[list[int], list[str]]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/reset", json={"seed": k}) for k in range(1000)], return_exceptions=True)
            codes = [r.status_code if isinstance(r, httpx.Response) else -1 for r in rs]
            sids = [r.json()["session_id"] for r in rs if isinstance(r, httpx.Response) and r.status_code == 200]
            assert (await c.get("/health")).json()["active_sessions"] == len(sids)
            await asyncio.gather(*[c.post("/close", json={"session_id": s}) for s in sids])
            return codes, sids

    codes, sids = asyncio.run(main())
    assert codes.count(200) == 16 and len(sids) == 16  # max_sessions
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert srv.sessions.active == 0
    with httpx.Client(base_url=srv.url) as c:
        r = c.post("/reset", json={"seed": 0})
        assert r.status_code == 200
        c.post("/close", json={"session_id": r.json()["session_id"]})


def test_step_timeout_and_idle_expiry() -> None:
    s = _Server(ServerConfig(CHAOS, max_sessions=4, session_timeout_s=0.6, step_timeout_s=1.0))
    try:
        remote = RemoteEnv(s.url)
        remote.reset(seed=0)
        t0 = time.monotonic()
        with pytest.raises(RemoteEnvError, match="504.*step_timeout_s"):
            remote.step("!sleep 3")
        assert time.monotonic() - t0 < 2.5 and s.sessions.active == 0
        remote.reset(seed=0)  # a new session after the closed one
        assert s.sessions.active == 1
        time.sleep(2.0)  # idle past session_timeout_s: reaped
        assert s.sessions.active == 0
        remote.reset(seed=1)  # the client re-opens an expired session transparently
        remote.close()
    finally:
        s.stop()


def test_token_required_and_checked() -> None:
    with pytest.raises(ValueError, match="set a token"):
        serve(ENV, host="0.0.0.0", port=_free_port())
    s = _Server(ServerConfig(ENV, dict(KW), token="s3cret", max_sessions=2))
    try:
        with httpx.Client(base_url=s.url) as c:
            assert c.post("/reset", json={}).status_code == 401
            assert c.get("/schema", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/health").status_code == 200
        remote = RemoteEnv(s.url, token="s3cret")
        remote.reset(seed=0)
        remote.close()
        from websockets.sync.client import connect

        with pytest.raises(Exception):
            with connect(s.url.replace("http", "ws") + "/ws") as ws:
                ws.send(json.dumps({"type": "reset", "data": {}}))
                ws.recv(timeout=5)
        with connect(s.url.replace("http", "ws") + "/ws?token=s3cret") as ws:
            ws.send(json.dumps({"type": "reset", "data": {}}))
            assert json.loads(ws.recv(timeout=10))["type"] == "observation"
    finally:
        s.stop()


def test_cli_serve_subprocess() -> None:
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmgym.cli", "serve", ENV, "--port", str(port), "--max-sessions", "2", "--env-kwargs", "canvas=[256,320]"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(150):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(proc.stderr.read1().decode() if proc.poll() is not None else "server did not come up")
        remote = RemoteEnv(f"http://127.0.0.1:{port}")
        obs, _ = remote.reset(seed=0)
        assert max(obs["images"][0].shape[:2]) <= 320
        remote.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
