"""``RemoteEnv``: a Gymnasium env whose episodes run on an ``mmgym serve`` server.

>>> env = RemoteEnv("http://127.0.0.1:8000")          # doctest: +SKIP
>>> obs, info = env.reset(seed=0)                      # doctest: +SKIP
>>> obs, r, term, trunc, info = env.step("<answer>A</answer>")  # doctest: +SKIP

Uses only the standard library (HTTP sessions of the server: ``/reset`` creates one, ``/step``
uses it, ``close()`` ends it). Observations come back as in DESIGN §2 (PNG images decoded to
uint8 arrays), so agents cannot tell a remote env from a local one.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import gymnasium as gym

from mmgym.core import UnicodeText
from mmgym.envs.base import MAX_ACTION, make_observation_space
from mmgym.envs.wire import decode_observation

__all__ = ["RemoteEnv", "RemoteEnvError"]


class RemoteEnvError(RuntimeError):
    """The server refused a request (``status`` is the HTTP status) or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RemoteEnv(gym.Env[dict, str]):
    """A client of one server session; see the module docstring.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"``.
        token: the server's token (sent as ``Authorization: Bearer``), if it has one.
        timeout_s: bound on each HTTP request.
        max_turns: for the observation space until the first reset reports the env's own.
    """

    metadata = {"render_modes": []}

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 120.0, max_turns: int = 16):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = float(timeout_s)
        self.session_id: str | None = None
        self.observation_space = make_observation_space(max_turns)
        self.action_space = UnicodeText(MAX_ACTION)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", "")
            except Exception:
                msg = ""
            raise RemoteEnvError(f"{method} {path} -> {e.code}: {msg or e.reason}", e.code) from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise RemoteEnvError(f"cannot reach the env server at {self.base_url}: {e}") from None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        body: dict[str, Any] = {"seed": seed, "options": options}
        if self.session_id is not None:
            body["session_id"] = self.session_id
        try:
            out = self._request("POST", "/reset", body)
        except RemoteEnvError as e:
            if e.status != 404 or "session_id" not in body:
                raise
            body.pop("session_id")  # our session expired on the server: open a new one
            out = self._request("POST", "/reset", body)
        self.session_id = out["session_id"]
        obs, info = self._unpack(out)
        if isinstance(info.get("max_turns"), int):
            self.observation_space = make_observation_space(info["max_turns"])
        return obs, info

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        if self.session_id is None:
            raise RuntimeError("call reset() before step()")
        out = self._request("POST", "/step", {"session_id": self.session_id, "action": {"text": action}})
        obs, info = self._unpack(out)
        o = out["observation"]
        return obs, float(out.get("reward") or 0.0), bool(o.get("terminated")), bool(o.get("truncated")), info

    @staticmethod
    def _unpack(out: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        o = out["observation"]
        return decode_observation(o), dict(o.get("info") or {})

    def close(self) -> None:
        if self.session_id is not None:
            try:
                self._request("POST", "/close", {"session_id": self.session_id})
            except RemoteEnvError:
                pass  # the server is gone or already closed it
            self.session_id = None
