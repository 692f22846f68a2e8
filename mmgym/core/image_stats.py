"""Cheap statistics of an image (plain numpy), for the layers above: Durian's difficulty
(``mmgym.algos.durian``) and the rollout's per-episode record (``RolloutSettings.visual_entropy``)."""

from __future__ import annotations

import numpy as np

__all__ = ["visual_entropy"]


def visual_entropy(image: np.ndarray, *, bins: int = 256) -> float:
    """Shannon entropy (bits) of an image's grey-level histogram: a cheap proxy for how
    cluttered an image is (0 for a flat image, at most log2(bins)).

    Args:
      image: (H, W) or (H, W, C) array, uint8 (0..255) or float in [0, 1]; colour is
        reduced to luma (ITU-R BT.601 weights), alpha ignored.
    """
    img = np.asarray(image)
    if img.ndim == 3:
        c = img.shape[2]
        img = img[..., 0] if c == 1 else img[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"visual_entropy needs an (H, W) or (H, W, C) image, got shape {np.asarray(image).shape}")
    x = img.astype(np.float64)
    scale = 1.0 if np.issubdtype(np.asarray(image).dtype, np.floating) else 255.0
    hist, _ = np.histogram(np.clip(x / scale, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())
