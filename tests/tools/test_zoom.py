from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgym.core import ToolCall
from mmgym.tools import BBoxZoomTool, RegionZoomTool, ZoomState, run_tool

IMG = np.arange(200 * 300 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8)


def _state() -> ZoomState:
    return ZoomState(image=IMG)


def test_deepeyes_crop_and_min_side() -> None:
    t = BBoxZoomTool("deepeyes", max_side=1000)
    r = t(_state(), bbox=[10, 20, 110, 70])
    assert r.error is None and r.images[0].shape == (50, 100, 3)
    assert np.array_equal(r.images[0], IMG[20:70, 10:110])
    # a 10x10 box is grown about its centre to 28x28
    assert t.box_for([50, 50, 60, 60], 300, 200) == (41, 41, 69, 69)
    # at the border it is shifted back inside
    assert t.box_for([0, 0, 5, 5], 300, 200) == (0, 0, 28, 28)


def test_chain_of_focus_enlarges_and_upsamples() -> None:
    t = BBoxZoomTool("chain_of_focus", max_side=1000)
    assert t.box_for([100, 100, 140, 140], 300, 200) == (90, 90, 150, 150)
    r = t(_state(), bbox=[100, 100, 140, 140])
    assert r.images[0].shape == (120, 120, 3)  # 60 px crop upsampled x2 (>= 112 px)


@pytest.mark.parametrize("bbox,msg", [([5, 5, 5, 10], "empty or reversed"), ([10, 10, 5, 20], "empty or reversed"),
                                      ([400, 400, 500, 500], "outside the image"), ([0, 0, 300, 1], None)])
def test_bad_boxes_are_tool_errors(bbox, msg) -> None:
    r = BBoxZoomTool()( _state(), bbox=bbox)
    if msg:
        assert r.error and msg in r.error
    else:
        assert r.error is None  # a 1 px high strip is grown to 28 px


def test_schema_validation_via_run_tool() -> None:
    t = BBoxZoomTool()
    for args in ({"bbox": [1, 2, 3]}, {"bbox": "x"}, {}, {"bbox": [1, 2, 3, 4], "extra": 1}, {"bbox": [float("nan"), 0, 1, 1]}):
        r = run_tool(t, _state(), ToolCall("zoom", args))
        assert r.error is not None


def test_region_zoom() -> None:
    t = RegionZoomTool(grid=2, max_side=64, margin=0.0)
    r = t(_state(), region=4)
    assert r.images[0].shape == (43, 64, 3)
    assert run_tool(t, _state(), ToolCall("zoom", {"region": 5})).error is not None
    assert run_tool(t, _state(), ToolCall("zoom", {"region": 0})).error is not None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30)), min_size=4, max_size=4),
       st.sampled_from(["deepeyes", "chain_of_focus"]))
def test_zoom_never_raises(bbox, preset) -> None:
    r = run_tool(BBoxZoomTool(preset), _state(), ToolCall("zoom", {"bbox": bbox}))
    if r.error is None:
        img = r.images[0]
        assert img.dtype == np.uint8 and img.ndim == 3 and min(img.shape[:2]) >= 1
