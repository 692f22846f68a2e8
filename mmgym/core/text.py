"""Small text helpers shared by the parser (tools) and the format verifiers (rewards)."""

from __future__ import annotations

import re

__all__ = ["tags_balanced", "DEFAULT_TAGS"]

DEFAULT_TAGS = ("think", "tool_call", "answer")
_TAG_RES = {t: re.compile(rf"<(/?){t}>") for t in DEFAULT_TAGS}


def tags_balanced(text: str, tags: tuple[str, ...] = DEFAULT_TAGS) -> bool:
    """True iff every listed tag opens and closes in order, never nested in itself.

    >>> tags_balanced("<answer>A</answer>"), tags_balanced("<answer>A")
    (True, False)
    """
    for tag in tags:
        pattern = _TAG_RES.get(tag) or re.compile(rf"<(/?){re.escape(tag)}>")
        depth = 0
        for m in pattern.finditer(text):
            depth += -1 if m.group(1) else 1
            if depth < 0 or depth > 1:
                return False
        if depth != 0:
            return False
    return True
