"""``mmgym play``: run a scripted agent on an env and write viewable episode pages."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import mmgym  # noqa: F401  (registers env ids)
from mmgym.agents.episodes import run_episode, write_episode_html, write_index_html
from mmgym.agents.scripted import make_agent

__all__ = ["play"]

log = logging.getLogger(__name__)


def play(env_id: str, *, agent: str = "oracle", episodes: int = 3, out: str | Path = "play", seed: int = 0, env_kwargs: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Play ``episodes`` episodes and write ``out/episode_XXX.html`` plus ``out/index.html``.

    Returns a summary dict: success rate, mean return, mean turns, the index path.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = gym.make(env_id, **(env_kwargs or {}))
    ag = make_agent(agent, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    it = range(episodes)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"play {env_id}", unit="ep")
    for ep in it:
        traj = run_episode(env, ag, seed=seed + ep)
        name = f"episode_{ep:03d}"
        write_episode_html(traj, out, name, title=f"{env_id} · {agent} · episode {ep}")
        entries.append((name, traj))
    index = write_index_html(out, entries, title=f"{env_id} · {agent}")
    env.close()
    trajs = [t for _, t in entries]
    return {
        "env": env_id,
        "agent": agent,
        "episodes": episodes,
        "success": float(np.mean([t.success for t in trajs])),
        "mean_return": float(np.mean([t.total_reward for t in trajs])),
        "mean_turns": float(np.mean([t.num_turns for t in trajs])),
        "index": str(index),
    }
