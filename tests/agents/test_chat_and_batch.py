"""Conversations, scripted policies and the RolloutBatch builder (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmgym.agents import (
    Conversation,
    Generation,
    Message,
    Policy,
    SamplingParams,
    ScriptedPolicy,
    build_rollout_batch,
    content_parts,
    observation_message,
)
from mmgym.core import ToolCall, Trajectory, Turn


def _img(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v, np.uint8)


def test_content_parts_replace_placeholders_in_order():
    a, b = _img(1), _img(2)
    parts = content_parts("look <image> and <image>!", (a, b))
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert parts[1]["image"] is a and parts[3]["image"] is b
    assert "".join(p.get("text", "") for p in parts) == "look  and !"


def test_content_parts_keep_unmatched_media_and_placeholders():
    parts = content_parts("no placeholder", (_img(1),))
    assert [p["type"] for p in parts] == ["image", "text"]
    parts = content_parts("<image> <image>", (_img(1),))  # one image too few: literal text stays
    assert [p["type"] for p in parts] == ["image", "text"]
    assert parts[1]["text"] == " <image>"
    parts = content_parts("clip: <video>", (), (_img(1), _img(2)))
    assert [p["type"] for p in parts] == ["text", "video"] and len(parts[1]["video"]) == 2


def test_observation_message_roles_and_drop_turn():
    obs = {"text": "<image>task", "images": (_img(0),), "frames": (), "frame_times": (), "source": 0, "turn": 0}
    conv = Conversation(system="sys")
    conv.add_observation(obs, turn=0)
    conv.add_action("<tool_call>{}</tool_call>")
    tool = dict(obs, text="zoomed <image>", source=1)
    assert observation_message(tool, turn=1, tool_result_role="tool").role == "tool"
    conv.add_observation(tool, turn=1)
    conv.add_action("<answer>A</answer>")
    assert conv.messages[2].role == "user" and conv.turns_present() == [0, 1]
    chat = conv.to_chat(with_media=False)
    assert chat[0]["role"] == "system" and chat[1]["content"][0] == {"type": "image"}
    conv.drop_turn(1)
    assert conv.turns_present() == [0] and conv.dropped_turns == 1 and len(conv.images()) == 1
    with pytest.raises(ValueError, match="turn 0"):
        conv.drop_turn(0)


def test_sampling_params_validation():
    assert SamplingParams(temperature=0).logprob_temperature == 1.0
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_scripted_policy_is_a_policy():
    pol = ScriptedPolicy(lambda conv: f"<answer>{len(conv.messages)}</answer>")
    assert isinstance(pol, Policy)
    conv = Conversation(messages=[Message("user", "hi")])
    (g,) = pol.generate([conv], SamplingParams())
    assert g == Generation(text="<answer>1</answer>")
    with pytest.raises(TypeError, match="expected str"):
        ScriptedPolicy(lambda conv: 3).generate([conv], SamplingParams())
    with pytest.raises(ValueError, match="RolloutCollector"):
        ScriptedPolicy.from_agent(type("A", (), {"act": lambda *a: "x"})()).generate([conv], SamplingParams())


def _traj(group: int, ids: list[int], mask: list[int], turns: list[Turn]) -> Trajectory:
    return Trajectory(task_id=f"t{group}", group=group, turns=turns, token_ids=ids, action_mask=mask,
                      logprobs=[-0.5 * m for m in mask])


def test_build_rollout_batch_by_hand():
    t1 = _traj(0, [5, 6, 7, 8, 9], [0, 1, 1, 0, 1], [
        Turn(index=0, observation="a", reward=0.0, state_key="s0", token_span=(1, 3),
             tool_calls=(ToolCall("zoom", {}),)),
        Turn(index=1, observation="b", source=1, reward=1.0, state_key="s1", token_span=(4, 5)),
    ])
    t2 = _traj(1, [5, 6, 7], [0, 0, 1], [Turn(index=0, observation="a", reward=-0.1, state_key="s0", token_span=(2, 3))])
    b = build_rollout_batch([t1, t2], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert b.attention_mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert b.action_mask.tolist() == [[False, True, True, False, True], [False, False, True, False, False]]
    assert b.old_logprobs[0].tolist() == [0.0, -0.5, -0.5, 0.0, -0.5]
    assert b.token_turn.tolist() == [[-1, 0, 0, -1, 1], [-1, -1, 0, -1, -1]]
    assert b.turn_rewards.tolist() == [[0.0, 1.0], [pytest.approx(-0.1), 0.0]]
    assert b.turn_mask.tolist() == [[True, True], [True, False]]
    assert b.state_keys.tolist() == [[0, 1], [0, -1]]  # same anchor string -> same id
    assert b.group_ids.tolist() == [0, 1]
    assert b.outcome.tolist() == pytest.approx([1.0, -0.1])
    assert b.first_tool_turn.tolist() == [0, 1]  # turn 1 of t1 is a tool result; t2 has none
    assert b.extras["temperature"].tolist() == [1.0, 1.0]


def test_build_rollout_batch_rejects_inconsistent_lengths():
    bad = Trajectory(task_id="x", token_ids=[1, 2], action_mask=[1], logprobs=[0.0, 0.0])
    with pytest.raises(ValueError, match="differ in length"):
        build_rollout_batch([bad], pad_id=0)
    b = build_rollout_batch([Trajectory(task_id="scripted", turns=[Turn(index=0, observation="o")])], pad_id=0)
    assert b.input_ids.shape == (1, 0) and b.turn_mask.tolist() == [[True]]
    assert torch.equal(ScriptedPolicy(lambda c: "").logprobs(b), torch.zeros(1, 0))
