"""Scripted agents that act on an env directly: oracle, random, and a first-view reader.

They give baselines and exercise the env contract; ``ScriptedPolicy`` in
``mmgym.agents.policy`` adapts them to the ``Policy`` protocol for model-free rollouts.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import cv2
import numpy as np

from mmgym.core import ToolCall
from mmgym.envs.scenes import draw_marker
from mmgym.rewards import LETTERS

__all__ = ["Agent", "OracleAgent", "RandomAgent", "FirstViewAgent", "AGENTS", "make_agent"]


class Agent(Protocol):
    name: str

    def act(self, env: Any, obs: dict[str, Any], info: dict[str, Any]) -> str: ...


class OracleAgent:
    """Plays ``env.unwrapped.oracle_action()`` (the env's ground-truth-reading expert)."""

    name = "oracle"

    def act(self, env: Any, obs: dict[str, Any], info: dict[str, Any]) -> str:
        return env.unwrapped.oracle_action()


def _random_value(schema: dict[str, Any], rng: np.random.Generator) -> Any:
    t = schema.get("type")
    if "enum" in schema:
        return schema["enum"][int(rng.integers(len(schema["enum"])))]
    if t == "integer":
        lo, hi = int(schema.get("minimum", 0)), int(schema.get("maximum", 100))
        return int(rng.integers(lo, hi + 1))
    if t == "number":
        lo, hi = float(schema.get("minimum", 0.0)), float(schema.get("maximum", 2048.0))
        return float(np.round(rng.uniform(lo, hi), 1))
    if t == "array":
        n = int(schema.get("minItems", 1))
        items = schema.get("items", {"type": "number"})
        vals = [_random_value(items, rng) for _ in range(n)]
        if n == 4 and items.get("type") == "number":  # a box: make it well-ordered
            x = sorted(vals[0::2])
            y = sorted(vals[1::2])
            vals = [x[0], y[0], x[1], y[1]]
        return vals
    if t == "string":
        return "".join(rng.choice(list("abcdefgh ")) for _ in range(8)).strip() or "a"
    if t == "boolean":
        return bool(rng.integers(2))
    if t == "object":
        return _random_args(schema, rng)
    return None


def _random_args(schema: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    props = schema.get("properties", {})
    req = schema.get("required", list(props))
    return {k: _random_value(props[k], rng) for k in req if k in props}


class RandomAgent:
    """Calls a random tool with schema-valid random arguments, or answers a random letter."""

    name = "random"

    def __init__(self, seed: int = 0, answer_prob: float = 0.34):
        self.rng = np.random.default_rng(seed)
        self.answer_prob = answer_prob

    def act(self, env: Any, obs: dict[str, Any], info: dict[str, Any]) -> str:
        schemas = info.get("tool_schemas") or env.unwrapped.tool_schemas
        base = env.unwrapped
        last_turn = getattr(base, "_turn", 0) >= getattr(base, "max_turns", 1) - 1
        if not schemas or last_turn or self.rng.random() < self.answer_prob:
            opts = getattr(base.task, "options", ()) or ("A", "B", "C", "D")
            return f"<answer>{LETTERS[int(self.rng.integers(len(opts)))]}</answer>"
        fn = schemas[int(self.rng.integers(len(schemas)))]["function"]
        call = ToolCall(fn["name"], _random_args(fn["parameters"], self.rng))
        return "<tool_call>" + json.dumps(call.to_json()) + "</tool_call>"


class FirstViewAgent:
    """Answers ChainOfFocus from the first, downsampled view alone, never zooming.

    A generous baseline: it is told where the markers are (ground truth) and matches the
    first-view pixels there against each option's glyph rendered in a clean marker and
    downsampled the same way (nearest template, normalised L2). If this is near chance,
    the answer really is unreadable without zooming.
    """

    name = "first_view"

    def act(self, env: Any, obs: dict[str, Any], info: dict[str, Any]) -> str:
        base = env.unwrapped
        task = base.task
        view = task.images[0].astype(np.float32)
        scale = view.shape[1] / task.image.shape[1]
        if task.qtype == "attribute":
            scores = [self._match(view, task.boxes[0], scale, g) for g in task.options]
            return f"<answer>{LETTERS[int(np.argmin(scores))]}</answer>"
        # relative: which marker carries which glyph? try both assignments
        import re

        m = re.search(r"with the (\w+)(?: stripes)? relative to the marker with the (\w+)", task.question)
        ga, gb = (m.group(1), m.group(2)) if m else ("circle", "square")
        b0, b1 = task.boxes
        keep = self._match(view, b0, scale, ga) + self._match(view, b1, scale, gb)
        swap = self._match(view, b0, scale, gb) + self._match(view, b1, scale, ga)
        a, b = (b0, b1) if keep <= swap else (b1, b0)
        dx, dy = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2, (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
        truth = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        idx = task.options.index(truth) if truth in task.options else 0
        return f"<answer>{LETTERS[idx]}</answer>"

    @staticmethod
    def _match(view: np.ndarray, box: tuple[float, float, float, float], scale: float, glyph: str) -> float:
        x1, y1, x2, y2 = box
        side = x2 - x1
        pad = int(side)
        size = int(side + 2 * pad)
        tile = np.full((size, size, 3), 60, np.uint8)
        draw_marker(tile, size / 2, size / 2, side, glyph=glyph)
        small = cv2.resize(tile, (max(1, round(size * scale)), max(1, round(size * scale))), interpolation=cv2.INTER_AREA).astype(np.float32)
        cx, cy = (x1 + x2) / 2 * scale, (y1 + y2) / 2 * scale
        h, w = small.shape[:2]
        ox, oy = int(round(cx - w / 2)), int(round(cy - h / 2))
        ys, xs = slice(max(0, oy), min(view.shape[0], oy + h)), slice(max(0, ox), min(view.shape[1], ox + w))
        patch = view[ys, xs]
        tmpl = small[ys.start - oy: ys.start - oy + patch.shape[0], xs.start - ox: xs.start - ox + patch.shape[1]]
        # compare only the marker's interior (the frame looks the same for every glyph)
        c = patch.shape[0] // 2, patch.shape[1] // 2
        r = max(1, int(round(side * scale * 0.35)))
        pa = patch[max(0, c[0] - r): c[0] + r + 1, max(0, c[1] - r): c[1] + r + 1]
        ta = tmpl[max(0, c[0] - r): c[0] + r + 1, max(0, c[1] - r): c[1] + r + 1]
        pa, ta = pa - pa.mean(), ta - ta.mean()
        return float(((pa - ta) ** 2).mean())


AGENTS = {"oracle": OracleAgent, "random": RandomAgent, "first_view": FirstViewAgent}


def make_agent(name: str, seed: int = 0) -> Agent:
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; known: {', '.join(sorted(AGENTS))}")
    cls = AGENTS[name]
    return cls(seed=seed) if cls is RandomAgent else cls()
