"""Exact token bookkeeping for multi-turn rollouts, and the ``RolloutBatch`` builder.

A model backend never re-tokenizes what it sampled. Each episode's context is kept as
a list of ``Segment``s in the order the model saw them::

    prompt(turn 0: system + task)  gen(0)  close(0)  obs(1)  gen(1)  close(1)  obs(2) ...

``prompt``/``obs``/``given``/``close`` tokens come from the env or the chat template
(action mask 0); ``gen`` tokens are exactly the sampled ids (action mask 1) with the
sampler's log-probs. Image tokens live inside ``prompt``/``obs`` segments together
with that segment's processed pixels, so dropping a turn (visual-token budget) removes
its image tokens and its pixels together: no image can be cut in half.

When an old turn is dropped, the replies sampled after it but before the drop were
conditioned on a context that no longer exists; their tokens stay in the sequence as
context with action mask 0 (replies older than the dropped turn keep mask 1: their
prefix is unchanged). So every token with action mask 1 was sampled from exactly the
prefix that precedes it in ``Trajectory.token_ids``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mmgym.core import RolloutBatch, Trajectory

if TYPE_CHECKING:
    import torch

__all__ = ["Segment", "TokenState", "ModelInputs", "action_positions", "build_rollout_batch", "tool_argument_positions",
           "MODEL_INPUTS_KEY", "TEMPERATURE_KEY"]

SegmentKind = Literal["prompt", "obs", "given", "gen", "close"]

MODEL_INPUTS_KEY = "model_inputs"  # Trajectory.info key holding the episode's ModelInputs
TEMPERATURE_KEY = "logprob_temperature"  # Trajectory.info key: temperature of old_logprobs


@dataclass(slots=True)
class Segment:
    """A run of tokens of one kind from one turn (see the module docstring).

    ``seq``: per-token side inputs from the processor (e.g. ``mm_token_type_ids``),
    each as long as ``ids``; tokens of segments without them count as 0.
    ``media``: the processor's tensors for this segment's images/videos
    (``pixel_values``, ``image_grid_thw``, ...), concatenated along dim 0 when batched.
    ``features``: cached vision-encoder outputs per image, as (weights fingerprint,
    tensor) or ``None`` before the first encode.
    """

    kind: SegmentKind
    turn: int
    ids: list[int]
    seq: dict[str, list[int]] = field(default_factory=dict)
    media: dict[str, Any] = field(default_factory=dict)
    num_images: int = 0
    num_videos: int = 0
    features: list[Any] = field(default_factory=list)
    images: tuple[Any, ...] = ()  # raw images (uint8 HxWx3), for backends that process them
    videos: tuple[Any, ...] = ()  # raw clips (uint8 TxHxWx3), likewise
    logprobs: list[float] = field(default_factory=list)
    context: frozenset[int] = frozenset()  # gen only: turns already dropped when it was sampled
    ended: bool = False  # gen only: the reply ended with an end-of-turn token
    text: str = ""  # gen/given only: the reply text
    closed: bool = False  # gen only: the assistant message that follows was recorded

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class ModelInputs:
    """What the training forward pass needs besides ``input_ids`` for one trajectory.

    ``seq``: per-token side inputs over the whole sequence (length T_i).
    ``media``: the sequence's image/video tensors, in order of appearance.
    """

    seq: dict[str, list[int]] = field(default_factory=dict)
    media: dict[str, Any] = field(default_factory=dict)
    num_images: int = 0


class TokenState:
    """One episode's exact token context (kept on ``Conversation.state`` by backends)."""

    __slots__ = ("segments", "dropped", "n_msgs", "error", "owner")

    def __init__(self, owner: object = None) -> None:
        self.segments: list[Segment] = []
        self.dropped: set[int] = set()
        self.n_msgs = 0  # conversation messages already turned into segments
        self.error: str | None = None
        self.owner = owner

    # ----- reading
    def active(self) -> list[Segment]:
        return [s for s in self.segments if s.turn not in self.dropped]

    def ids(self) -> list[int]:
        return [t for s in self.active() for t in s.ids]

    def __len__(self) -> int:
        return sum(len(s) for s in self.active())

    def num_images(self) -> int:
        return sum(s.num_images for s in self.active())

    @property
    def pending(self) -> Segment | None:
        """The last reply if its assistant message has not been recorded yet."""
        if self.segments and self.segments[-1].kind == "gen" and not self.segments[-1].closed:
            return self.segments[-1]
        return None

    def current_turn(self) -> int:
        return self.segments[-1].turn if self.segments else 0

    def droppable_turns(self) -> list[int]:
        """Turns that may be dropped, oldest first: never turn 0 (the task) nor the
        turn being answered."""
        cur = self.current_turn()
        turns = sorted({s.turn for s in self.segments} - self.dropped)
        return [t for t in turns if 0 < t < cur]

    # ----- writing
    def append(self, seg: Segment) -> None:
        self.segments.append(seg)

    def drop_turn(self, turn: int) -> None:
        if turn == 0 or turn == self.current_turn():
            raise ValueError(f"turn {turn} cannot be dropped (task turn or turn being answered)")
        self.dropped.add(turn)

    def same_prefix(self, seg: Segment) -> bool:
        """True iff no turn older than ``seg`` was dropped after ``seg`` was sampled."""
        return all(t in seg.context for t in self.dropped if t < seg.turn)

    # ----- export
    def export(self) -> tuple[list[int], list[int], list[float], dict[int, tuple[int, int]], ModelInputs]:
        """Final context as (token_ids, action_mask, logprobs, turn -> token span, inputs).

        A reply is trainable (mask 1) iff it is still present and no turn older than it
        was dropped after it was sampled (then its prefix here is what the sampler saw).
        """
        ids: list[int] = []
        mask: list[int] = []
        lps: list[float] = []
        spans: dict[int, tuple[int, int]] = {}
        seq_keys = sorted({k for s in self.active() for k in s.seq})
        seq: dict[str, list[int]] = {k: [] for k in seq_keys}
        media_parts: list[dict[str, Any]] = []
        n_img = 0
        for s in self.active():
            start = len(ids)
            ids.extend(s.ids)
            trainable = s.kind == "gen" and len(s.ids) > 0 and self.same_prefix(s)
            mask.extend([1 if trainable else 0] * len(s.ids))
            lps.extend(s.logprobs if trainable else [0.0] * len(s.ids))
            if trainable:
                spans[s.turn] = (start, len(ids))
            for k in seq_keys:
                seq[k].extend(s.seq.get(k, [0] * len(s.ids)))
            if s.media:
                media_parts.append(s.media)
            n_img += s.num_images
        return ids, mask, lps, spans, ModelInputs(seq=seq, media=concat_media(media_parts), num_images=n_img)

    def fill_trajectory(self, traj: Trajectory) -> None:
        """Write the token fields of ``traj`` (and its turns' ``token_span``)."""
        ids, mask, lps, spans, inputs = self.export()
        traj.token_ids = ids
        traj.action_mask = mask
        traj.logprobs = lps
        traj.dropped_turns = len(self.dropped)
        for t in traj.turns:
            t.token_span = spans.get(t.index)
        traj.info[MODEL_INPUTS_KEY] = inputs


