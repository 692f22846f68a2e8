"""mmgym.agents: the ``Policy`` protocol and its backends, conversations, rollouts.

- ``Policy``: ``generate(conversations, sampling) -> list[Generation]`` and
  ``logprobs(batch)``; backends ``HFPolicy`` (transformers, CPU/GPU; the embedded tiny
  Qwen2.5-VL by default), ``VLLMPolicy`` (extra ``vllm``) and ``ScriptedPolicy``.
- ``Conversation``/``Message``: the agent's history of an episode.
- ``RolloutCollector``: N tasks x G episodes, multi-turn, into ``Trajectory`` records;
  ``build_rollout_batch`` pads them into a ``RolloutBatch``.

Importing this package does not import torch; the backends load it when used.
"""

from __future__ import annotations

from typing import Any

from mmgym.agents.chat import Conversation, Message, content_parts, observation_message
from mmgym.agents.hf import HFPolicy, LoraSettings, ModelLoadError, VisionStats, tiny_model_path
from mmgym.agents.policy import Generation, Policy, SamplingParams, ScriptedPolicy
from mmgym.agents.rollout import RolloutCollector, RolloutSettings, collect_rollouts
from mmgym.agents.tokens import ModelInputs, Segment, TokenState, build_rollout_batch

__all__ = [
    "Conversation",
    "Generation",
    "HFPolicy",
    "LoraSettings",
    "Message",
    "ModelInputs",
    "ModelLoadError",
    "Policy",
    "RolloutCollector",
    "RolloutSettings",
    "SamplingParams",
    "ScriptedPolicy",
    "Segment",
    "TokenState",
    "VLLMPolicy",
    "VisionStats",
    "build_rollout_batch",
    "collect_rollouts",
    "content_parts",
    "observation_message",
    "tiny_model_path",
]


def __getattr__(name: str) -> Any:  # VLLMPolicy imports vllm lazily, on first use
    if name == "VLLMPolicy":
        from mmgym.agents.vllm_backend import VLLMPolicy

        return VLLMPolicy
    raise AttributeError(f"module 'mmgym.agents' has no attribute {name!r}")
