"""Multi-turn group rollouts on ChainOfFocus: the embedded model and scripted policies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import mmgym  # noqa: F401  (registers env ids)
from mmgym.agents import (
    Conversation,
    Generation,
    RolloutCollector,
    RolloutSettings,
    SamplingParams,
    ScriptedPolicy,
    build_rollout_batch,
)
from mmgym.agents.scripted import OracleAgent, RandomAgent


class Spy:
    """Wraps a policy; records every call's conversations and generations."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.calls: list[tuple[list[Conversation], list[Generation]]] = []

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[Generation]:
        gens = self.policy.generate(conversations, sampling)
        self.calls.append((list(conversations), gens))
        return gens

    def logprobs(self, batch):
        return self.policy.logprobs(batch)

    def replies_by_episode(self) -> list[list[Generation]]:
        order = [id(c) for c in self.calls[0][0]]
        out: dict[int, list[Generation]] = {k: [] for k in order}
        for convs, gens in self.calls:
            for c, g in zip(convs, gens):
                out[id(c)].append(g)
        return [out[k] for k in order]


def _image_runs(ids: list[int], image_id: int) -> list[int]:
    runs, n = [], 0
    for t in ids + [-1]:
        if t == image_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_embedded_model_on_chain_of_focus_group_of_8(tiny_policy):
    """The acceptance test: 8 episodes, up to 3 turns, exact masks and log-probs."""
    tiny_policy.vision_stats.reset()
    spy = Spy(tiny_policy)
    settings = RolloutSettings(sampling=SamplingParams(temperature=1.0, max_new_tokens=24, seed=0), max_turns=3)
    col = RolloutCollector(lambda: gym.make("mmgym/ChainOfFocus-v0"), num_tasks=1, group_size=8, settings=settings)
    trajs = col.collect(spy, seeds=[7])
    col.close()
    assert len(trajs) == 8 and {t.group for t in trajs} == {0}
    assert len({t.task_id for t in trajs}) == 1  # one task per group
    replies = spy.replies_by_episode()
    image_id = tiny_policy.image_token_id
    for tr, gens in zip(trajs, replies):
        assert 1 <= tr.num_turns <= 3 and tr.error is None and tr.dropped_turns == 0
        assert tr.termination_reason in ("answer", "max_invalid", "max_turns")
        assert len(gens) == tr.num_turns
        # the action mask covers exactly the generated tokens, turn by turn
        masked = [t for t, m in zip(tr.token_ids, tr.action_mask) if m]
        assert masked == [t for g in gens for t in g.token_ids]
        for turn, g in zip(tr.turns, gens):
            s, e = turn.token_span
            assert tr.token_ids[s:e] == g.token_ids and all(tr.action_mask[s:e])
            assert turn.action == g.text
            assert turn.state_key is not None
        assert sum(tr.action_mask) == sum(e - s for s, e in (t.token_span for t in tr.turns))
        # every image is whole: as many tokens as its features
        grid = tr.info["model_inputs"].media["image_grid_thw"]
        assert len(grid) == sum(t.num_images for t in tr.turns)
        assert _image_runs(tr.token_ids, image_id) == (grid.prod(-1) // 4).tolist()
        assert tr.total_reward == pytest.approx(sum(t.reward for t in tr.turns))
    # one vision encode per image shown to the model
    shown = sum(t.num_images for tr in trajs for t in tr.turns)
    assert tiny_policy.vision_stats.images_encoded == shown
    # a reply cut by max_new_tokens is just malformed output for the env
    assert sum(tr.info.get("truncated_replies", 0) for tr in trajs) > 0
    batch = build_rollout_batch(trajs, tiny_policy.pad_token_id)
    assert batch.turn_mask.sum().item() == sum(t.num_turns for t in trajs)
    assert (batch.state_keys[batch.turn_mask] >= 0).all()
    with torch.no_grad():
        lp = tiny_policy.logprobs(batch)
    diff = (lp - batch.old_logprobs)[batch.action_mask].abs().max().item()
    assert diff < 1e-4


def test_rollout_over_budget_drops_old_turns(tiny_policy):
    """A context too short for 3 turns: old turns are dropped and recorded, training works."""
    spy = Spy(tiny_policy)
    settings = RolloutSettings(sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=1), max_turns=3)
    col = RolloutCollector("mmgym/ChainOfFocus-v0", num_tasks=1, group_size=2, settings=settings, env_kwargs={"max_invalid": 5})
    first = col.collect(spy, seeds=[3])  # probe lengths with the full context
    lengths = [len(t.token_ids) for t in first]
    old = tiny_policy.max_context
    tiny_policy.max_context = min(lengths) - 40
    try:
        trajs = col.collect(spy, seeds=[3])
    finally:
        tiny_policy.max_context = old
        col.close()
    assert all(t.num_turns == 3 for t in trajs)
    assert all(t.dropped_turns == 1 for t in trajs)
    for tr in trajs:
        assert len(tr.token_ids) <= min(lengths) - 40
        assert tr.turns[1].token_span is None  # its reply left the context
        kept = [t for t in tr.turns if t.index not in (1,)]
        grid = tr.info["model_inputs"].media.get("image_grid_thw")
        assert grid is not None and len(grid) == sum(t.num_images for t in kept)
        assert _image_runs(tr.token_ids, tiny_policy.image_token_id) == (grid.prod(-1) // 4).tolist()
    batch = build_rollout_batch(trajs, tiny_policy.pad_token_id)
    with torch.no_grad():
        lp = tiny_policy.logprobs(batch)
    assert torch.allclose(lp[batch.action_mask], batch.old_logprobs[batch.action_mask], atol=1e-4)


def test_scripted_policies_use_the_same_path():
    col = RolloutCollector("mmgym/ChainOfFocus-v0", num_tasks=2, group_size=2,
                           settings=RolloutSettings(sampling=SamplingParams(max_new_tokens=8)))
    oracle = col.collect(ScriptedPolicy.from_agent(OracleAgent()), seeds=[0, 1])
    assert [t.group for t in oracle] == [0, 0, 1, 1]
    assert all(t.success and t.termination_reason == "answer" for t in oracle)
    assert any(t.num_tool_calls > 0 for t in oracle)
    assert all(t.token_ids == [] and t.turns[0].token_span is None for t in oracle)
    rand = col.collect(ScriptedPolicy.from_agent(RandomAgent(seed=0)), seeds=[0, 1])
    assert len(rand) == 4 and all(t.termination_reason for t in rand)
    batch = build_rollout_batch(oracle + rand, pad_id=0)
    assert batch.input_ids.shape[0] == 8 and batch.success[:4].all()
    drawn = col.collect(ScriptedPolicy(lambda conv: "<answer>A</answer>"))  # no seeds: drawn per group
    assert drawn[0].task_id == drawn[1].task_id != drawn[2].task_id == drawn[3].task_id
    col.close()


def test_finished_episodes_leave_the_batch():
    """Episode i answers at turn i: generate sees 4, 3, 2, 1 conversations."""

    def act(conv: Conversation) -> str:
        k = conv.turn
        if k >= conv.meta["slot"]:
            return "<answer>A</answer>"
        return '<tool_call>{"name": "zoom", "arguments": {"bbox": [0, 0, 300, 300]}}</tool_call>'

    seen: list[Conversation] = []

    def tag(conv: Conversation) -> str:
        if all(c is not conv for c in seen):
            seen.append(conv)
        conv.meta["slot"] = next(i for i, c in enumerate(seen) if c is conv)
        return act(conv)

    spy = Spy(ScriptedPolicy(tag))
    col = RolloutCollector("mmgym/ChainOfFocus-v0", num_tasks=1, group_size=4)
    trajs = col.collect(spy, seeds=[0])
    col.close()
    assert [len(convs) for convs, _ in spy.calls] == [4, 3, 2, 1]
    assert [t.num_turns for t in trajs] == [1, 2, 3, 4]
    assert [t.termination_reason for t in trajs] == ["answer"] * 4


class _PickyImageEnv(gym.Env):
    """One image per task; task seed 13 sends an image no processor accepts."""

    def __init__(self):
        self.observation_space = gym.spaces.Dict({})
        self.action_space = gym.spaces.Text(10)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        img = np.zeros((1, 600, 3), np.uint8) if seed == 13 else np.full((56, 56, 3), 128, np.uint8)
        obs = {"text": "<image>\nAnswer.", "images": (img,), "frames": (), "frame_times": (), "source": 0, "turn": 0}
        return obs, {"task_id": f"picky-{seed}", "tool_schemas": [], "max_turns": 1}

    def step(self, action):
        obs = {"text": "done", "images": (), "frames": (), "frame_times": (), "source": 2, "turn": 1}
        return obs, 1.0, True, False, {"state_key": "s", "reward_terms": {"acc": 1.0}, "success": True,
                                       "termination_reason": "answer", "score": 1.0}


def test_rejected_image_is_recorded_and_the_batch_goes_on(tiny_policy):
    col = RolloutCollector(_PickyImageEnv, num_tasks=2, group_size=2,
                           settings=RolloutSettings(sampling=SamplingParams(max_new_tokens=4)))
    trajs = col.collect(tiny_policy, seeds=[13, 14])
    bad, good = trajs[:2], trajs[2:]
    assert all(t.error and "rejected" in t.error and t.termination_reason == "env_error" for t in bad)
    assert all(t.num_turns == 0 and t.token_ids == [] for t in bad)
    assert all(t.error is None and t.success and t.num_turns == 1 and sum(t.action_mask) > 0 for t in good)
    batch = build_rollout_batch(trajs, tiny_policy.pad_token_id)
    with torch.no_grad():
        lp = tiny_policy.logprobs(batch)
    assert torch.allclose(lp[batch.action_mask], batch.old_logprobs[batch.action_mask], atol=1e-4)