def concat_media(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate processor media dicts along dim 0 (tensors) or by extension (lists)."""
    if not parts:
        return {}
    import torch

    out: dict[str, Any] = {}
    keys: list[str] = []
    for p in parts:
        keys.extend(k for k in p if k not in keys)
    for k in keys:
        vals = [p[k] for p in parts if k in p and p[k] is not None]
        if not vals:
            continue
        if all(isinstance(v, torch.Tensor) for v in vals):
            out[k] = torch.cat(vals, dim=0) if len(vals) > 1 else vals[0]
        else:
            merged: list[Any] = []
            for v in vals:
                merged.extend(v.tolist() if isinstance(v, torch.Tensor) else list(v))
            out[k] = merged
    return out


def action_positions(action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated tokens of each row packed to the left, in order.

    Args:
      action_mask: (B, T) bool.

    Returns:
      positions (B, A) long: ``positions[b, a]`` is the column of row ``b``'s ``a``-th
        generated token, ``T`` where the row has fewer than ``A`` (``A`` = the most
        generated tokens of any row);
      valid (B, A) bool: ``a`` < the number of generated tokens of row ``b``.

    >>> import torch
    >>> pos, valid = action_positions(torch.tensor([[False, True, True], [True, False, False]]))
    >>> pos.tolist(), valid.tolist()
    ([[1, 2], [0, 3]], [[True, True], [True, False]])
    """
    import torch

    mask = action_mask.bool()
    B, T = mask.shape
    counts = mask.sum(dim=1)
    A = int(counts.max()) if B else 0
    # a stable sort puts the generated columns first, in their original order
    cols = torch.arange(T, device=mask.device).expand(B, T)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :A]
    valid = torch.arange(A, device=mask.device).expand(B, A) < counts.unsqueeze(1)
    positions = torch.where(valid, cols.gather(1, order), torch.full((), T, device=mask.device))
    return positions, valid


