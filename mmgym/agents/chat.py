"""Conversations the agent keeps: env observations in, policy text out.

A ``Conversation`` is the agent's history of one episode: an optional system prompt,
the tool schemas for the chat template's ``tools=``, and ``Message``s whose text holds
one ``<image>`` (``<video>``) placeholder per image (clip), exactly as the env sent it.
``to_chat()`` turns it into the content-part messages every HF chat template reads
(each placeholder replaced, in order, by an image or video content part).

Messages are grouped into turns as the env defines them: turn 0 is the task (system
prompt and first observation) with the first reply; turn ``k`` is the ``k``-th later
observation with the reply to it. Dropping a turn (visual-token budget) removes its
observation and reply together, images included.

Backends may hang per-episode state on ``Conversation.state`` (the HF backend keeps
the exact token sequence there); scripted policies ignore it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "IMAGE_PLACEHOLDER",
    "VIDEO_PLACEHOLDER",
    "Message",
    "Conversation",
    "content_parts",
    "observation_message",
    "message_parts",
]

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"(<image>|<video>)")

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(slots=True)
class Message:
    """One chat message.

    ``text`` holds one ``<image>`` per entry of ``images`` and one ``<video>`` per clip;
    a clip is the tuple ``frames`` (uint8 HxWx3 arrays) with ``frame_times`` in seconds
    (all frames of a message form one clip). ``turn`` is the env turn it belongs to.
    """

    role: Role
    text: str
    images: tuple[np.ndarray, ...] = ()
    frames: tuple[np.ndarray, ...] = ()
    frame_times: tuple[float, ...] = ()
    turn: int = 0

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def has_video(self) -> bool:
        return len(self.frames) > 0


def content_parts(text: str, images: tuple[np.ndarray, ...] = (), frames: tuple[np.ndarray, ...] = ()) -> list[dict[str, Any]]:
    """Split ``text`` at its placeholders into HF content parts, in order.

    >>> [p["type"] for p in content_parts("a <image> b", (np.zeros((2, 2, 3), np.uint8),))]
    ['text', 'image', 'text']

    Placeholders beyond the given media stay as literal text; media beyond the
    placeholders are appended at the front (the usual VLM layout), so no image is lost.
    """
    parts: list[dict[str, Any]] = []
    img_i = 0
    video_used = False
    for piece in _PLACEHOLDER_RE.split(text):
        if piece == IMAGE_PLACEHOLDER and img_i < len(images):
            parts.append({"type": "image", "image": images[img_i]})
            img_i += 1
        elif piece == VIDEO_PLACEHOLDER and frames and not video_used:
            parts.append({"type": "video", "video": list(frames)})
            video_used = True
        elif piece and parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += piece  # an unmatched placeholder stays literal text
        elif piece:
            parts.append({"type": "text", "text": piece})
    lead: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images[img_i:]]
    if frames and not video_used:
        lead.append({"type": "video", "video": list(frames)})
    return lead + parts


def observation_message(obs: dict[str, Any], *, turn: int, tool_result_role: Literal["user", "tool"] = "user") -> Message:
    """The chat message for one env observation (DESIGN §2 observation dict).

    Tool results (``source == 1``) go in as ``tool_result_role`` messages; everything
    else (the task, feedback) as ``user`` messages.
    """
    source = int(obs.get("source", 0))
    role: Role = tool_result_role if source == 1 else "user"
    return Message(
        role=role,
        text=str(obs.get("text", "")),
        images=tuple(obs.get("images", ()) or ()),
        frames=tuple(obs.get("frames", ()) or ()),
        frame_times=tuple(float(t) for t in (obs.get("frame_times", ()) or ())),
        turn=turn,
    )


@dataclass(slots=True)
class Conversation:
    """The agent's history of one episode (see the module docstring).

    ``tools``: JSON-schema function dicts passed to the chat template as ``tools=``.
    ``dropped_turns``: how many whole turns were removed to fit the context.
    ``state``: backend-owned per-episode state (e.g. the HF token sequence).
    """

    system: str | None = None
    tools: list[dict[str, Any]] | None = None
    messages: list[Message] = field(default_factory=list)
    dropped_turns: int = 0
    state: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def turn(self) -> int:
        """Index of the current turn (the turn of the last message; 0 when empty)."""
        return self.messages[-1].turn if self.messages else 0

    def add_observation(self, obs: dict[str, Any], *, turn: int, tool_result_role: Literal["user", "tool"] = "user") -> Message:
        msg = observation_message(obs, turn=turn, tool_result_role=tool_result_role)
        self.messages.append(msg)
        return msg

    def add_action(self, text: str) -> Message:
        msg = Message(role="assistant", text=text, turn=self.turn)
        self.messages.append(msg)
        return msg

    def last_observation(self) -> Message | None:
        for m in reversed(self.messages):
            if m.role in ("user", "tool"):
                return m
        return None

    def turns_present(self) -> list[int]:
        """Turn indices still in the history, oldest first."""
        seen: list[int] = []
        for m in self.messages:
            if not seen or seen[-1] != m.turn:
                seen.append(m.turn)
        return seen

    def drop_turn(self, turn: int) -> None:
        """Remove every message of ``turn`` (its observation, images and reply)."""
        if turn == 0:
            raise ValueError("turn 0 holds the task and is never dropped")
        before = len(self.messages)
        self.messages = [m for m in self.messages if m.turn != turn]
        if len(self.messages) != before:
            self.dropped_turns += 1

    def to_chat(self, *, with_media: bool = True) -> list[dict[str, Any]]:
        """HF chat messages with content parts (system message first when set).

        With ``with_media=False`` the image parts carry no pixels (``{"type": "image"}``),
        which is all a chat template needs to render text.
        """
        out: list[dict[str, Any]] = []
        if self.system is not None:
            out.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        for m in self.messages:
            out.append({"role": m.role, "content": message_parts(m, with_media=with_media)})
        return out

    def images(self) -> list[np.ndarray]:
        """Every image still in the history, in order of appearance."""
        return [im for m in self.messages for im in m.images]


def message_parts(m: Message, *, with_media: bool = True) -> list[dict[str, Any]]:
    parts = content_parts(m.text, m.images, m.frames)
    if not with_media:
        parts = [{"type": p["type"]} if p["type"] in ("image", "video") else p for p in parts]
    return parts
