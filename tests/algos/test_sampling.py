"""DAPO dynamic sampling and overlong shaping; uniform and VADE task samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmgym.algos import (
    SAMPLERS,
    TaskSampler,
    UniformSampler,
    VADESampler,
    collect_dynamic_batches,
    dynamic_sampling_filter,
    overlong_shaping,
)


def test_dynamic_sampling_filter_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.5, 0.5])
    groups = torch.tensor([5, 5, 5, 5, 9, 9, 3, 1, 1])
    # group 5 mixed: kept; group 9 all 0; group 3 alone; group 1 all 0.5: dropped
    keep = dynamic_sampling_filter(rewards, groups)
    assert keep.tolist() == [True] * 4 + [False] * 5


def test_dynamic_sampling_filter_matches_loop():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 40):
        rewards = torch.randint(0, 2, (n,), generator=g).float()
        groups = torch.randint(0, 6, (n,), generator=g) * 11
        keep = dynamic_sampling_filter(rewards, groups)
        for i in range(n):
            members = {float(rewards[j]) for j in range(n) if groups[j] == groups[i]}
            assert keep[i].item() == (len(members) > 1)


def test_collect_dynamic_batches_refills_and_trims():
    # each generation batch: 3 groups of 2; group 0 always all-correct (uninformative)
    def generate(i):
        rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
        groups = torch.tensor([0, 0, 1, 1, 2, 2]) + 10 * i
        return f"batch{i}", rewards, groups

    res = collect_dynamic_batches(generate, num_groups=3, max_gen_batches=5)
    assert res.filled and res.num_groups == 3 and res.num_gen_batches == 2
    assert res.batches == ["batch0", "batch1"]
    assert res.keep[0].tolist() == [False, False, True, True, True, True]
    assert res.keep[1].tolist() == [False, False, True, True, False, False]  # trimmed to 3 groups

    res = collect_dynamic_batches(generate, num_groups=10, max_gen_batches=2)
    assert not res.filled and res.num_groups == 4 and res.num_gen_batches == 2


def test_overlong_shaping_by_hand():
    # L_max 10, buffer 4 -> L_exp 6
    pen = overlong_shaping(torch.tensor([5, 6, 8, 10, 12]), max_len=10, buffer=4)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    pen = overlong_shaping(torch.tensor([9]), max_len=10, buffer=4, penalty_factor=2.0)
    torch.testing.assert_close(pen, torch.tensor([-1.5]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_shaping(torch.tensor([1]), max_len=4, buffer=5)


def test_sampler_registry_and_protocol():
    assert SAMPLERS.names() == ["uniform", "vade"]
    for name in SAMPLERS.names():
        s = SAMPLERS.get(name)(num_tasks=5)
        assert isinstance(s, TaskSampler)
        picks = s.select(3, np.random.default_rng(0))
        assert len(picks) == 3 and len(set(picks)) == 3 and all(isinstance(i, int) for i in picks)
        s.update(picks, [1.0, 0.0, 1.0])
        assert sorted(s.select(12, np.random.default_rng(0))) == sorted(list(range(5)) * 2 + s.select(2, np.random.default_rng(0)))


def test_uniform_sampler_state_roundtrip():
    s = UniformSampler(4)
    state = json.loads(json.dumps(s.state_dict()))
    UniformSampler(4).load_state_dict(state)
    with pytest.raises(ValueError, match="state is for 4 tasks"):
        UniformSampler(5).load_state_dict(state)


def test_vade_update_by_hand():
    s = VADESampler(3, fast_decay=0.5, slow_decay=1.0)
    s.update([0, 0, 0], [1, 1, 0])
    # alpha = 1 + 2 successes, beta = 1 + 1 failure
    assert s.alpha.tolist() == [3.0, 1.0, 1.0] and s.beta.tolist() == [2.0, 1.0, 1.0]
    s.update([0], [1.0])
    # old evidence halves toward the prior first: alpha 1 + 0.5*2 + 1 = 3, beta 1 + 0.5*1 = 1.5
    assert s.alpha.tolist() == [3.0, 1.0, 1.0] and s.beta.tolist() == [1.5, 1.0, 1.0]
    slow = VADESampler(2, fast_decay=1.0, slow_decay=0.9)
    slow.update([0, 0], [1, 1])
    slow.update([1], [0])
    # task 0 not seen in the second update: alpha 1 + 0.9 * 2 = 2.8
    assert slow.alpha[0] == pytest.approx(2.8) and slow.beta[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="task ids must lie in"):
        s.update([3], [1])
    with pytest.raises(ValueError, match="successes must lie in"):
        s.update([0], [2.0])


def test_vade_prefers_tasks_near_half():
    s = VADESampler(3)
    s.alpha = np.array([50.0, 200.0, 1.0])
    s.beta = np.array([50.0, 1.0, 200.0])
    rng = np.random.default_rng(0)
    picks = [s.select(1, rng)[0] for _ in range(50)]
    assert picks.count(0) == 50


def test_vade_learns_which_tasks_are_informative():
    # tasks 0-4 always solved, 5-9 never, 10-14 half the time: VADE should focus on 10-14
    rng = np.random.default_rng(1)
    s = VADESampler(15)
    p = np.array([1.0] * 5 + [0.0] * 5 + [0.5] * 5)
    for _ in range(40):
        tasks = s.select(5, rng)
        ids = [i for i in tasks for _ in range(8)]
        s.update(ids, (rng.random(len(ids)) < p[ids]).astype(float))
    late = [i for _ in range(20) for i in s.select(5, rng)]
    assert np.mean([i >= 10 for i in late]) > 0.8


def test_vade_state_roundtrip_reproduces_selection():
    s = VADESampler(6, fast_decay=0.7)
    s.update([0, 1, 1, 2], [1, 0, 1, 0])
    state = json.loads(json.dumps(s.state_dict()))
    t = VADESampler(6)
    t.load_state_dict(state)
    assert t.state_dict() == s.state_dict()
    assert t.select(3, np.random.default_rng(5)) == s.select(3, np.random.default_rng(5))
    with pytest.raises(ValueError, match="expected 'vade'"):
        t.load_state_dict(UniformSampler(6).state_dict())
