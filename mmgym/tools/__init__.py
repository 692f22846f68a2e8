"""mmgym.tools: the Tool protocol, the tool-call parser and built-in tools."""

from mmgym.tools.base import Tool, run_tool, tool_schema, validate_arguments
from mmgym.tools.parser import PARSERS, HermesParser, ParseResult, ToolParser, get_parser, tags_balanced
from mmgym.tools.zoom import BBoxZoomTool, RegionZoomTool, ZoomState, draw_grid, region_box, resize_max_side

__all__ = [
    "BBoxZoomTool",
    "HermesParser",
    "PARSERS",
    "ParseResult",
    "RegionZoomTool",
    "Tool",
    "ToolParser",
    "ZoomState",
    "draw_grid",
    "get_parser",
    "region_box",
    "resize_max_side",
    "run_tool",
    "tags_balanced",
    "tool_schema",
    "validate_arguments",
]
