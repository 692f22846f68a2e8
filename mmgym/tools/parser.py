"""Turn a model's raw text into tool calls and/or a final answer.

Default format (Hermes / Qwen2.5 style)::

    <think>...</think>                                  (optional)
    <tool_call>{"name": "zoom", "arguments": {"bbox": [1, 2, 3, 4]}}</tool_call>
    <answer>B</answer>

Parsing is pure and never raises: any problem is reported in ``ParseResult.error``.
Other formats plug in through ``PARSERS``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmgym.core import Registry, ToolCall
from mmgym.core.text import tags_balanced

__all__ = ["ParseResult", "ToolParser", "HermesParser", "PARSERS", "get_parser", "tags_balanced"]

MAX_ACTION_CHARS = 20_000


@dataclass(slots=True)
class ParseResult:
    """``tool_calls`` and ``answer`` as found; ``error`` explains what was wrong (or ``None``)."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    error: str | None = None
    format_ok: bool = True  # tags balanced and the turn holds either calls or an answer

    @property
    def is_valid(self) -> bool:
        return self.error is None


class ToolParser(Protocol):
    name: str

    def parse(self, text: str) -> ParseResult: ...

    def format_call(self, call: ToolCall) -> str: ...

    def format_answer(self, answer: str) -> str: ...

    def instructions(self) -> str: ...


class HermesParser:
    """``<tool_call>{json}</tool_call>`` (several per turn) and ``<answer>...</answer>``."""

    name = "hermes"
    _call_re = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    _answer_re = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

    def parse(self, text: str) -> ParseResult:
        if not isinstance(text, str):
            return ParseResult(error=f"the action must be text, got {type(text).__name__}", format_ok=False)
        if len(text) > MAX_ACTION_CHARS:
            return ParseResult(error=f"the reply is too long ({len(text)} characters; at most {MAX_ACTION_CHARS})", format_ok=False)
        balanced = tags_balanced(text)
        calls: list[ToolCall] = []
        errors: list[str] = []
        for m in self._call_re.finditer(text):
            call, err = self._parse_call(m.group(1), m.group(0))
            if err is not None:
                errors.append(err)
            else:
                calls.append(call)
        answers = [a.strip() for a in self._answer_re.findall(text)]
        answer = answers[-1] if answers else None
        if not balanced:
            errors.insert(0, "unbalanced tags: every <tool_call>, <answer> and <think> must be closed exactly once")
        if errors:
            return ParseResult(calls, answer, "; ".join(errors), format_ok=False)
        if calls and answer is not None:
            return ParseResult(calls, None, "give either tool calls or an <answer>, not both in one turn", format_ok=False)
        if not calls and answer is None:
            return ParseResult(error="no <tool_call> or <answer> found", format_ok=False)
        if answer is not None and not answer:
            return ParseResult(error="the <answer> is empty", format_ok=False)
        return ParseResult(calls, answer, None, format_ok=True)

    @staticmethod
    def _parse_call(body: str, raw: str) -> tuple[ToolCall | None, str | None]:
        body = body.strip()
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:
            return None, f"tool call is not valid JSON ({type(e).__name__}: {str(e)[:80]})"
        if not isinstance(obj, dict):
            return None, 'tool call must be a JSON object like {"name": ..., "arguments": {...}}'
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            return None, 'tool call needs a string "name"'
        args: Any = obj.get("arguments", {})
        if isinstance(args, str):  # some models emit arguments as a JSON string
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None, f"arguments of '{name}' are not a JSON object"
        if not isinstance(args, dict):
            return None, f"arguments of '{name}' must be a JSON object"
        return ToolCall(name=name, arguments=args, raw=raw), None

    def format_call(self, call: ToolCall) -> str:
        return "<tool_call>" + json.dumps(call.to_json(), separators=(", ", ": ")) + "</tool_call>"

    def format_answer(self, answer: str) -> str:
        return f"<answer>{answer}</answer>"

    def instructions(self) -> str:
        return (
            'Call a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call> '
            "or reply with <answer>...</answer>."
        )


PARSERS: Registry[type] = Registry("tool-call format")
PARSERS.register("hermes", HermesParser)


def get_parser(name: str = "hermes") -> ToolParser:
    return PARSERS.get(name)()
