"""``tool_argument_positions``: which generated tokens spell tool-call argument values."""

from __future__ import annotations

import pytest

from mmgym.agents.tokens import tool_argument_positions
from mmgym.core import Trajectory
from mmgym.core.records import Turn


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from mmgym.trainer.common import model_dir

    return AutoTokenizer.from_pretrained(model_dir("embedded:focus_warm"))


def _traj(tok, replies: list[str]) -> Trajectory:
    """A trajectory whose turns are ``prompt reply`` pairs (prompt tokens: action mask 0)."""
    tr = Trajectory(task_id="t")
    for k, reply in enumerate(replies):
        prompt = tok(f"turn {k}: region 7 of 16 \"arguments\": {{\"region\": 3}}")["input_ids"]
        gen = tok(reply)["input_ids"]
        lo = len(tr.token_ids) + len(prompt)
        tr.token_ids += prompt + gen
        tr.action_mask += [0] * len(prompt) + [1] * len(gen)
        tr.logprobs += [0.0] * (len(prompt) + len(gen))
        tr.turns.append(Turn(index=k, observation="", action=reply, token_span=(lo, lo + len(gen))))
    return tr


@pytest.mark.parametrize("reply, values", [
    ('<tool_call>{"name": "zoom", "arguments": {"region": 14}}</tool_call>', "14"),
    ('<tool_call>{"name": "zoom", "arguments": {"region": 3}}</tool_call>', "3"),
    ('<tool_call>{"name": "zoom", "arguments": {"bbox": [10, 20, 30.5, 40]}}</tool_call>', "[10,20,30.5,40]"),
    ('<tool_call>{"name": "ask", "arguments": {"question": "Is it red: yes?"}}</tool_call>', '"Is it red: yes?"'),
    ('<tool_call>{"name": "crop_video", "arguments": {"start_time": 1.5, "end_time": 9}}</tool_call>', "1.59"),
])
def test_only_the_argument_values_are_selected(tok, reply: str, values: str) -> None:
    tr = _traj(tok, [reply])
    pos, skipped = tool_argument_positions(tr, tok.decode)
    assert skipped == 0
    lo, hi = tr.turns[0].token_span
    assert all(lo <= j < hi for j in pos)  # generated tokens only: the prompt's "region": 3 is not touched
    picked = "".join(tok.decode([tr.token_ids[j]]) for j in pos).replace(" ", "")
    assert picked == values.replace(" ", "")
    rest = tok.decode([t for j, t in enumerate(tr.token_ids[lo:hi], lo) if j not in pos])
    assert '"name"' in rest and '"arguments"' in rest and "<tool_call>" in rest  # format tokens stay


def test_answers_and_several_turns(tok) -> None:
    tr = _traj(tok, ['<tool_call>{"name": "zoom", "arguments": {"region": 9}}</tool_call>', "<answer>red 9</answer>"])
    pos, _ = tool_argument_positions(tr, tok.decode)
    assert [tok.decode([tr.token_ids[j]]) for j in pos] == ["9"]  # the answer's 9 is not a tool argument
    assert tool_argument_positions(Trajectory(task_id="empty"), tok.decode) == ([], 0)


def test_a_reply_whose_pieces_do_not_decode_to_its_text_is_skipped(tok) -> None:
    tr = _traj(tok, ['<tool_call>{"name": "zoom", "arguments": {"region": 5}}</tool_call>'])

    def lossy(ids: list[int]) -> str:  # pieces and whole differ: no char offsets to trust
        return tok.decode(ids) + ("" if len(ids) == 1 else "!")

    assert tool_argument_positions(tr, lossy) == ([], 1)