_ARGS_OPEN = re.compile(r'"arguments"\s*:\s*\{')
_ARG_VALUE = re.compile(r':\s*("(?:[^"\\]|\\.)*"|\[[^\]]*\]|[^,}\s][^,}]*)')


def tool_argument_positions(traj: Trajectory, decode: Callable[[list[int]], str]) -> tuple[list[int], int]:
    """Positions in ``traj.token_ids`` of the generated tokens that spell a tool call's
    argument *values* (``{"region": 14}``: the tokens of ``14``; keys, the tool's name and
    the JSON punctuation are not included), and the number of replies skipped because
    their tokens do not decode piecewise to the reply's text (nothing is guessed there).
    Argument objects are read as flat JSON (as every mmgym tool's is): a value that is
    itself an object, or a string holding ``}``, ends the object early.

    For a warm start that should teach a tool's format and what follows from its result,
    but not which arguments to pass (``sft.mask_tool_arguments``)."""
    out: list[int] = []
    skipped = 0
    for turn in traj.turns:
        if turn.token_span is None or "<tool_call>" not in turn.action:
            continue
        lo, hi = turn.token_span
        ids = traj.token_ids[lo:hi]
        pieces = [decode([t]) for t in ids]
        text = "".join(pieces)
        if text != decode(ids):
            skipped += 1
            continue
        spans: list[tuple[int, int]] = []
        for opened in _ARGS_OPEN.finditer(text):
            close = text.find("}", opened.end())
            body_end = len(text) if close < 0 else close
            for m in _ARG_VALUE.finditer(text, opened.end() - 1, body_end):
                spans.append((m.start(1), m.end(1)))
        pos = 0
        for k, piece in enumerate(pieces):
            start, end = pos, pos + len(piece)
            pos = end
            if piece.strip() and any(start < b and a < end for a, b in spans):
                out.append(lo + k)
    return out, skipped


def _first_tool_turn(traj: Trajectory) -> int:
    """Index of the first turn whose next observation is a tool result (K if none)."""
    turns = traj.turns
    for i, t in enumerate(turns):
        if i + 1 < len(turns):
            if turns[i + 1].source == 1:
                return i
        elif t.tool_calls:  # last turn: its tool result ended the episode unrecorded
            return i
    return len(turns)


