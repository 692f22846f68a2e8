"""The ``Tool`` protocol and schema validation.

A tool is an object with ``name``, ``description``, ``parameters`` (a JSON Schema for its
arguments) and ``__call__(state, **args) -> ToolResult``. ``run_tool`` validates the
arguments before the call and turns any validation failure into a ``ToolResult`` error,
so a model's malformed call never raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jsonschema

from mmgym.core import ToolCall, ToolResult

__all__ = ["Tool", "tool_schema", "validate_arguments", "run_tool"]


@runtime_checkable
class Tool(Protocol):
    name: str
    description: str
    parameters: dict[str, Any]

    def __call__(self, state: Any, **arguments: Any) -> ToolResult: ...


def tool_schema(tool: Tool) -> dict[str, Any]:
    """OpenAI/Qwen function schema, as chat templates take it in ``tools=``."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }


_validators: dict[int, jsonschema.protocols.Validator] = {}


def _has_non_finite(x: Any) -> bool:
    if isinstance(x, float):
        return not math.isfinite(x)
    if isinstance(x, (list, tuple)):
        return any(_has_non_finite(v) for v in x)
    if isinstance(x, Mapping):
        return any(_has_non_finite(v) for v in x.values())
    return False


def validate_arguments(tool: Tool, arguments: Any) -> str | None:
    """Return ``None`` if ``arguments`` match the tool's schema, else a one-line reason."""
    if not isinstance(arguments, Mapping):
        return f"arguments of '{tool.name}' must be a JSON object, got {type(arguments).__name__}"
    if _has_non_finite(arguments):
        return f"arguments of '{tool.name}' contain NaN or infinity"
    key = id(tool.parameters)
    v = _validators.get(key)
    if v is None:
        cls = jsonschema.validators.validator_for(tool.parameters)
        v = cls(tool.parameters)
        _validators[key] = v
    if v.is_valid(arguments):
        return None
    err = jsonschema.exceptions.best_match(v.iter_errors(dict(arguments)))
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "arguments"
    msg = err.message if len(err.message) <= 200 else err.message[:200] + "..."
    return f"invalid arguments for '{tool.name}' at {where}: {msg}"


def run_tool(tool: Tool, state: Any, call: ToolCall) -> ToolResult:
    """Validate ``call.arguments`` against the tool's schema and run it.

    Validation failures come back as ``ToolResult.error``; the tool itself is expected
    to report its own failures the same way (bugs in a tool still raise).
    """
    problem = validate_arguments(tool, call.arguments)
    if problem is not None:
        return ToolResult.fail(problem + f". Schema: {tool.parameters}")
    return tool(state, **call.arguments)
