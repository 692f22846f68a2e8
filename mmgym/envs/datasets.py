"""Loading task rows from local dataset folders safely.

Rows whose image is missing or corrupt, whose path escapes the dataset root, or whose
image exceeds the pixel limit are skipped and counted, with one warning per dataset.
A dataset with no valid row is one clear error.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

__all__ = ["DatasetError", "RowError", "LoadReport", "resolve_in_root", "probe_image", "load_rgb", "read_jsonl", "load_rows"]

log = logging.getLogger(__name__)
R = TypeVar("R")
DEFAULT_MAX_PIXELS = 40_000_000


class DatasetError(ValueError):
    """The dataset as a whole cannot be used."""


class RowError(ValueError):
    """One row is unusable; the loader skips and counts it."""


@dataclass(slots=True)
class LoadReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def resolve_in_root(root: Path, rel: Any) -> Path:
    """``root / rel`` resolved, refusing absolute paths and ``..`` escapes."""
    if not isinstance(rel, str) or not rel:
        raise RowError("path is missing or not a string")
    p = (root / rel).resolve()
    try:
        p.relative_to(root.resolve())
    except ValueError:
        raise RowError(f"path {rel!r} escapes the dataset root") from None
    return p


def probe_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check that ``path`` is a readable image within ``max_pixels``; return ``(w, h)``."""
    if not path.is_file():
        raise RowError(f"image {path.name!r} does not exist")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise RowError(f"image {path.name!r} has {w * h} pixels (limit {max_pixels})")
            im.verify()
    except RowError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise RowError(f"image {path.name!r} is corrupt ({type(e).__name__})") from None
    return w, h


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to uint8 RGB ``(H, W, 3)``."""
    Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:
        raise RowError(f"image {path.name!r} could not be decoded ({type(e).__name__})") from None


def read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    """Yield ``(line_number, object)``; undecodable lines yield a ``RowError`` instead."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except ValueError as e:
                yield i, RowError(f"line {i} is not JSON ({e.msg})")


def load_rows(name: str, items: Iterable[Any], parse: Callable[[Any], R]) -> tuple[list[R], LoadReport]:
    """Apply ``parse`` to each item, skipping and counting ``RowError``s; one warning at the end."""
    report = LoadReport()
    rows: list[R] = []
    for item in items:
        try:
            if isinstance(item, RowError):
                raise item
            rows.append(parse(item))
        except RowError as e:
            reason = str(e).split(" (")[0]
            report.skipped[_reason_kind(reason)] += 1
            log.debug("skipping row of %s: %s", name, e)
    report.kept = len(rows)
    if report.num_skipped:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items()))
        warnings.warn(f"dataset {name}: skipped {report.num_skipped} bad row(s) ({kinds}); kept {report.kept}", stacklevel=3)
    if not rows:
        raise DatasetError(f"dataset {name} has no valid row (skipped {report.num_skipped}: {dict(report.skipped)})")
    return rows, report


def _reason_kind(msg: str) -> str:
    for key in ("escapes", "does not exist", "corrupt", "pixels", "not JSON", "missing", "decoded"):
        if key in msg:
            return key
    return "invalid"
