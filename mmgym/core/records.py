"""Typed records that flow from envs through agents to algorithms.

``ToolCall`` and ``ToolResult`` belong to one step; a ``Turn`` is one env observation
followed by one policy action; a ``Trajectory`` is an episode; a ``RolloutBatch`` is the
padded tensor view of many trajectories that the algorithms consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is only needed by the code that builds batches
    import torch

__all__ = ["ToolCall", "ToolResult", "Turn", "Trajectory", "RolloutBatch", "TERMINATION_REASONS"]

TERMINATION_REASONS = ("answer", "goal", "failure", "max_turns", "max_invalid", "budget", "env_error")


@dataclass(slots=True, frozen=True)
class ToolCall:
    """One parsed call: ``<tool_call>{"name": name, "arguments": {...}}</tool_call>``."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass(slots=True)
class ToolResult:
    """What a tool returns. ``error`` set means the call failed; ``text`` then explains."""

    text: str = ""
    images: tuple[np.ndarray, ...] = ()
    frames: tuple[np.ndarray, ...] = ()
    frame_times: tuple[float, ...] = ()
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fail(cls, message: str) -> ToolResult:
        return cls(text=message, error=message)


@dataclass(slots=True)
class Turn:
    """One turn: the observation the env gave, then the policy's action.

    ``token_span`` is ``[start, end)`` of this turn's generated tokens inside
    ``Trajectory.token_ids`` (filled by model rollouts, ``None`` for scripted ones).
    ``state_key`` is the env's anchor-state key before the action (GiGPO step groups).
    """

    index: int
    observation: str
    action: str = ""
    num_images: int = 0
    num_frames: int = 0
    source: int = 0
    reward: float = 0.0
    reward_terms: dict[str, float] = field(default_factory=dict)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_errors: tuple[str, ...] = ()
    parse_error: str | None = None
    state_key: str | None = None
    token_span: tuple[int, int] | None = None
    images: tuple[np.ndarray, ...] = ()  # images the agent saw this turn (kept for viewers)

    @property
    def used_tool(self) -> bool:
        return bool(self.tool_calls) and not self.tool_errors


@dataclass(slots=True)
class Trajectory:
    """One episode. Token fields are filled by model rollouts and empty for scripted ones.

    ``action_mask[t] == 1`` iff ``token_ids[t]`` was sampled by the policy (its
    ``logprobs[t]`` is then the sampler's log-probability); env and template tokens are 0.
    """

    task_id: str
    group: int = 0
    turns: list[Turn] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    action_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    success: bool = False
    score: float = 0.0
    termination_reason: str = ""
    dropped_turns: int = 0  # whole old turns removed to fit the context (visual-token budget)
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total_reward(self) -> float:
        return float(sum(t.reward for t in self.turns))

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def num_tool_calls(self) -> int:
        return sum(len(t.tool_calls) for t in self.turns)

    def reward_terms(self) -> dict[str, float]:
        """Sum of every reward term over the episode."""
        out: dict[str, float] = {}
        for t in self.turns:
            for k, v in t.reward_terms.items():
                out[k] = out.get(k, 0.0) + float(v)
        return out


@dataclass(slots=True)
class RolloutBatch:
    """Padded tensors over ``B`` trajectories, ``T`` tokens and ``K`` turns.

    Fields (shapes):
      input_ids (B, T) long; attention_mask (B, T) bool (real tokens);
      action_mask (B, T) bool (tokens the policy generated);
      old_logprobs (B, T) float (sampler log-probs on action tokens, 0 elsewhere);
      token_turn (B, T) long (turn index of each generated token, -1 elsewhere);
      turn_rewards (B, K) float (reward earned at each turn, outcome included at the last);
      turn_mask (B, K) bool (real turns);
      state_keys (B, K) long (anchor-state id per turn for GiGPO, -1 = none);
      group_ids (B,) long (trajectories of one prompt share an id);
      outcome (B,) float (episode return), success (B,) bool;
      first_tool_turn (B,) long (index of the first turn whose next observation is a tool
        result; K if none) — MT-GRPO's split point;
      tool_turns (B, K) bool, optional (turn k's reply made at least one parsed tool call;
        None when the builder did not record it) — e.g. ToR's perception tokens;
      ref_logprobs / values optional (B, T).
    ``extras`` carries model inputs that are not token tensors (pixel values, grids).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    old_logprobs: torch.Tensor
    token_turn: torch.Tensor
    turn_rewards: torch.Tensor
    turn_mask: torch.Tensor
    state_keys: torch.Tensor
    group_ids: torch.Tensor
    outcome: torch.Tensor
    success: torch.Tensor
    first_tool_turn: torch.Tensor
    tool_turns: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])