def build_rollout_batch(
    trajectories: list[Trajectory],
    pad_id: int,
    *,
    num_turns: int | None = None,
    device: torch.device | str | None = None,
) -> RolloutBatch:
    """Pad trajectories into a ``RolloutBatch`` (right padding, ``T`` = longest sequence).

    ``token_turn[b, t]`` is the ``Turn.index`` of generated token ``t`` (-1 elsewhere), and
    column ``k`` of every (B, K) field is env turn ``k`` (dropped turns keep their column:
    their rewards still count, only their tokens left the context); ``tool_turns[b, k]``
    is True iff turn ``k``'s reply made a parsed tool call (``Turn.tool_calls``). ``state_keys`` maps
    each distinct ``Turn.state_key`` string of the batch to one id. ``extras`` holds
    ``model_inputs`` (list of ``ModelInputs`` or ``None`` per row) and ``temperature``
    (B,) for ``Policy.logprobs``.
    """
    import torch

    if not trajectories:
        raise ValueError("build_rollout_batch needs at least one trajectory")
    B = len(trajectories)
    T = max(len(t.token_ids) for t in trajectories)
    K = num_turns if num_turns is not None else max(1, max(t.num_turns for t in trajectories))
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    action_mask = torch.zeros((B, T), dtype=torch.bool)
    old_logprobs = torch.zeros((B, T), dtype=torch.float32)
    token_turn = torch.full((B, T), -1, dtype=torch.long)
    turn_rewards = torch.zeros((B, K), dtype=torch.float32)
    turn_mask = torch.zeros((B, K), dtype=torch.bool)
    state_keys = torch.full((B, K), -1, dtype=torch.long)
    tool_turns = torch.zeros((B, K), dtype=torch.bool)
    key_ids: dict[str, int] = {}
    temps = torch.ones(B, dtype=torch.float32)
    model_inputs: list[ModelInputs | None] = []
    for b, tr in enumerate(trajectories):
        n = len(tr.token_ids)
        if not (len(tr.action_mask) == len(tr.logprobs) == n):
            raise ValueError(
                f"trajectory {b} ({tr.task_id}): token_ids, action_mask and logprobs differ in length "
                f"({n}, {len(tr.action_mask)}, {len(tr.logprobs)})"
            )
        if n:
            input_ids[b, :n] = torch.tensor(tr.token_ids, dtype=torch.long)
            attention_mask[b, :n] = True
            action_mask[b, :n] = torch.tensor(tr.action_mask, dtype=torch.bool)
            old_logprobs[b, :n] = torch.tensor(tr.logprobs, dtype=torch.float32)
        for turn in tr.turns:
            k = turn.index
            if k >= K:
                raise ValueError(f"trajectory {b} has turn {k} but the batch has K={K} turn columns")
            turn_rewards[b, k] = float(turn.reward)
            turn_mask[b, k] = True
            tool_turns[b, k] = bool(turn.tool_calls)
            if turn.state_key is not None:
                state_keys[b, k] = key_ids.setdefault(str(turn.state_key), len(key_ids))
            if turn.token_span is not None:
                s, e = turn.token_span
                token_turn[b, s:e] = k
        token_turn[b][~action_mask[b]] = -1
        temps[b] = float(tr.info.get(TEMPERATURE_KEY, 1.0))
        model_inputs.append(tr.info.get(MODEL_INPUTS_KEY))
    batch = RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        action_mask=action_mask,
        old_logprobs=old_logprobs,
        token_turn=token_turn,
        turn_rewards=turn_rewards,
        turn_mask=turn_mask,
        state_keys=state_keys,
        group_ids=torch.tensor([t.group for t in trajectories], dtype=torch.long),
        outcome=torch.tensor([t.total_reward for t in trajectories], dtype=torch.float32),
        success=torch.tensor([bool(t.success) for t in trajectories], dtype=torch.bool),
        first_tool_turn=torch.tensor([_first_tool_turn(t) for t in trajectories], dtype=torch.long),
        tool_turns=tool_turns,
        extras={"model_inputs": model_inputs, "temperature": temps},
    )
    if device is not None:
        for name in ("input_ids", "attention_mask", "action_mask", "old_logprobs", "token_turn", "turn_rewards",
                     "turn_mask", "state_keys", "group_ids", "outcome", "success", "first_tool_turn", "tool_turns"):
            setattr(batch, name, getattr(batch, name).to(device))
    return batch
