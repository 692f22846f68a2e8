"""mmgym: multimodal agent tasks as Gymnasium environments with tool actions and
verifiable rewards, VLM policies, and multi-turn RL with turn-level credit assignment.

``import mmgym`` registers every ``mmgym/...`` environment id with Gymnasium. It does
not import torch or any optional extra.
"""

from __future__ import annotations

__version__ = "0.1.0"

from mmgym.envs import registration as _registration  # noqa: E402  (registers env ids)

__all__ = ["__version__"]
