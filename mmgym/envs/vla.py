"""Vision-language-action (VLA) manipulation: action tokens, the shared VLA episode logic,
the light built-in ``mmgym/PushBlock-v0`` and its scripted expert.

Modelled on RLinf-VLA, piRL and SimpleVLA-RL (OpenVLA-style discretised actions):

* An action is 7-D: end-effector deltas ``dx dy dz droll dpitch dyaw`` and ``gripper``,
  each in ``[-1, 1]`` (the gripper is +1 open, -1 closed, as in ManiSkill). Each value is
  discretised into 256 uniform bins and written as an action token ``<act_K>``
  (``K`` in ``0..255``; the bin centre is ``-1 + (K + 0.5) * 2 / 256``).
* One reply is an action chunk: ``chunk_size`` steps x 7 tokens (8 steps, as OpenVLA-OFT),
  optionally inside ``<action>...</action>`` and after a ``<think>...</think>``::

      <action><act_160><act_128><act_128><act_128><act_128><act_128><act_255> ...</action>

* A turn always advances the simulation by ``chunk_size`` control steps (stopping early on
  success). A malformed reply (no tokens, wrong count, an out-of-range bin, stray text)
  gives feedback (``source=2``), a ``format`` penalty, and the robot holds still for that
  turn; ``max_invalid`` + 1 malformed replies end the episode.
* Rewards (``reward=``): ``"sparse"`` = 1 on success; ``"shaped"`` = RLinf's
  ``0.1 grasp + 0.1 consecutive_grasp + 1.0 success``, summed over the chunk's control
  steps (``success`` requires the object grasped on grasp tasks); ``"shaped_delta"`` = the
  same terms as differences from the previous control step. The episode ends on success
  (``terminated``, reason ``goal``) or after ``max_steps`` control steps (``truncated``,
  reason ``max_turns``). ``info`` has ``success`` and ``episode_length`` (control steps).
* ``action="continuous"`` replaces text by a ``Box(-1, 1, (chunk_size, 7))`` action (shape
  ``(7,)`` when ``chunk_size == 1``) for policies that output vectors.

``VLAEnv`` holds this logic once; a simulator plugs in through five hooks (``_sim_reset``,
``_sim_step``, ``_sim_images``, ``_sim_proprio``, ``_sim_state_key``). ``PushBlockEnv``
(pure numpy, drawn with OpenCV) and ``mmgym.envs.maniskill.ManiSkillEnv`` are the two.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from gymnasium import spaces

from mmgym.core import ToolResult
from mmgym.envs.base import SOURCE_FEEDBACK, SOURCE_TASK, SOURCE_TOOL, MMEnv, Task, make_observation_space
from mmgym.envs.scenes import PALETTE

__all__ = [
    "ACTION_DIMS",
    "ACTION_NAMES",
    "ActionTokenizer",
    "PushBlockEnv",
    "SimStep",
    "VLAEnv",
    "push_block_expert",
    "reward_step_terms",
]

ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
ACTION_DIMS = len(ACTION_NAMES)
MAX_REPLY_CHARS = 20_000
PROPRIO_BOUND = 1e4  # finite bounds: Gymnasium warns on infinite Box bounds

RewardMode = Literal["sparse", "shaped", "shaped_delta"]
ActionMode = Literal["text", "continuous"]
ProprioMode = Literal["none", "text", "key"]


# ---------------------------------------------------------------------- tokenizer
class ActionTokenizer:
    """OpenVLA-style uniform binning of ``[low, high]`` into ``n_bins`` tokens ``<act_K>``.

    >>> tok = ActionTokenizer()
    >>> tok.encode(np.zeros((1, 7)))[:16]
    '<act_128><act_128'
    >>> acts, err = tok.decode(tok.encode(np.zeros((2, 7))), chunk_size=2)
    >>> acts.shape, err, float(abs(acts).max()) < 1 / 256 + 1e-9
    ((2, 7), None, True)
    """

    _token_re = re.compile(r"<act_(\d+)>")
    _action_re = re.compile(r"<action>(.*?)</action>", re.DOTALL)
    _think_re = re.compile(r"<think>.*?</think>", re.DOTALL)

    def __init__(self, n_bins: int = 256, low: float = -1.0, high: float = 1.0, dims: int = ACTION_DIMS):
        if n_bins < 2 or not high > low or dims < 1:
            raise ValueError(f"ActionTokenizer needs n_bins >= 2, high > low, dims >= 1; got {n_bins}, {low}, {high}, {dims}")
        self.n_bins, self.low, self.high, self.dims = int(n_bins), float(low), float(high), int(dims)
        self.bin_width = (self.high - self.low) / self.n_bins

    @property
    def vocab(self) -> list[str]:
        """Every action token, in bin order (add them to a tokenizer as special tokens)."""
        return [self.token(k) for k in range(self.n_bins)]

    @staticmethod
    def token(k: int) -> str:
        return f"<act_{int(k)}>"

    def to_bins(self, actions: np.ndarray) -> np.ndarray:
        """``(T, dims)`` floats -> ``(T, dims)`` int bins (values outside the range are clipped)."""
        a = np.clip(np.asarray(actions, dtype=np.float64), self.low, self.high)
        return np.clip(np.floor((a - self.low) / self.bin_width), 0, self.n_bins - 1).astype(np.int64)

    def from_bins(self, bins: np.ndarray) -> np.ndarray:
        """``(T, dims)`` int bins -> ``(T, dims)`` bin centres, float32."""
        return (self.low + (np.asarray(bins, dtype=np.float64) + 0.5) * self.bin_width).astype(np.float32)

    def encode(self, actions: np.ndarray) -> str:
        """``(T, dims)`` (or ``(dims,)``) actions -> ``T * dims`` tokens, no separators."""
        a = np.asarray(actions, dtype=np.float64).reshape(-1, self.dims)
        return "".join(self.token(k) for k in self.to_bins(a).ravel())

    def format(self, actions: np.ndarray) -> str:
        """The reply a policy gives for ``actions``: tokens inside ``<action>...</action>``."""
        return f"<action>{self.encode(actions)}</action>"

    def decode(self, text: Any, chunk_size: int) -> tuple[np.ndarray | None, str | None]:
        """Parse a reply into ``(chunk_size, dims)`` actions, or ``(None, error)``. Never raises."""
        if not isinstance(text, str):
            return None, f"the action must be text, got {type(text).__name__}"
        if len(text) > MAX_REPLY_CHARS:
            return None, f"the reply is too long ({len(text)} characters; at most {MAX_REPLY_CHARS})"
        body = self._think_re.sub(" ", text)
        if "<action>" in body or "</action>" in body:
            blocks = self._action_re.findall(body)
            if len(blocks) != 1 or body.count("<action>") != 1 or body.count("</action>") != 1:
                return None, "write exactly one <action>...</action> block"
            body = blocks[0]
        found = self._token_re.findall(body)
        rest = self._token_re.sub("", body).strip()
        if rest:
            return None, f"unexpected text among the action tokens: {rest[:40]!r}"
        want = chunk_size * self.dims
        if len(found) != want:
            return None, f"got {len(found)} action tokens; expected {want} ({chunk_size} steps x {self.dims})"
        for s in found:
            if len(s) > 6 or int(s) >= self.n_bins:  # len check first: int() of 5000 digits raises
                return None, f"action token bin {s[:8]}{'...' if len(s) > 8 else ''} out of range 0..{self.n_bins - 1}"
        bins = np.array([int(s) for s in found], dtype=np.int64)
        return self.from_bins(bins.reshape(chunk_size, self.dims)), None

    def instructions(self, chunk_size: int) -> str:
        return (
            f"Reply with {chunk_size} actions of {self.dims} tokens each ({' '.join(ACTION_NAMES[: self.dims])}), "
            f"in <action>...</action>; every value is a bin token <act_0> (-1) .. <act_{self.n_bins - 1}> (+1), "
            f"<act_{self.n_bins // 2}> is about 0; gripper +1 opens, -1 closes."
        )


# ---------------------------------------------------------------------- rewards
def reward_step_terms(mode: RewardMode, *, success: bool, grasped: bool, prev_grasped: bool, needs_grasp: bool) -> dict[str, float]:
    """Reward terms of one control step (before the ``shaped_delta`` differencing).

    ``shaped`` follows RLinf: ``0.1 grasped + 0.1 (grasped and grasped before) + 1.0 (success
    and grasped)``; on tasks without a grasp (``needs_grasp=False``, e.g. pushing) the
    success term is plain success and ``grasped`` means contact with the object.

    >>> reward_step_terms("shaped", success=True, grasped=True, prev_grasped=True, needs_grasp=True)
    {'grasp': 0.1, 'consecutive_grasp': 0.1, 'success': 1.0}
    """
    if mode == "sparse":
        return {"success": float(success)}
    won = success and (grasped or not needs_grasp)
    return {"grasp": 0.1 * float(grasped), "consecutive_grasp": 0.1 * float(grasped and prev_grasped), "success": 1.0 * float(won)}


@dataclass(slots=True)
class SimStep:
    """What a simulator reports after one control step."""

    success: bool
    grasped: bool = False
    error: str | None = None  # a simulator failure; the episode ends with reason env_error


@dataclass(slots=True)
class _Turn:
    """Per-turn accumulator used by ``VLAEnv`` (and by batched groups)."""

    actions: np.ndarray
    error: str | None
    terms: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    done_success: bool = False
    sim_error: str | None = None


# ---------------------------------------------------------------------- base env
class VLAEnv(MMEnv):
    """A text-action (or ``Box``-action) manipulation env: see the module docstring.

    Args:
        action: ``"text"`` (action tokens) or ``"continuous"`` (a ``Box``).
        chunk_size: control steps per reply (8 as OpenVLA-OFT; 10 as pi0).
        max_steps: control steps per episode; the turn limit is ``ceil(max_steps / chunk_size)``.
        reward: ``"sparse"``, ``"shaped"`` or ``"shaped_delta"`` (see ``reward_step_terms``).
        proprio: ``"none"``, ``"text"`` (appended to each observation's text) or ``"key"``
            (an extra observation key ``proprio``, a float32 vector).
        max_invalid: malformed replies tolerated; one more ends the episode.
        invalid_penalty: the ``format`` term of a malformed reply (negative).
        n_bins: action bins per dimension.
        instruction: overrides the task's language instruction.
    """

    needs_grasp: ClassVar[bool] = False
    proprio_dim: ClassVar[int] = 0
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        *,
        action: ActionMode = "text",
        chunk_size: int = 8,
        max_steps: int = 96,
        reward: RewardMode = "sparse",
        proprio: ProprioMode = "none",
        max_invalid: int = 3,
        invalid_penalty: float = 0.1,
        n_bins: int = 256,
        instruction: str | None = None,
        render_mode: str | None = None,
    ):
        if action not in ("text", "continuous"):
            raise ValueError(f"action must be 'text' or 'continuous', got {action!r}")
        if reward not in ("sparse", "shaped", "shaped_delta"):
            raise ValueError(f"reward must be 'sparse', 'shaped' or 'shaped_delta', got {reward!r}")
        if proprio not in ("none", "text", "key"):
            raise ValueError(f"proprio must be 'none', 'text' or 'key', got {proprio!r}")
        if chunk_size < 1 or max_steps < 1:
            raise ValueError(f"chunk_size and max_steps must be >= 1, got {chunk_size}, {max_steps}")
        self.action_mode: ActionMode = action
        self.chunk_size = int(chunk_size)
        self.max_steps = int(max_steps)
        self.reward_mode: RewardMode = reward
        self.proprio_mode: ProprioMode = proprio
        self.tokenizer = ActionTokenizer(n_bins)
        self.instruction_override = instruction
        super().__init__(
            max_turns=math.ceil(self.max_steps / self.chunk_size),
            max_invalid=max_invalid,
            invalid_penalty=invalid_penalty,
            render_mode=render_mode,
        )
        obs_space = make_observation_space(self.max_turns)
        if proprio == "key":
            obs_space.spaces["proprio"] = spaces.Box(-PROPRIO_BOUND, PROPRIO_BOUND, shape=(self.proprio_dim,), dtype=np.float32)
        self.observation_space = obs_space
        if action == "continuous":
            shape = (ACTION_DIMS,) if self.chunk_size == 1 else (self.chunk_size, ACTION_DIMS)
            self.action_space = spaces.Box(-1.0, 1.0, shape=shape, dtype=np.float32)
        self.instruction = ""

    @classmethod
    def policy_tokens(cls, **kwargs: Any) -> tuple[str, ...]:
        """The action tokens ``<act_0>..<act_{n_bins-1}>`` (text actions; none for ``Box``
        actions). The trainer adds the missing ones to the policy's vocabulary, as OpenVLA
        gives each bin one token: a stock tokenizer splits ``<act_160>`` into ~7 pieces, so a
        chunk of 8 actions would be ~400 generated tokens instead of 56."""
        if kwargs.get("action", "text") != "text":
            return ()
        return tuple(ActionTokenizer(int(kwargs.get("n_bins", 256))).vocab)

    # ------------------------------------------------------------ simulator hooks
    def _sim_reset(self, rng: np.random.Generator, index: int | None) -> tuple[str, str]:
        """Start an episode; return ``(task_id, instruction)``."""
        raise NotImplementedError

    def _sim_step(self, action: np.ndarray) -> SimStep:
        """Apply one 7-D action in ``[-1, 1]``."""
        raise NotImplementedError

    def _sim_images(self) -> tuple[np.ndarray, ...]:
        """The current camera image(s), uint8 ``HxWx3``."""
        raise NotImplementedError

    def _sim_proprio(self) -> np.ndarray:
        return np.zeros(self.proprio_dim, np.float32)

    def _sim_state_key(self) -> bytes:
        """A coarse discretisation of the simulator state (GiGPO anchor states)."""
        return b""

    # ------------------------------------------------------------ MMEnv hooks
    def _reset_episode_state(self) -> None:
        MMEnv._reset_episode_state(self)
        self._steps = 0
        self._prev_grasped = False
        self._prev_terms: dict[str, float] = {}
        self._gripper = 1.0  # last commanded gripper (open): what "hold still" keeps
        self._success = False
        self._turn_state_keys: list[bytes] = []

    def sample_task(self, rng: np.random.Generator, index: int | None) -> Task:
        task_id, instruction = self._sim_reset(rng, index)
        self.instruction = self.instruction_override or instruction
        return Task(task_id=task_id, prompt=self.instruction)

    def initial_observation(self, task: Task) -> ToolResult:
        how = self.tokenizer.instructions(self.chunk_size) if self.action_mode == "text" else ""
        return ToolResult(text=f"Task: {self.instruction}\n{how}".rstrip())

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        obs, info = super().reset(seed=seed, options=options)
        obs = self._vla_obs(obs["text"], SOURCE_TASK)
        info.update(instruction=self.instruction, chunk_size=self.chunk_size, max_steps=self.max_steps, action_mode=self.action_mode)
        return obs, info

    def state_key(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self.task.task_id if self.task is not None else "").encode())
        h.update(self._sim_state_key() if self.task is not None else b"")
        return h.hexdigest()

    def oracle_action(self) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------ step, in three parts
    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        turn = self.begin_turn(action)
        for k in range(self.chunk_size):
            res = self._safe_sim_step(turn.actions[k])
            if self.apply_sim_step(turn, res):
                break
        return self.end_turn(turn)

    def begin_turn(self, action: Any) -> _Turn:
        """Decode ``action`` into ``(chunk_size, 7)`` control actions (a hold on error)."""
        if self.task is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset()")
        self._turn_state_key = self.state_key()
        self._turn += 1
        if self.action_mode == "text":
            acts, err = self.tokenizer.decode(action, self.chunk_size)
        else:
            acts, err = self._check_box(action)
        if acts is None:
            self._num_invalid += 1
            acts = self.hold_actions()
        return _Turn(actions=acts, error=err, terms=self._zero_terms(err is not None))

    def hold_actions(self) -> np.ndarray:
        """``(chunk_size, 7)`` actions that keep the robot still (zero deltas, same gripper)."""
        acts = np.zeros((self.chunk_size, ACTION_DIMS), np.float32)
        acts[:, -1] = self._gripper
        return acts

    def apply_sim_step(self, turn: _Turn, res: SimStep) -> bool:
        """Fold one control step's result into ``turn``; True when the episode must stop."""
        turn.steps += 1
        self._steps += 1
        if res.error is not None:
            turn.sim_error = res.error
            return True
        terms = reward_step_terms(self.reward_mode, success=res.success, grasped=res.grasped, prev_grasped=self._prev_grasped, needs_grasp=self.needs_grasp)
        self._prev_grasped = res.grasped
        if self.reward_mode == "shaped_delta":
            prev = self._prev_terms
            self._prev_terms = dict(terms)
            terms = {k: v - prev.get(k, 0.0) for k, v in terms.items()}
        for k, v in terms.items():
            turn.terms[k] = turn.terms.get(k, 0.0) + v
        if res.success:
            turn.done_success = True
            self._success = True
            return True
        return self._steps >= self.max_steps

    def end_turn(self, turn: _Turn) -> tuple[dict, float, bool, bool, dict]:
        """Build the step's observation, reward and info from a finished ``turn``."""
        info: dict[str, Any] = {
            "tool_calls": [],
            "parse_error": turn.error,
            "tool_errors": [],
            "state_key": self._turn_state_key,
            "elapsed_steps": self._steps,
        }
        terminated = truncated = False
        reason = ""
        if turn.sim_error is not None:
            terminated, reason = True, "env_error"
            info["sim_error"] = turn.sim_error
        elif turn.done_success:
            terminated, reason = True, "goal"
        elif turn.error is not None and self._num_invalid > self.max_invalid:
            terminated, reason = True, "max_invalid"
        elif self._steps >= self.max_steps or self._turn >= self.max_turns:
            truncated, reason = True, "max_turns"
        if turn.error is not None:
            text = f"Invalid action: {turn.error}. " + (self.tokenizer.instructions(self.chunk_size) if self.action_mode == "text" else "")
            source = SOURCE_FEEDBACK
        else:
            text, source = "", SOURCE_TOOL
        self._last_gripper_from(turn)
        obs = self._vla_obs(text.strip(), source)
        info["reward_terms"] = dict(turn.terms)
        info["num_invalid"] = self._num_invalid
        if terminated or truncated:
            self._done = True
            self._metrics["accuracy"] = float(self._success)
            info.update(
                success=bool(self._success),
                score=float(self._success),
                termination_reason=reason,
                episode_length=self._steps,
                metrics=dict(self._metrics),
            )
        return obs, float(sum(turn.terms.values())), bool(terminated), bool(truncated), info

    # ------------------------------------------------------------ helpers
    def _zero_terms(self, invalid: bool) -> dict[str, float]:
        names = ("success",) if self.reward_mode == "sparse" else ("grasp", "consecutive_grasp", "success")
        terms = {k: 0.0 for k in names}
        terms["format"] = -self.invalid_penalty if invalid else 0.0
        return terms

    def _last_gripper_from(self, turn: _Turn) -> None:
        if turn.error is None and turn.steps:
            self._gripper = float(turn.actions[turn.steps - 1, -1])

    def _safe_sim_step(self, action: np.ndarray) -> SimStep:
        return self._sim_step(np.asarray(action, dtype=np.float32))

    def _check_box(self, action: Any) -> tuple[np.ndarray | None, str | None]:
        try:
            a = np.asarray(action, dtype=np.float32)
        except (TypeError, ValueError):
            return None, f"the action must be a float array of shape {self.action_space.shape}"
        if a.shape != self.action_space.shape:
            return None, f"the action has shape {a.shape}; expected {self.action_space.shape}"
        if not np.all(np.isfinite(a)):
            return None, "the action holds NaN or infinite values"
        return np.clip(a, -1.0, 1.0).reshape(self.chunk_size, ACTION_DIMS), None

    def _proprio_text(self, p: np.ndarray) -> str:
        return "State: " + " ".join(f"{float(v):+.3f}" for v in p)

    def _vla_obs(self, text: str, source: int) -> dict[str, Any]:
        images = self._sim_images()
        # feedback may quote the reply: never let it forge media placeholders
        text = text.replace("<image>", "[image]").replace("<video>", "[video]")
        parts = [text] if text else []
        parts.append(" ".join("<image>" for _ in images))
        prop = self._sim_proprio().astype(np.float32) if self.proprio_mode != "none" else None
        if self.proprio_mode == "text":
            parts.append(self._proprio_text(prop))
        text = "\n".join(p for p in parts if p)
        obs = self._obs(text, images, (), (), source)
        if self.proprio_mode == "key":
            obs["proprio"] = prop
        return obs

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self._sim_images()[0] if self.task is not None else np.zeros((8, 8, 3), np.uint8)
        return None


# ---------------------------------------------------------------------- PushBlock
TABLE_HALF = 0.2  # m; the table spans [-0.2, 0.2]^2
BLOCK_HALF = 0.02  # m; an axis-aligned square block 4 cm wide and 4 cm tall
BLOCK_TOP = 0.04
PUSHER_R = 0.012  # m; the end effector is a disk
GOAL_R = 0.03  # m; success: block centre within this of the goal centre
Z_MIN, Z_MAX, Z_START = 0.01, 0.10, 0.025
BLOCK_COLORS = ("red", "blue", "yellow", "purple", "orange")
TABLE_RGB = (178, 160, 130)  # wood
FLOOR_RGB = (90, 90, 90)  # beyond the table, seen by the wrist camera


@dataclass(slots=True)
class _PushState:
    ee: np.ndarray  # (3,) x y z in m
    block: np.ndarray  # (2,) x y
    goal: np.ndarray  # (2,)
    gripper: float = 1.0
    color: str = "red"


def _push_physics(s: _PushState, a: np.ndarray, max_delta: float, substeps: int = 4) -> bool:
    """Move the end effector by ``a[:3] * max_delta`` and push the block; returns contact.

    Frictionless planar pushing: a disk (the end effector below the block's top) against an
    axis-aligned square moves the block out of contact along the contact normal, so a push
    on a face moves the block straight along that face's normal. Rotations are ignored.
    """
    d = np.clip(a[:3], -1.0, 1.0).astype(np.float64) * max_delta
    contact = False
    lo, hi = -TABLE_HALF + PUSHER_R, TABLE_HALF - PUSHER_R
    for _ in range(substeps):
        p = s.ee + d / substeps
        p[0], p[1] = np.clip(p[0], lo, hi), np.clip(p[1], lo, hi)
        p[2] = np.clip(p[2], Z_MIN, Z_MAX)
        q = np.clip(p[:2], s.block - BLOCK_HALF, s.block + BLOCK_HALF)
        gap = p[:2] - q
        dist = float(np.hypot(*gap))
        if p[2] < BLOCK_TOP and dist < PUSHER_R:
            if dist < 1e-9 or s.ee[2] >= BLOCK_TOP:
                # coming down onto the block (or already overlapping): rest on its top
                p[2] = BLOCK_TOP
            else:
                s.block = s.block - gap / dist * (PUSHER_R - dist)
                s.block = np.clip(s.block, -TABLE_HALF + BLOCK_HALF, TABLE_HALF - BLOCK_HALF)
                contact = True
                # the table edge may stop the block: keep the pusher outside it
                q = np.clip(p[:2], s.block - BLOCK_HALF, s.block + BLOCK_HALF)
                gap = p[:2] - q
                dist = float(np.hypot(*gap))
                if 1e-9 < dist < PUSHER_R:
                    p[:2] = q + gap / dist * PUSHER_R
        s.ee = p
    s.gripper = float(np.clip(a[6], -1.0, 1.0))
    return contact


class PushBlockEnv(VLAEnv):
    """``mmgym/PushBlock-v0``: push the coloured block onto the green target, seen from above.

    A light stand-in for ManiSkill's PushCube with the same observation and action contract
    (camera image + instruction, 7-D action tokens in chunks): pure numpy physics, drawn with
    OpenCV. The end effector is a disk; ``dx dy dz`` move it by up to ``max_delta`` m per
    control step, rotations and the gripper have no effect. It pushes the block only below
    the block's top (4 cm): lift it to move over the block. ``grasped`` (for the shaped
    reward) means touching the block.

    Args:
        image_size: side of the square top-down camera image (px).
        max_delta: metres per control step at action value 1.
        layout: ``"random"`` (block, target and end effector anywhere: the policy must go
            around the block to push it from the right side) or ``"aligned"`` (as ManiSkill's
            PushCube: the target lies 8-20 cm from the block along one table axis and the end
            effector starts just behind the block on that line, so pushing straight towards
            the target succeeds; the direction, one of four, is read off the image).
        cameras: the camera images of each observation, in order: ``"top"`` (the whole
            table from above) and/or ``"wrist"`` (from above too, but centred on the end
            effector and moving with it, ``wrist_span`` metres across; the floor beyond the
            table is grey). Each image is ``image_size`` px square.
        wrist_span: the wrist camera's field of view in metres.
        (others: see ``VLAEnv``)
    """

    description = "Push a block onto a target from a top-down camera; 7-D action tokens in chunks (VLA)."
    proprio_dim = 4

    def __init__(self, *, image_size: int = 128, max_delta: float = 0.02, max_steps: int = 96,
                 layout: Literal["random", "aligned"] = "random",
                 cameras: Sequence[Literal["top", "wrist"]] = ("top",), wrist_span: float = 0.5,
                 **kwargs: Any):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if layout not in ("random", "aligned"):
            raise ValueError(f"layout must be 'random' or 'aligned', got {layout!r}")
        if isinstance(cameras, str):
            cameras = (cameras,)
        cameras = tuple(cameras)
        if not cameras or any(c not in ("top", "wrist") for c in cameras):
            raise ValueError(f"cameras must be a non-empty list of 'top' and/or 'wrist', got {cameras!r}")
        if not 0.05 <= float(wrist_span) <= 2.0:
            raise ValueError(f"wrist_span must be in [0.05, 2.0] m, got {wrist_span}")
        self.layout = layout
        self.cameras = cameras
        self.wrist_span = float(wrist_span)
        self.image_size = int(image_size)
        self.max_delta = float(max_delta)
        self.s: _PushState | None = None
        super().__init__(max_steps=max_steps, **kwargs)

    # ------------------------------------------------------------ sim hooks
    def _sim_reset(self, rng: np.random.Generator, index: int | None) -> tuple[str, str]:
        if index is not None:
            rng = np.random.default_rng([index, 7919])
        lim = TABLE_HALF - 0.05
        if self.layout == "aligned":
            block, goal, ee = _aligned_layout(rng, lim)
        else:
            while True:
                block = rng.uniform(-lim, lim, size=2)
                goal = rng.uniform(-lim, lim, size=2)
                ee = rng.uniform(-lim, lim, size=2)
                if np.linalg.norm(block - goal) > 0.08 and np.max(np.abs(ee - block)) > BLOCK_HALF + PUSHER_R + 0.02:
                    break
        color = BLOCK_COLORS[int(rng.integers(len(BLOCK_COLORS)))]
        self.s = _PushState(ee=np.array([ee[0], ee[1], Z_START]), block=block, goal=goal, color=color)
        tid = f"pushblock-{index}" if index is not None else "pushblock-" + hashlib.blake2b(np.concatenate([block, goal, ee]).tobytes(), digest_size=6).hexdigest()
        return tid, f"push the {color} block onto the green target"

    def _sim_step(self, action: np.ndarray) -> SimStep:
        assert self.s is not None
        contact = _push_physics(self.s, action, self.max_delta)
        return SimStep(success=bool(np.linalg.norm(self.s.block - self.s.goal) < GOAL_R), grasped=contact)

    def _sim_images(self) -> tuple[np.ndarray, ...]:
        assert self.s is not None
        return tuple(self._draw() if c == "top" else self._draw(self.s.ee[:2], self.wrist_span) for c in self.cameras)

    def _sim_proprio(self) -> np.ndarray:
        assert self.s is not None
        return np.array([*self.s.ee, self.s.gripper], np.float32)

    def _sim_state_key(self) -> bytes:
        assert self.s is not None
        return np.round(np.concatenate([self.s.ee, self.s.block]) / 0.01).astype(np.int64).tobytes()

    def _draw(self, centre: np.ndarray | None = None, span: float = 2 * TABLE_HALF) -> np.ndarray:
        """The scene from above, ``span`` metres across, centred on ``centre`` (x, y; the
        table's centre when None)."""
        s, n = self.s, self.image_size
        assert s is not None
        scale = n / span
        cx0, cy0 = (0.0, 0.0) if centre is None else (float(centre[0]), float(centre[1]))

        def px(xy: np.ndarray) -> tuple[int, int]:
            # x to the right, y up (image rows grow downwards)
            return int(round((xy[0] - cx0 + span / 2) * scale)), int(round((cy0 - xy[1] + span / 2) * scale))

        if centre is None:
            img = np.full((n, n, 3), TABLE_RGB, np.uint8)
        else:
            img = np.full((n, n, 3), FLOOR_RGB, np.uint8)
            cv2.rectangle(img, px(np.array([-TABLE_HALF, TABLE_HALF])), px(np.array([TABLE_HALF, -TABLE_HALF])), TABLE_RGB, -1)
        cv2.circle(img, px(s.goal), max(2, int(round(GOAL_R * scale))), PALETTE["green"], -1, cv2.LINE_AA)
        bh = BLOCK_HALF * scale
        cx, cy = px(s.block)
        cv2.rectangle(img, (int(round(cx - bh)), int(round(cy - bh))), (int(round(cx + bh)), int(round(cy + bh))), PALETTE[s.color], -1)
        # the end effector: a shadow on the table and the disk, larger and lighter when raised
        ex, ey = px(s.ee[:2])
        r = PUSHER_R * scale
        cv2.circle(img, (ex, ey), max(1, int(round(r))), (60, 50, 40), -1, cv2.LINE_AA)
        lift = (s.ee[2] - Z_MIN) / (Z_MAX - Z_MIN)
        shade = int(70 + 150 * lift)
        cv2.circle(img, (ex, ey), max(1, int(round(r * (0.8 + 0.7 * lift)))), (shade, shade, shade), -1, cv2.LINE_AA)
        cv2.circle(img, (ex, ey), max(1, int(round(r * 0.35))), (30, 30, 30) if s.gripper < 0 else (240, 240, 240), -1, cv2.LINE_AA)
        return img

    # ------------------------------------------------------------ expert
    def oracle_action(self) -> Any:
        acts = push_block_plan(self)
        if self.action_mode == "text":
            return self.tokenizer.format(acts)
        return acts.reshape(self.action_space.shape)


def _aligned_layout(rng: np.random.Generator, lim: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block, goal and end effector (x, y) for ``layout="aligned"``: the goal 8-20 cm from the
    block along one axis, both inside ``[-lim, lim]``, the pusher touching-distance behind."""
    ax = int(rng.integers(2))
    sign = float(rng.choice([-1.0, 1.0]))
    dist = float(rng.uniform(0.08, 0.20))
    back = BLOCK_HALF + PUSHER_R + 0.004
    # the block's coordinate on the axis leaves room for the pusher behind and the goal ahead
    lo, hi = -lim + back, lim - dist
    if sign < 0:
        lo, hi = -lim + dist, lim - back
    block = np.zeros(2)
    block[ax] = rng.uniform(lo, hi)
    block[1 - ax] = rng.uniform(-lim, lim)
    goal, ee = block.copy(), block.copy()
    goal[ax] += sign * dist
    ee[ax] -= sign * back
    return block, goal, ee


def _expert_step(s: _PushState, max_delta: float) -> np.ndarray:
    """One action of the scripted pusher: align on one axis at a time, pushing on a face."""
    a = np.zeros(ACTION_DIMS, np.float64)
    a[6] = 1.0
    err = s.goal - s.block
    tol = 0.35 * GOAL_R
    if np.all(np.abs(err) < tol):
        return a
    ax = 0 if abs(err[0]) >= tol else 1
    other = 1 - ax
    sign = float(np.sign(err[ax]))
    behind = np.array(s.block, dtype=np.float64)
    behind[ax] -= sign * (BLOCK_HALF + PUSHER_R + 0.004)
    ee = s.ee
    in_place = abs(ee[other] - s.block[other]) < 0.006 and sign * (s.block[ax] - ee[ax]) > BLOCK_HALF + PUSHER_R - 0.002 and ee[2] < BLOCK_TOP
    target = np.array(ee, dtype=np.float64)
    if in_place:
        target[ax] = ee[ax] + sign * min(max_delta, abs(err[ax]))
        target[other] = s.block[other]
        target[2] = Z_START
    else:
        xy_err = float(np.hypot(*(behind - ee[:2])))
        if xy_err > 0.004:
            near_block = np.max(np.abs(ee[:2] - s.block)) < BLOCK_HALF + PUSHER_R + 0.03
            if ee[2] < BLOCK_TOP + 0.015 and (near_block or _path_hits_block(ee[:2], behind, s.block)):
                target[2] = BLOCK_TOP + 0.03  # lift over the block first
            else:
                target[:2] = behind
        else:
            target[:2] = behind
            target[2] = Z_START  # lower behind the block
    a[:3] = np.clip((target - ee) / max_delta, -1.0, 1.0)
    return a


def _path_hits_block(p: np.ndarray, q: np.ndarray, block: np.ndarray) -> bool:
    r = BLOCK_HALF + PUSHER_R + 0.002
    for t in np.linspace(0.0, 1.0, 24):
        x = p + t * (q - p)
        if np.all(np.abs(x - block) < r):
            return True
    return False


def push_block_plan(env: PushBlockEnv) -> np.ndarray:
    """``(chunk_size, 7)`` expert actions, closed-loop over the chunk: each action is planned
    on a copy of the state advanced by the previous (bin-quantised) actions."""
    base = env.unwrapped if hasattr(env, "unwrapped") else env
    assert isinstance(base, PushBlockEnv) and base.s is not None, "push_block_plan needs a reset PushBlockEnv"
    s = _PushState(ee=base.s.ee.copy(), block=base.s.block.copy(), goal=base.s.goal.copy(), gripper=base.s.gripper, color=base.s.color)
    out = np.zeros((base.chunk_size, ACTION_DIMS), np.float32)
    tok = base.tokenizer
    for k in range(base.chunk_size):
        a = _expert_step(s, base.max_delta)
        if base.action_mode == "text":
            a = tok.from_bins(tok.to_bins(a[None]))[0]  # what the env will execute
        out[k] = a
        _push_physics(s, a.astype(np.float64), base.max_delta)
        if np.linalg.norm(s.block - s.goal) < GOAL_R:
            out[k + 1 :] = 0.0
            out[k + 1 :, 6] = a[6]
            break
    return out


def push_block_expert(env: Any) -> str:
    """The scripted expert's reply (action tokens) for a reset ``PushBlockEnv`` (warm-start data)."""
    base = env.unwrapped if hasattr(env, "unwrapped") else env
    return base.tokenizer.format(push_block_plan(base))
