"""Shared fixtures: one embedded tiny model per test session (loading takes ~1 s)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_policy():
    from mmgym.agents import HFPolicy

    torch.manual_seed(0)
    return HFPolicy()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def make_image(rng):
    """``make_image(h=224, w=224)`` -> a random uint8 RGB image."""

    def make(h: int = 224, w: int = 224) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    return make
