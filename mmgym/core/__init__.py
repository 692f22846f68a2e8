"""mmgym.core: records, spaces, registry and config. No models and no I/O beyond YAML."""

from mmgym.core.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from mmgym.core.text import tags_balanced
from mmgym.core.records import TERMINATION_REASONS, RolloutBatch, ToolCall, ToolResult, Trajectory, Turn
from mmgym.core.registry import Registry, RegistryError
from mmgym.core.spaces import RGBImage, UnicodeText

__all__ = [
    "ConfigError",
    "RGBImage",
    "Registry",
    "RegistryError",
    "RolloutBatch",
    "TERMINATION_REASONS",
    "ToolCall",
    "ToolResult",
    "Trajectory",
    "Turn",
    "UnicodeText",
    "apply_overrides",
    "from_dict",
    "load_config",
    "tags_balanced",
    "to_dict",
]
