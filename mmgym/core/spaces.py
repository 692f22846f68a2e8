"""Spaces for multimodal observations and text actions.

Gymnasium's stock ``Text`` space has a charset without spaces, newlines or ``<{``,
so it cannot hold a model's output; ``UnicodeText`` accepts any ``str`` within
length bounds. ``RGBImage`` is a uint8 ``H x W x 3`` array of variable size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.spaces import Space

__all__ = ["UnicodeText", "RGBImage"]

# Characters used by ``UnicodeText.sample``: printable ASCII, whitespace, the tags a
# tool-calling model emits, and a few non-ASCII code points so fuzzing sees unicode.
_SAMPLE_ALPHABET = (
    [chr(c) for c in range(32, 127)]
    + ["\n", "\t", "é", "ß", "中", "🙂", "\u200b"]
    + ["<tool_call>", "</tool_call>", "<answer>", "</answer>", '{"name": ', '"arguments": ']
)


class UnicodeText(Space[str]):
    """Any Python ``str`` whose length lies in ``[min_length, max_length]``.

    >>> UnicodeText(max_length=5).contains("héllo")
    True
    """

    def __init__(self, max_length: int = 8192, *, min_length: int = 0, seed: int | None = None):
        if min_length < 0 or max_length < min_length:
            raise ValueError(f"UnicodeText needs 0 <= min_length <= max_length, got {min_length}, {max_length}")
        self.min_length = int(min_length)
        self.max_length = int(max_length)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        hi = min(self.max_length, self.min_length + 64)
        n_pieces = int(self.np_random.integers(self.min_length, hi + 1))
        pieces = self.np_random.choice(len(_SAMPLE_ALPHABET), size=n_pieces)
        text = "".join(_SAMPLE_ALPHABET[i] for i in pieces)
        text = text[: self.max_length]
        while len(text) < self.min_length:
            text += "a"
        return text

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, UnicodeText)
            and other.min_length == self.min_length
            and other.max_length == self.max_length
        )

    def to_jsonable(self, sample_n: Any) -> list[Any]:
        return list(sample_n)

    def from_jsonable(self, sample_n: list[Any]) -> list[Any]:
        return list(sample_n)


class RGBImage(Space[np.ndarray]):
    """A uint8 ``(H, W, 3)`` image with ``min_side <= H, W <= max_side``."""

    def __init__(self, max_side: int = 8192, *, min_side: int = 1, seed: int | None = None):
        if min_side < 1 or max_side < min_side:
            raise ValueError(f"RGBImage needs 1 <= min_side <= max_side, got {min_side}, {max_side}")
        self.min_side = int(min_side)
        self.max_side = int(max_side)
        super().__init__(shape=None, dtype=np.uint8, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> np.ndarray:
        hi = min(self.max_side, max(self.min_side, 64))
        h, w = (int(v) for v in self.np_random.integers(self.min_side, hi + 1, size=2))
        return self.np_random.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    def contains(self, x: Any) -> bool:
        return (
            isinstance(x, np.ndarray)
            and x.dtype == np.uint8
            and x.ndim == 3
            and x.shape[2] == 3
            and self.min_side <= x.shape[0] <= self.max_side
            and self.min_side <= x.shape[1] <= self.max_side
        )

    def __repr__(self) -> str:
        return f"RGBImage({self.min_side}..{self.max_side})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, RGBImage) and (other.min_side, other.max_side) == (self.min_side, self.max_side)

    def to_jsonable(self, sample_n: Any) -> list[Any]:
        return [np.asarray(x).tolist() for x in sample_n]

    def from_jsonable(self, sample_n: list[Any]) -> list[Any]:
        return [np.asarray(x, dtype=np.uint8) for x in sample_n]
