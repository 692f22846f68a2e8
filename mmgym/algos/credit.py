"""Turn -> token credit assignment, and the anchor-state keys that GiGPO groups on.

Layout (see ``mmgym.core.RolloutBatch``): ``B`` trajectories, ``T`` token positions and
``K`` turns. ``action_mask (B, T)`` marks the tokens the policy generated;
``token_turn (B, T)`` gives the turn index of each generated token (``-1`` on prompt,
template and env tokens). A turn's *end token* is its last generated token.

Anchor states (GiGPO, Feng et al. 2025, arXiv:2505.10978, Eq. 6): steps of one episode
group whose environment state is "the same" form a step group. Discrete envs give an
exact string key; image states are keyed by a perceptual hash (:func:`phash`) and matched
within a Hamming ``tolerance`` by :func:`anchor_ids`, which turns either kind into the
integer ids that ``RolloutBatch.state_keys`` holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "anchor_ids",
    "broadcast_turn_values",
    "hamming_distance",
    "phash",
    "turn_end_positions",
    "turn_rewards_to_tokens",
]

PHASH_PREFIX = "phash:"


# --------------------------------------------------------------------------- turn <-> token


def _turn_index(token_turn: torch.Tensor, action_mask: torch.Tensor, num_turns: int) -> torch.Tensor:
    """(B, T) long: the turn of each generated token, ``num_turns`` for every other token
    (non-generated, or a turn index outside ``[0, num_turns)``)."""
    spare = torch.tensor(num_turns, dtype=token_turn.dtype, device=token_turn.device)
    return torch.where(action_mask.bool() & (token_turn >= 0), token_turn, spare).clamp_(max=num_turns)


def broadcast_turn_values(
    turn_values: torch.Tensor, token_turn: torch.Tensor, action_mask: torch.Tensor
) -> torch.Tensor:
    """Copy each turn's value onto that turn's generated tokens.

    Args:
      turn_values: (B, K) float, one value per turn (e.g. a turn advantage).
      token_turn: (B, T) long, turn index of each generated token, ``-1`` elsewhere.
      action_mask: (B, T) bool, tokens the policy generated.

    Returns:
      (B, T) tensor of ``turn_values.dtype``: ``turn_values[b, token_turn[b, t]]`` on
      generated tokens, 0 on every other token (env, template, padding, and generated
      tokens whose turn index is outside ``[0, K)``).
    """
    num_turns = turn_values.shape[1]
    # Column K of the padded table is 0: every non-generated token reads it.
    padded = torch.cat([turn_values, turn_values.new_zeros(turn_values.shape[0], 1)], dim=1)
    return torch.gather(padded, 1, _turn_index(token_turn, action_mask, num_turns))


def turn_end_positions(token_turn: torch.Tensor, action_mask: torch.Tensor, num_turns: int) -> torch.Tensor:
    """Position of each turn's last generated token.

    Args:
      token_turn: (B, T) long, ``-1`` on non-generated tokens.
      action_mask: (B, T) bool.
      num_turns: K.

    Returns:
      (B, K) long: the largest ``t`` with ``token_turn[b, t] == k`` on a generated token,
      ``-1`` for a turn that generated no token.
    """
    batch, length = token_turn.shape
    # Other tokens scatter into a spare column K that is dropped afterwards.
    index = _turn_index(token_turn, action_mask, num_turns)
    pos = torch.arange(length, device=token_turn.device).expand(batch, length)
    out = torch.full((batch, num_turns + 1), -1, dtype=torch.long, device=token_turn.device)
    out = out.scatter_reduce(1, index, pos, reduce="amax", include_self=True)
    return out[:, :num_turns]


def turn_rewards_to_tokens(
    turn_rewards: torch.Tensor,
    turn_mask: torch.Tensor,
    token_turn: torch.Tensor,
    action_mask: torch.Tensor,
) -> torch.Tensor:
    """Place each turn's reward on that turn's end token (the token-level reward of PPO/GAE).

    A turn that generated no token (a scripted or empty action) hands its reward to the
    end token of the latest earlier turn that did, so no reward is lost while any
    earlier action exists; rewards before the first generated token are dropped.

    Args:
      turn_rewards: (B, K) float.
      turn_mask: (B, K) bool, real turns.
      token_turn: (B, T) long.
      action_mask: (B, T) bool.

    Returns:
      (B, T) float, zero except on end tokens.
    """
    batch, num_turns = turn_rewards.shape
    ends = turn_end_positions(token_turn, action_mask, num_turns)
    # Turn end positions increase with k, so a running max forward-fills empty turns.
    filled = torch.cummax(ends, dim=1).values if num_turns > 0 else ends
    keep = turn_mask.bool() & (filled >= 0)
    rewards = torch.where(keep, turn_rewards, torch.zeros((), dtype=turn_rewards.dtype, device=turn_rewards.device))
    out = torch.zeros(token_turn.shape, dtype=turn_rewards.dtype, device=turn_rewards.device)
    return out.scatter_add(1, filled.clamp(min=0), rewards)


# --------------------------------------------------------------------------- perceptual hash


def phash(image: np.ndarray, *, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """64-bit DCT perceptual hash of an image (Zauner 2010, "Implementation and
    Benchmarking of Perceptual Image Hash Functions", §3.2; the variant popularised by
    ``imagehash.phash``).

    Steps: luma (ITU-R BT.601 weights), area-average down to ``N x N`` with
    ``N = hash_size * highfreq_factor`` (32), 2-D DCT-II, keep the top-left
    ``hash_size x hash_size`` low-frequency block, and set one bit per coefficient that
    is above the block's median. Similar images differ in few bits: compare with
    :func:`hamming_distance`. Because the resize is an area average rather than PIL's
    filter, values differ slightly from ``imagehash``.

    Args:
      image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, any numeric dtype
        (uint8 RGB as produced by ``RGBImage``); alpha is ignored.

    Returns:
      A non-negative int below ``2 ** (hash_size ** 2)``; bit order is row-major, the
      first coefficient in the most significant bit.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        gray = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif img.ndim == 3 and img.shape[2] == 1:
        gray = img[..., 0].astype(np.float32)
    elif img.ndim == 2:
        gray = img.astype(np.float32)
    else:
        raise ValueError(f"phash needs an (H, W) or (H, W, C) image with C in 1, 3, 4; got shape {img.shape}")
    if gray.shape[0] == 0 or gray.shape[1] == 0:
        raise ValueError(f"phash needs a non-empty image; got shape {img.shape}")
    size = hash_size * highfreq_factor
    small = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(gray))[None, None], (size, size))
    coeffs = dctn(small[0, 0].numpy().astype(np.float64), type=2, norm="ortho")
    low = coeffs[:hash_size, :hash_size].ravel()
    bits = low > np.median(low)
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits between two hashes from :func:`phash`."""
    return (int(a) ^ int(b)).bit_count()


def _popcount_u64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    as_bytes = x.astype(np.uint64).view(np.uint8).reshape(*x.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1).astype(np.int64)


def _as_hash(key: Any) -> int | None:
    """The hash in an image key (int, ``"phash:<hex>"`` or an image array), else None."""
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"state key {key!r} is a bool; use a string, a perceptual hash (int) or an image")
    if isinstance(key, (int, np.integer)):
        if key < 0 or key >= 2**64:
            raise ValueError(f"perceptual hash {key} is outside [0, 2**64); use phash() to build one")
        return int(key)
    if isinstance(key, str) and key.startswith(PHASH_PREFIX):
        try:
            return int(key[len(PHASH_PREFIX) :], 16)
        except ValueError:
            raise ValueError(f"state key {key!r} starts with {PHASH_PREFIX!r} but is not a hex hash") from None
    if isinstance(key, np.ndarray):
        return phash(key)
    return None


def anchor_ids(
    keys: Sequence[Sequence[Any]],
    group_ids: Sequence[int] | torch.Tensor | None = None,
    *,
    tolerance: int = 0,
    num_turns: int | None = None,
) -> torch.Tensor:
    """Turn env state keys into integer anchor ids for GiGPO step groups.

    Each ``keys[b][k]`` is the env's state key before turn ``k`` of trajectory ``b``:
      - a ``str``: matched exactly (discrete states: board, room, page URL, ...);
      - an ``int`` perceptual hash, a string ``"phash:<hex>"``, or an image array (hashed
        with :func:`phash`): matched within ``tolerance`` differing bits, inside each
        episode group only;
      - ``None``: no anchor, id ``-1`` (the step gets no step-level advantage).

    Matching within a tolerance is not transitive, so hashes are clustered by single
    linkage: two steps share an id when a chain of steps, each within ``tolerance`` bits
    of the next, connects them (connected components of the "within tolerance" graph).
    This does not depend on the order of the steps, so permuting trajectories permutes
    their ids' equalities and nothing else. Keep ``tolerance`` small (0-6 of 64 bits):
    a large one chains different states together.

    Ids are only meaningful together with the group id (GiGPO groups by
    ``(group_id, anchor_id)``); equal strings get equal ids across the whole batch.

    Args:
      keys: B rows of up to K keys (ragged rows are padded with ``-1``).
      group_ids: (B,) episode group of each row; ``None`` puts all rows in one group.
      tolerance: largest Hamming distance at which two hashes are the same state.
      num_turns: pad every row to this K (default: the longest row).

    Returns:
      (B, K) long tensor of anchor ids, ``-1`` where there is no key.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 bits, got {tolerance}")
    batch = len(keys)
    width = max((len(row) for row in keys), default=0)
    if num_turns is not None:
        if num_turns < width:
            raise ValueError(f"num_turns={num_turns} is shorter than the longest row of keys ({width})")
        width = num_turns
    if group_ids is None:
        groups = [0] * batch
    else:
        groups = [int(g) for g in (group_ids.tolist() if isinstance(group_ids, torch.Tensor) else group_ids)]
        if len(groups) != batch:
            raise ValueError(f"group_ids has {len(groups)} entries but keys has {batch} rows")

    out = np.full((batch, width), -1, dtype=np.int64)
    string_ids: dict[str, int] = {}
    next_id = 0
    hashed: dict[int, list[tuple[int, int, int]]] = {}  # group -> [(b, k, hash)]
    for b, row in enumerate(keys):
        for k, key in enumerate(row):
            if key is None:
                continue
            h = _as_hash(key)
            if h is not None:
                hashed.setdefault(groups[b], []).append((b, k, h))
            elif isinstance(key, str):
                if key not in string_ids:
                    string_ids[key] = next_id
                    next_id += 1
                out[b, k] = string_ids[key]
            else:
                raise TypeError(
                    f"state key {key!r} at row {b}, turn {k} has type {type(key).__name__}; "
                    "use a string, a perceptual hash (int), an image array, or None"
                )

    for group in sorted(hashed):
        entries = hashed[group]
        values = np.array([h for _, _, h in entries], dtype=np.uint64)
        if tolerance == 0:
            _, labels = np.unique(values, return_inverse=True)
            count = int(labels.max()) + 1 if len(labels) else 0
        else:
            close = _popcount_u64(values[:, None] ^ values[None, :]) <= tolerance
            rows, cols = np.nonzero(close)
            graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(values), len(values)))
            count, labels = connected_components(graph, directed=False)
        for (b, k, _), label in zip(entries, labels.reshape(-1)):
            out[b, k] = next_id + int(label)
        next_id += int(count)
    return torch.from_numpy(out)
