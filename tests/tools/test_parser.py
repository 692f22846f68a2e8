from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mmgym.core import ToolCall
from mmgym.tools import get_parser

P = get_parser("hermes")


def test_single_and_multiple_calls() -> None:
    r = P.parse('<think>look</think><tool_call>{"name": "zoom", "arguments": {"bbox": [1, 2, 3, 4]}}</tool_call>')
    assert r.error is None and r.tool_calls == [ToolCall("zoom", {"bbox": [1, 2, 3, 4]}, r.tool_calls[0].raw)]
    r = P.parse('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert [c.name for c in r.tool_calls] == ["a", "b"] and r.tool_calls[1].arguments == {"x": 1}


def test_answer_and_errors() -> None:
    assert P.parse("<answer> B </answer>").answer == "B"
    assert "no <tool_call> or <answer>" in P.parse("the answer is B").error
    assert "unbalanced" in P.parse("<answer>B").error
    assert "not valid JSON" in P.parse("<tool_call>{bad}</tool_call>").error
    assert "either tool calls or an <answer>" in P.parse('<tool_call>{"name": "z"}</tool_call><answer>A</answer>').error
    assert "empty" in P.parse("<answer>  </answer>").error
    assert "too long" in P.parse("<answer>" + "a" * 30000 + "</answer>").error
    assert P.parse(123).error  # type: ignore[arg-type]


def test_format_round_trip() -> None:
    call = ToolCall("zoom", {"region": 3})
    r = P.parse(P.format_call(call))
    assert r.tool_calls[0].to_json() == call.to_json()
    assert P.parse(P.format_answer("C")).answer == "C"


_pieces = st.sampled_from([
    "<tool_call>", "</tool_call>", "<answer>", "</answer>", "<think>", "</think>", "{", "}", "[", "]", '"name"', '"arguments"',
    ":", ",", '"zoom"', "1e999", "-1e308", "NaN", "Infinity", "null", "中", "🙂", "\x00", "\\u0000", "<image>", "9" * 40,
])
_garbage = st.lists(st.one_of(_pieces, st.text(max_size=20)), max_size=30).map("".join)
_json_call = st.fixed_dictionaries({"name": st.one_of(st.text(max_size=10), st.integers()), "arguments": st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.integers(), st.text(max_size=10)),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=5), c, max_size=4)), max_leaves=10)})


@settings(max_examples=1000, deadline=None)
@given(_garbage)
def test_parser_never_raises_on_garbage(text: str) -> None:
    r = P.parse(text)
    assert (r.error is None) == r.format_ok or r.error is not None


@settings(max_examples=300, deadline=None)
@given(_json_call, st.integers(0, 20))
def test_parser_never_raises_on_truncated_json(call: dict, cut: int) -> None:
    body = json.dumps(call, allow_nan=True)
    text = "<tool_call>" + body[: max(0, len(body) - cut)] + "</tool_call>"
    r = P.parse(text)
    if cut == 0 and isinstance(call["name"], str) and call["name"] and isinstance(call["arguments"], dict):
        assert r.error is None and r.tool_calls[0].name == call["name"]
