"""JSON wire format of mmgym observations (server and remote client; no extra dependencies).

Images and frames travel as ``{"mime_type": "image/png", "data": <base64>, "width", "height"}``;
every other observation key as plain JSON. ``info`` values are made JSON-safe (numpy scalars
and arrays become numbers and lists; anything else its ``str``).
"""

from __future__ import annotations

import base64
from typing import Any

import cv2
import numpy as np

__all__ = ["encode_image", "decode_image", "encode_observation", "decode_observation", "jsonable", "PNG_MIME"]

PNG_MIME = "image/png"


def encode_image(img: np.ndarray) -> dict[str, Any]:
    """uint8 ``H x W x 3`` RGB -> ``{"mime_type": "image/png", "data": base64, "width", "height"}``."""
    arr = np.ascontiguousarray(img, dtype=np.uint8)
    ok, png = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 else arr)
    if not ok:
        raise ValueError(f"could not PNG-encode an image of shape {arr.shape}")
    return {"mime_type": PNG_MIME, "data": base64.b64encode(png.tobytes()).decode("ascii"), "width": int(arr.shape[1]), "height": int(arr.shape[0])}


def decode_image(item: dict[str, Any]) -> np.ndarray:
    """Inverse of ``encode_image``; raises ``ValueError`` naming what is wrong."""
    if not isinstance(item, dict) or item.get("mime_type") != PNG_MIME or not isinstance(item.get("data"), str):
        raise ValueError(f"an image must be {{'mime_type': '{PNG_MIME}', 'data': <base64 PNG>}}, got {str(item)[:120]}")
    buf = np.frombuffer(base64.b64decode(item["data"]), np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("image data is not a decodable PNG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def jsonable(x: Any) -> Any:
    """``x`` with numpy values and tuples turned into JSON types (recursively)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if x is None or isinstance(x, (str, int, float)):
        return x
    return str(x)


def encode_observation(obs: dict[str, Any]) -> dict[str, Any]:
    """An mmgym observation (DESIGN §2) as JSON: PNG images/frames, the rest as is."""
    return {
        "text": str(obs.get("text", "")),
        "images": [encode_image(i) for i in obs.get("images", ())],
        "frames": [encode_image(f) for f in obs.get("frames", ())],
        "frame_times": [float(t) for t in obs.get("frame_times", ())],
        "source": int(obs.get("source", 0)),
        "turn": int(obs.get("turn", 0)),
    }


def decode_observation(data: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``encode_observation``: arrays back, tuples as in the env contract."""
    return {
        "text": str(data.get("text", "")),
        "images": tuple(decode_image(i) for i in data.get("images", ())),
        "frames": tuple(decode_image(f) for f in data.get("frames", ())),
        "frame_times": tuple(np.asarray(t, dtype=np.float32) for t in data.get("frame_times", ())),
        "source": int(data.get("source", 0)),
        "turn": int(data.get("turn", 0)),
    }
