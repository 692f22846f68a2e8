"""From conversations to exact token contexts, with any HF processor and chat template.

``EpisodeEncoder`` is shared by the model backends (``HFPolicy``, ``VLLMPolicy``):

- ``sync(conv)`` appends to ``conv.state`` (a ``TokenState``) only what is new since the
  last call: the next observation rendered by the chat template and processed with
  its images, or the end of the assistant message after a sampled reply. A sampled
  reply is never re-tokenized.
- ``fit(conv, state, max_new)`` enforces the visual-token budget: whole oldest turns
  are dropped (observation, images and reply together) until prompt + ``max_new``
  fits ``max_context``; turn 0 (system prompt and task) is never dropped.
- ``add_reply(state, ...)`` records a sampled reply.

Pieces are cut out of full template renderings as "text after a probe prefix", so the
concatenated pieces are exactly what the template renders for the whole chat.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mmgym.agents.chat import Conversation, Message, message_parts
from mmgym.agents.policy import Generation
from mmgym.agents.tokens import Segment, SegmentKind, TokenState

__all__ = ["EpisodeEncoder", "ModelLoadError", "VISION_TOKEN_STRINGS", "hermes_tool_prompt", "check_chat_template"]

logger = logging.getLogger(__name__)

# Special tokens a VLM uses for image/video slots. Sampling one and feeding it back
# crashes the training forward ("Image features and image tokens do not match").
VISION_TOKEN_STRINGS = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<image>", "<video>", "<|image|>", "<|video|>", "<fake_token_around_image>", "<image_soft_token>",
    "<start_of_image>", "<end_of_image>", "<img>", "</img>", "<IMG_CONTEXT>",
)
_SEQ_INPUT_KEYS = ("input_ids", "attention_mask")
_PROBE_USER = "mmgym-probe-user"
_PROBE_REPLY = "mmgym-probe-reply"
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "mmgym_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}},
}


class ModelLoadError(ValueError):
    """A model folder that does not exist, does not load, or has no chat template."""


class InputRejected(Exception):
    """A conversation's input the processor or template cannot take (recorded on the
    episode as its error, never raised to callers)."""


@dataclass(slots=True)
class Prepared:
    """A conversation ready for sampling: its index in the call and its token state."""

    index: int
    conv: Conversation
    state: TokenState


class EpisodeEncoder:
    """Turns conversations into exact token contexts for one model (module docstring).

    Args:
        processor: the model's HF processor (tokenizer, image processor, chat template).
        config: the model config (special token ids, vocabulary size, max positions).
        generation_config: the model's generation config (end-of-sequence ids).
        max_context: context length in tokens (default: the model's max positions).
        tool_result_role: chat role for tool results (``"user"`` or ``"tool"``).
    """

    def __init__(self, processor: Any, config: Any, generation_config: Any = None, *, max_context: int | None = None,
                 tool_result_role: Literal["user", "tool"] = "user", name: str = "model"):
        if tool_result_role not in ("user", "tool"):
            raise ValueError(f"tool_result_role must be 'user' or 'tool', got {tool_result_role!r}")
        check_chat_template(processor, name)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tool_result_role = tool_result_role
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_max = int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or 32768
        self.max_context = int(max_context) if max_context is not None else model_max
        if self.max_context < 16:
            raise ValueError(f"max_context must be >= 16 tokens, got {self.max_context}")
        self.vocab_size = int(getattr(text_cfg, "vocab_size", 0) or len(self.tokenizer))
        self.pad_token_id = _pad_id(self.tokenizer, generation_config)
        self.eos_token_ids = _eos_ids(self.tokenizer, generation_config)
        suppress = set(_vision_token_ids(self.tokenizer, config))
        suppress.update(range(len(self.tokenizer), self.vocab_size))  # padded rows: nothing to decode
        suppress -= set(self.eos_token_ids)
        self.suppress_token_ids: list[int] = sorted(i for i in suppress if 0 <= i < self.vocab_size)
        self.image_token_id = _token_id(self.tokenizer, getattr(processor, "image_token", None))
        if self.image_token_id is None:
            v = getattr(config, "image_token_id", None)
            self.image_token_id = int(v) if isinstance(v, int) else None
        self.video_token_id = _token_id(self.tokenizer, getattr(processor, "video_token", None))
        self.merge_size = int(getattr(getattr(processor, "image_processor", None), "merge_size", 1) or 1)
        self.frame = ChatFrame(processor, tool_result_role)

    # ------------------------------------------------------------------ batch prep
    def prepare(self, conversations: Sequence[Conversation], max_new_tokens: int) -> tuple[list[Generation | None], list[Prepared]]:
        """Sync and budget every conversation. Returns per-conversation early results
        (``error``/``budget`` generations, else ``None``) and the ones to sample."""
        early: list[Generation | None] = [None] * len(conversations)
        ready: list[Prepared] = []
        for i, conv in enumerate(conversations):
            state = self.sync(conv)
            if state.error is not None:
                early[i] = Generation(text="", finish_reason="error", error=state.error)
            elif not self.fit(conv, state, max_new_tokens):
                early[i] = Generation(
                    text="",
                    finish_reason="budget",
                    error=(f"context full: {len(state)} prompt tokens + {max_new_tokens} new tokens exceed "
                           f"max_context={self.max_context} after dropping every droppable turn"),
                )
            else:
                ready.append(Prepared(i, conv, state))
        return early, ready

    # ------------------------------------------------------------------ state
    def sync(self, conv: Conversation) -> TokenState:
        """Bring ``conv.state`` up to date with ``conv.messages`` (append-only)."""
        state = conv.state
        if not isinstance(state, TokenState) or state.owner is not self or state.n_msgs > len(conv.messages):
            state = TokenState(owner=self)
            conv.state = state
        if state.error is None:
            try:
                self._consume(conv, state)
            except InputRejected as e:
                state.error = str(e)
        return state

    def _consume(self, conv: Conversation, state: TokenState) -> None:
        msgs = conv.messages
        _check_structure(msgs)
        i = state.n_msgs
        if i == 0:
            first = msgs[0]
            state.append(self._segment("prompt", first.turn, self.frame.prompt_text(conv.system, conv.tools, first), first))
            i = state.n_msgs = 1
        while i < len(msgs):
            m = msgs[i]
            if m.role == "assistant":
                pending = state.pending
                if pending is not None and pending.text == m.text:
                    pending.closed = True
                    last = self.tokenizer.convert_ids_to_tokens(int(pending.ids[-1])) if pending.ended else None
                    close = self.frame.close_text(ended_with=last)
                    if close:
                        state.append(self._text_segment("close", pending.turn, close))
                else:
                    if pending is not None:  # the reply was replaced by other text: keep that as given context
                        state.segments.pop()
                    seg = self._text_segment("given", m.turn, self.frame.given_text(conv.system, conv.tools, m))
                    seg.text = m.text
                    state.append(seg)
            else:
                state.append(self._segment("obs", m.turn, self.frame.obs_text(conv.system, conv.tools, m), m))
            i += 1
            state.n_msgs = i

    def _segment(self, kind: SegmentKind, turn: int, text: str, msg: Message) -> Segment:
        """Process one rendered chunk with its media through the model's processor."""
        images = [np.ascontiguousarray(im) for im in msg.images]
        videos = [np.stack([np.asarray(f) for f in msg.frames])] if msg.frames else []
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            kwargs["images"] = images
            kwargs["input_data_format"] = "channels_last"  # DESIGN §2: HxWx3 (a 3-px-high image is not CHW)
        if videos:
            kwargs["videos"] = videos
            kwargs["do_sample_frames"] = False
        try:
            for k, im in enumerate(images):
                if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8 or min(im.shape[:2]) < 1:
                    raise ValueError(f"image {k} must be uint8 HxWx3, got {im.dtype} {im.shape}")
            out = self.processor(**kwargs)
        except Exception as e:  # the processor rejected this observation's media
            raise InputRejected(f"the processor rejected turn {turn}'s input: {type(e).__name__}: {e}") from e
        ids = out["input_ids"][0].tolist()
        seq: dict[str, list[int]] = {}
        media: dict[str, Any] = {}
        for k, v in out.items():
            if k in _SEQ_INPUT_KEYS or v is None:
                continue
            if k.endswith("ids") and getattr(v, "ndim", 0) == 2 and v.shape[0] == 1 and v.shape[1] == len(ids):
                seq[k] = v[0].tolist()
            else:
                media[k] = v
        if self.image_token_id is not None and not images and self.image_token_id in ids:
            raise InputRejected(f"turn {turn}'s text holds image tokens but no image")
        return Segment(kind=kind, turn=turn, ids=ids, seq=seq, media=media, num_images=len(images),
                       num_videos=len(videos), features=[None] * len(images), images=tuple(images),
                       videos=tuple(videos))

    def _text_segment(self, kind: SegmentKind, turn: int, text: str) -> Segment:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Segment(kind=kind, turn=turn, ids=list(ids))

    def fit(self, conv: Conversation, state: TokenState, max_new: int) -> bool:
        """Drop whole oldest turns (with their images) until prompt + ``max_new`` fits."""
        while len(state) + max_new > self.max_context:
            turns = state.droppable_turns()
            if not turns:
                return False
            state.drop_turn(turns[0])
            conv.drop_turn(turns[0])
            logger.debug("dropped turn %d to fit max_context=%d", turns[0], self.max_context)
        return True

    def render(self, conv: Conversation) -> str:
        """The whole conversation rendered by the chat template (roles mapped as for the model)."""
        msgs = [_chat(m, self.tool_result_role if m.role == "tool" else m.role) for m in conv.messages]
        gen = bool(conv.messages) and conv.messages[-1].role != "assistant"
        return self.frame.render(conv.system, conv.tools, msgs, gen)

    # ------------------------------------------------------------------ replies
    def finish_reply(self, ids: list[int], stop: Sequence[str]) -> tuple[int, bool, bool]:
        """Where a raw sampled row ends: (length, ended with end-of-turn token, hit a stop string)."""
        eos = set(self.eos_token_ids)
        n, ended = len(ids), False
        for j, t in enumerate(ids):
            if t in eos:
                n, ended = j + 1, True
                break
        if stop:
            cut = stop_cut(self.tokenizer, ids[: n - 1 if ended else n], tuple(stop))
            if cut is not None:
                return cut, False, True
        return n, ended, False

    def add_reply(self, state: TokenState, ids: list[int], logprobs: list[float], *, ended: bool, text: str) -> None:
        """Record a sampled reply (with the turns already dropped when it was sampled)."""
        state.append(Segment(kind="gen", turn=state.current_turn(), ids=list(ids), logprobs=list(logprobs),
                             context=frozenset(state.dropped), ended=ended, text=text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count_image_tokens(self, grid: Any) -> int:
        """Image tokens the processor emits for ``image_grid_thw`` rows (Qwen-style grids)."""
        return int((grid.prod(-1) // (self.merge_size * self.merge_size)).sum())


def _check_structure(msgs: list[Message]) -> None:
    """Raise ``ValueError`` for histories no chat model can answer (caller bugs)."""
    if not msgs:
        raise ValueError("the conversation has no messages: add the task observation first")
    if msgs[0].role not in ("user", "tool"):
        raise ValueError(f"the first message must be the task (role user), got role {msgs[0].role!r}")
    for a, b in zip(msgs, msgs[1:]):
        if (a.role == "assistant") == (b.role == "assistant"):
            raise ValueError(f"messages must alternate observation / assistant reply; got {a.role!r} then {b.role!r}")
    if msgs[-1].role == "assistant":
        raise ValueError("the conversation ends with an assistant message: there is nothing to reply to")


class ChatFrame:
    """Renders pieces of a conversation with the model's chat template."""

    def __init__(self, processor: Any, tool_result_role: str):
        self.processor = processor
        self.tool_result_role = tool_result_role
        self.tools_in_template = self._detect_tools()
        base = self._render_raw([_text_msg("user", _PROBE_USER), _text_msg("assistant", _PROBE_REPLY)], None, False)
        at = base.rfind(_PROBE_REPLY)
        if at < 0:
            raise ModelLoadError("the chat template does not render assistant messages")
        self.close = base[at + len(_PROBE_REPLY):]

    def _render_raw(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool) -> str:
        kw: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kw["tools"] = tools
        apply = self.processor.apply_chat_template
        if getattr(self.processor, "chat_template", None) is None and hasattr(self.processor, "tokenizer"):
            apply = self.processor.tokenizer.apply_chat_template
        text = apply(messages, **kw)
        return str(text[0] if isinstance(text, list) else text)

    def _detect_tools(self) -> bool:
        try:
            rendered = self._render_raw([_text_msg("user", _PROBE_USER)], [_PROBE_TOOL], True)
        except Exception:
            return False
        return "mmgym_probe_tool" in rendered

    def _head(self, system: str | None, tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The system message; tools go into it when the template ignores ``tools=``."""
        if tools and not self.tools_in_template:
            system = ((system + "\n\n") if system else "") + hermes_tool_prompt(tools)
            tools = None
        return ([_text_msg("system", system)] if system is not None else []), tools

    def render(self, system: str | None, tools: list[dict[str, Any]] | None, messages: list[dict[str, Any]],
               add_generation_prompt: bool) -> str:
        head, tools = self._head(system, tools)
        return self._render_raw(head + messages, tools, add_generation_prompt)

    def prompt_text(self, system: str | None, tools: list[dict[str, Any]] | None, first: Message) -> str:
        return self.render(system, tools, [_chat(first, "user")], True)

    def _suffix(self, system: str | None, tools: list[dict[str, Any]] | None, prefix: list[dict[str, Any]],
                prefix_gen: bool, piece: dict[str, Any], gen: bool) -> str:
        base = self.render(system, tools, prefix, prefix_gen)
        full = self.render(system, tools, prefix + [piece], gen)
        if not full.startswith(base):
            raise InputRejected("the chat template is not prefix-stable (a later message changes earlier text); "
                                "multi-turn rollouts need a template that only appends")
        return full[len(base):]

    def obs_text(self, system: str | None, tools: list[dict[str, Any]] | None, m: Message) -> str:
        probe = [_text_msg("user", _PROBE_USER), _text_msg("assistant", _PROBE_REPLY)]
        role = self.tool_result_role if m.role == "tool" else "user"
        return self._suffix(system, tools, probe, False, _chat(m, role), True)

    def given_text(self, system: str | None, tools: list[dict[str, Any]] | None, m: Message) -> str:
        return self._suffix(system, tools, [_text_msg("user", _PROBE_USER)], True, _text_msg("assistant", m.text), False)

    def close_text(self, ended_with: str | None) -> str:
        """What follows a sampled reply: the template's end of message, minus the
        end-of-turn token when the model produced it itself."""
        if ended_with and self.close.startswith(ended_with):
            return self.close[len(ended_with):]
        return self.close


def _text_msg(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _chat(m: Message, role: str) -> dict[str, Any]:
    return {"role": role, "content": message_parts(m, with_media=False)}


def hermes_tool_prompt(tools: list[dict[str, Any]]) -> str:
    """Qwen2.5 / Hermes tool description, for chat templates that ignore ``tools=``."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def stop_cut(tokenizer: Any, ids: list[int], stops: tuple[str, ...]) -> int | None:
    """Smallest ``k`` such that ``decode(ids[:k])`` contains a stop string (``None``: none)."""
    if not ids or not stops:
        return None
    if not any(s in tokenizer.decode(ids, skip_special_tokens=False) for s in stops):
        return None
    for k in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:k], skip_special_tokens=False) for s in stops):
            return k
    return None


def check_chat_template(processor: Any, name: str) -> None:
    """Raise ``ModelLoadError`` naming the model when it has no chat template."""
    tok = getattr(processor, "tokenizer", None)
    if getattr(processor, "chat_template", None) is None and getattr(tok, "chat_template", None) is None:
        raise ModelLoadError(f"model {name!r} has no chat template (its processor and tokenizer define none); "
                             "add a chat_template.jinja to the model folder")


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    if not token:
        return None
    vocab = tokenizer.get_vocab()
    return int(vocab[token]) if token in vocab else None


def _vision_token_ids(tokenizer: Any, config: Any) -> list[int]:
    ids: set[int] = set()
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[s]) for s in VISION_TOKEN_STRINGS if s in vocab)
    for attr in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "image_token_index", "video_token_index", "boi_token_index", "eoi_token_index"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    return sorted(ids)


def _pad_id(tokenizer: Any, generation_config: Any) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(generation_config, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def _eos_ids(tokenizer: Any, generation_config: Any) -> tuple[int, ...]:
    ids: list[int] = []
    g = getattr(generation_config, "eos_token_id", None)
    for v in (list(g) if isinstance(g, (list, tuple)) else [g]) + [getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    im_end = _token_id(tokenizer, "<|im_end|>")  # chat models' end of turn
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    if not ids:
        raise ModelLoadError("the model defines no end-of-sequence token (generation_config.eos_token_id)")
    return tuple(ids)
