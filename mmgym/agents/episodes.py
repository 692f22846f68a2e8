"""Run scripted episodes into ``Trajectory`` records and write them as HTML pages.

``mmgym play`` and the trainer's sample-episode pages both use ``write_episode_html``:
one page per episode showing every turn's text and the images (or video frames, with
their timestamps) the agent saw, plus an index page.
"""

from __future__ import annotations

import copy
import html
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mmgym.core import ToolCall, Trajectory, Turn

__all__ = ["new_trajectory", "run_episode", "write_episode_html", "write_index_html", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_trajectory(info: dict[str, Any], *, group: int = 0, seed: int | None = None) -> Trajectory:
    """The record of an episode just reset: its task id and group, the seed (when given)
    and the reset info's gold tool calls (``MMEnv.gold_tool_calls``; copied, plain JSON
    data, when the env gives them)."""
    traj = Trajectory(task_id=str(info.get("task_id", "")), group=group)
    if seed is not None:
        traj.info["seed"] = seed
    if info.get("gold_tool_calls") is not None:
        traj.info["gold_tool_calls"] = copy.deepcopy(info["gold_tool_calls"])
    return traj


def run_episode(env: Any, agent: Any, *, seed: int | None = None, task_index: int | None = None, keep_images: bool = True, max_steps: int = 1000) -> Trajectory:
    """Play one episode of ``agent`` (``act(env, obs, info) -> str``) and record it (with the
    reset info's ``gold_tool_calls``, when the env gives them, in ``Trajectory.info``)."""
    opts = {"task_index": task_index} if task_index is not None else None
    obs, info = env.reset(seed=seed, options=opts)
    traj = new_trajectory(info)
    pending = (obs, info)
    for t in range(max_steps):
        obs, info = pending
        action = agent.act(env, obs, info)
        imgs = tuple(obs["images"]) + tuple(obs["frames"]) if keep_images else ()
        nobs, reward, term, trunc, sinfo = env.step(action)
        turn = Turn(
            index=t,
            observation=obs["text"],
            action=action if isinstance(action, str) else json.dumps(np.asarray(action).tolist()),
            num_images=len(obs["images"]),
            num_frames=len(obs["frames"]),
            source=int(obs["source"]),
            reward=float(reward),
            reward_terms=dict(sinfo.get("reward_terms", {})),
            tool_calls=tuple(ToolCall(c["name"], c.get("arguments", {})) for c in sinfo.get("tool_calls", [])),
            tool_errors=tuple(sinfo.get("tool_errors", [])),
            parse_error=sinfo.get("parse_error"),
            state_key=sinfo.get("state_key"),
            images=imgs,
        )
        turn_times = tuple(float(x) for x in obs["frame_times"])
        if turn_times:
            traj.info.setdefault("frame_times", {})[t] = turn_times
        traj.turns.append(turn)
        if term or trunc:
            traj.success = bool(sinfo.get("success", False))
            traj.score = float(sinfo.get("score", 0.0))
            traj.termination_reason = str(sinfo.get("termination_reason", ""))
            traj.info["metrics"] = sinfo.get("metrics", {})
            traj.info["final_text"] = nobs["text"]
            break
        pending = (nobs, info)
    return traj


def _save_png(img: np.ndarray, path: Path) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if ok:
        path.write_bytes(buf.tobytes())


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
.turn{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.obs{background:#f6f8fa;white-space:pre-wrap;padding:.5em}.act{background:#eef6ee;white-space:pre-wrap;padding:.5em}
.err{color:#b00}.imgs img{max-height:260px;margin:4px;border:1px solid #999;image-rendering:pixelated}
figure{display:inline-block;margin:4px;text-align:center}figcaption{font-size:80%}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"""


def write_episode_html(traj: Trajectory, out_dir: Path, name: str, *, title: str = "") -> Path:
    """Write ``out_dir/name.html`` (+ its PNGs under ``out_dir/name_files/``)."""
    out_dir = Path(out_dir)
    media = out_dir / f"{name}_files"
    media.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title or name)}</title><style>{_CSS}</style>",
             f"<h1>{html.escape(title or name)}</h1>",
             f"<p>task <code>{html.escape(traj.task_id)}</code> · success <b>{traj.success}</b> · score {traj.score:.3f} · "
             f"return {traj.total_reward:.3f} · turns {traj.num_turns} · tool calls {traj.num_tool_calls} · "
             f"end: {html.escape(traj.termination_reason)}</p>"]
    times = traj.info.get("frame_times", {})
    for turn in traj.turns:
        figs = []
        ft = times.get(turn.index, ())
        for j, img in enumerate(turn.images):
            fn = f"t{turn.index}_{j}.png"
            _save_png(img, media / fn)
            k = j - turn.num_images
            cap = f"frame t={ft[k]:.1f}s" if k >= 0 and k < len(ft) else f"image {j} ({img.shape[1]}x{img.shape[0]})"
            figs.append(f"<figure><img src='{media.name}/{fn}'><figcaption>{cap}</figcaption></figure>")
        terms = ", ".join(f"{k}={v:+.3f}" for k, v in turn.reward_terms.items())
        err = ""
        if turn.parse_error:
            err += f"<p class='err'>parse error: {html.escape(turn.parse_error)}</p>"
        for e in turn.tool_errors:
            err += f"<p class='err'>tool error: {html.escape(e)}</p>"
        parts.append(
            f"<div class='turn'><h3>turn {turn.index}</h3><div class='obs'>{html.escape(turn.observation)}</div>"
            f"<div class='imgs'>{''.join(figs)}</div><div class='act'>{html.escape(turn.action)}</div>{err}"
            f"<p>reward {turn.reward:+.3f} ({html.escape(terms)})</p></div>"
        )
    atomic_write_text(out_dir / f"{name}.html", "\n".join(parts))
    return out_dir / f"{name}.html"


def write_index_html(out_dir: Path, entries: Sequence[tuple[str, Trajectory]], *, title: str = "episodes") -> Path:
    rows = "".join(
        f"<tr><td><a href='{html.escape(n)}.html'>{html.escape(n)}</a></td><td>{html.escape(t.task_id)}</td>"
        f"<td>{t.success}</td><td>{t.total_reward:.3f}</td><td>{t.num_turns}</td><td>{t.num_tool_calls}</td>"
        f"<td>{html.escape(t.termination_reason)}</td></tr>"
        for n, t in entries
    )
    sr = np.mean([t.success for _, t in entries]) if entries else 0.0
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<h1>{html.escape(title)}</h1><p>{len(entries)} episodes · success {sr:.3f}</p>"
            f"<table><tr><th>episode</th><th>task</th><th>success</th><th>return</th><th>turns</th><th>tool calls</th><th>end</th></tr>{rows}</table>")
    atomic_write_text(Path(out_dir) / "index.html", page)
    return Path(out_dir) / "index.html"
