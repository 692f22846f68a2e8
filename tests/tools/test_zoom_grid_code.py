from __future__ import annotations

import gymnasium as gym
import numpy as np

import mmgym  # noqa: F401
from mmgym.tools.zoom import CODE_ALPHA, draw_grid, grid_code_color


def test_coded_grid_tints_every_cell_with_its_own_code() -> None:
    view = np.full((80, 120, 3), 60, np.uint8)
    out = draw_grid(view, 4, coded=True)
    codes = set()
    for r in range(4):
        for c in range(4):
            px = out[r * 20 + 10, c * 30 + 15].astype(float)
            want = 60 * (1 - CODE_ALPHA) + np.array(grid_code_color(r, c, 4), float) * CODE_ALPHA
            assert np.abs(px - want).max() <= 1.0
            codes.add(tuple(int(v) for v in px))
    assert len(codes) == 16  # every cell tells itself apart
    assert (view == 60).all()  # the input is not modified
    # the plain grid draws white lines instead
    plain = draw_grid(view, 4)
    assert (plain[:, 30] == 255).all()


def test_env_grid_code_changes_only_the_first_view() -> None:
    kw = dict(zoom="region", grid=4, view_size=112, symbols="stripes")
    a = gym.make("mmgym/ChainOfFocus-v0", grid_code=True, **kw)
    b = gym.make("mmgym/ChainOfFocus-v0", grid_code=False, **kw)
    oa, _ = a.reset(seed=4)
    ob, _ = b.reset(seed=4)
    assert oa["text"] == ob["text"] and oa["images"][0].shape == ob["images"][0].shape
    assert not np.array_equal(oa["images"][0], ob["images"][0])
    act = a.unwrapped.oracle_action()
    za, *_ = a.step(act)
    zb, *_ = b.step(act)
    assert np.array_equal(za["images"][0], zb["images"][0])  # the zoomed crop is the same
