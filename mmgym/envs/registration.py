"""Registers every ``mmgym/...`` id with Gymnasium (imported by ``import mmgym``)."""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

__all__ = ["ENV_IDS", "register_all"]

# id -> (entry point, kwargs, one-line description)
ENV_IDS: dict[str, tuple[str, dict, str]] = {
    "mmgym/VQA-v0": ("mmgym.envs.vqa:VQAEnv", {}, "Visual question answering on procedural shape scenes (choice, exact, numeric answers)."),
    "mmgym/ChainOfFocus-v0": ("mmgym.envs.focus:ChainOfFocusEnv", {}, "V*-style visual search: the answer is readable only after zooming (bbox zoom)."),
    "mmgym/ChainOfFocusRegion-v0": ("mmgym.envs.focus:ChainOfFocusEnv", {"zoom": "region", "grid": 6, "zoom_size": 336}, "Chain-of-Focus with zoom(region=k) on a 6x6 grid drawn on the first view."),
}


def register_all() -> None:
    for env_id, (entry, kwargs, _desc) in ENV_IDS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry, kwargs=dict(kwargs))


register_all()
