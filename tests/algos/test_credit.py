"""Turn -> token broadcasting, perceptual hashes and anchor ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgym.algos import (
    ESTIMATORS,
    AdvantageInputs,
    EstimatorConfig,
    anchor_ids,
    broadcast_turn_values,
    hamming_distance,
    phash,
    turn_end_positions,
    turn_rewards_to_tokens,
)

TT = torch.tensor([[-1, 0, 0, -1, 1, -1], [-1, -1, 0, 2, 2, -1]])
AM = TT >= 0


def test_broadcast_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = broadcast_turn_values(values, TT, AM)
    assert out.tolist() == [[0, 1, 1, 0, 2, 0], [0, 0, 4, 6, 6, 0]]
    # a generated token with turn -1 or >= K gets 0, as does a masked one
    odd = broadcast_turn_values(values[:, :2], TT, AM)
    assert odd.tolist() == [[0, 1, 1, 0, 2, 0], [0, 0, 4, 0, 0, 0]]


def test_broadcast_matches_loop():
    g = torch.Generator().manual_seed(0)
    for bsz, length, k in [(1, 1, 1), (5, 9, 3), (7, 20, 6)]:
        tt = torch.randint(-1, k + 1, (bsz, length), generator=g)
        am = torch.rand(bsz, length, generator=g) > 0.2
        vals = torch.randn(bsz, k, generator=g)
        out = broadcast_turn_values(vals, tt, am)
        for i in range(bsz):
            for j in range(length):
                kk = int(tt[i, j])
                want = float(vals[i, kk]) if am[i, j] and 0 <= kk < k else 0.0
                assert out[i, j].item() == want


def test_turn_end_positions_and_rewards_by_hand():
    assert turn_end_positions(TT, AM, 3).tolist() == [[2, 4, -1], [2, -1, 4]]
    rewards = torch.tensor([[0.5, 1.0, 0.0], [0.1, 0.2, 0.3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = turn_rewards_to_tokens(rewards, mask, TT, AM)
    # row 1: turn 1 has no token, its 0.2 joins turn 0's end token (position 2)
    torch.testing.assert_close(out, torch.tensor([[0, 0, 0.5, 0, 1.0, 0], [0, 0, 0.3, 0, 0.3, 0]]))


# --------------------------------------------------------------------------- phash


def _scene(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size - 24, 2)
        w, h = rng.integers(8, 24, 2)
        img[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return img


def test_phash_is_deterministic_and_64_bit():
    img = _scene(0)
    h = phash(img)
    assert h == phash(img.copy()) and 0 <= h < 2**64
    assert phash(img[..., 0]) == phash(img[..., :1])  # (H, W) and (H, W, 1) agree
    with pytest.raises(ValueError, match="phash needs"):
        phash(np.zeros((4, 4, 2)))


def test_phash_tolerates_noise_and_rescaling_but_separates_scenes():
    img = _scene(1)
    rng = np.random.default_rng(0)
    noisy = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    bigger = img.repeat(2, axis=0).repeat(2, axis=1)
    h = phash(img)
    assert hamming_distance(h, phash(noisy)) <= 4
    assert hamming_distance(h, phash(bigger)) <= 4
    others = [hamming_distance(h, phash(_scene(s))) for s in range(2, 8)]
    assert min(others) > 10, others


# --------------------------------------------------------------------------- anchor ids


def test_anchor_ids_exact_strings():
    ids = anchor_ids([["a", "b", None], ["a", "c"], ["b"]], [0, 0, 1])
    assert ids.shape == (3, 3) and ids.dtype == torch.long
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] == ids[2, 0]
    assert ids[0, 1] != ids[1, 1]
    assert ids[0, 2] == -1 and ids[1, 2] == -1
    assert anchor_ids([["x"]], num_turns=4).tolist() == [[0, -1, -1, -1]]


def test_anchor_ids_hashes_within_tolerance_by_group():
    base = 0b1011_0000
    keys = [
        [base, base ^ 0b1],  # distance 1
        [base ^ 0b11, base ^ 0xFF00],  # 2 bits from base; 8+ bits from everything
        [base],  # other group: same hash, different group
    ]
    exact = anchor_ids(keys, [0, 0, 1], tolerance=0)
    assert len({exact[0, 0].item(), exact[0, 1].item(), exact[1, 0].item()}) == 3
    loose = anchor_ids(keys, [0, 0, 1], tolerance=1)
    # base~base^1 (1 bit) and base^1~base^3 (1 bit): chained into one state
    assert loose[0, 0] == loose[0, 1] == loose[1, 0]
    assert loose[1, 1] not in (loose[0, 0],)
    assert loose[2, 0] != loose[0, 0]  # groups never share hash anchors
    # "phash:<hex>" strings are hashes too
    as_text = anchor_ids([[f"phash:{base:016x}", f"phash:{base ^ 1:016x}"]], tolerance=1)
    assert as_text[0, 0] == as_text[0, 1]


def test_anchor_ids_do_not_depend_on_order():
    rng = np.random.default_rng(3)
    hashes = [int(x) for x in rng.integers(0, 2**16, 30)]
    keys = [[h] for h in hashes]
    ids = anchor_ids(keys, tolerance=3)[:, 0]
    perm = rng.permutation(30)
    ids_p = anchor_ids([keys[i] for i in perm], tolerance=3)[:, 0]
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    same_p = ids_p.unsqueeze(0) == ids_p.unsqueeze(1)
    assert torch.equal(same[perm][:, perm], same_p)


def test_anchor_ids_reject_bad_keys():
    with pytest.raises(TypeError, match="has type float"):
        anchor_ids([[1.5]])
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        anchor_ids([["a"]], tolerance=-1)
    with pytest.raises(ValueError, match="group_ids has 1 entries but keys has 2 rows"):
        anchor_ids([["a"], ["b"]], [0])


def test_gigpo_groups_image_states_by_perceptual_hash():
    # Two episodes of one group start from the same scene, rendered with sensor noise, so
    # exact keys differ but perceptual hashes match: GiGPO must form a step group there.
    scene = _scene(4)
    rng = np.random.default_rng(1)
    frames = [np.clip(scene.astype(int) + rng.integers(-6, 7, scene.shape), 0, 255).astype(np.uint8) for _ in range(2)]
    assert not np.array_equal(frames[0], frames[1])
    keys = [[frames[0], _scene(5)], [frames[1], _scene(6)]]
    ids = anchor_ids(keys, [0, 0], tolerance=6)
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] != ids[1, 1]
    inputs = AdvantageInputs(
        action_mask=torch.ones(2, 2, dtype=torch.bool),
        token_turn=torch.tensor([[0, 1], [0, 1]]),
        turn_rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
        turn_mask=torch.ones(2, 2, dtype=torch.bool),
        state_keys=ids,
        group_ids=torch.tensor([0, 0]),
        outcome=torch.tensor([1.0, 0.0]),
        first_tool_turn=torch.tensor([2, 2]),
    )
    adv = ESTIMATORS.get("gigpo")(inputs, EstimatorConfig(estimator="gigpo", step_gamma=0.5)).advantages
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.5], [-0.75, -0.5]]))
