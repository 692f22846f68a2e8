"""``HFPolicy``: any chat VLM on transformers (``AutoModelForImageTextToText`` +
``AutoProcessor``) as an mmgym ``Policy``.

- Conversations are rendered with the model's own chat template (images as content
  parts, tool schemas through ``tools=``) and processed by the model's own processor.
- Multi-turn contexts are kept as exact token sequences (``mmgym.agents.tokens``): a
  reply is never re-tokenized, only the new observation is rendered and appended.
- Batched sampling (left padding) with temperature, top-p, max new tokens and stop
  strings; the log-prob of each sampled token comes from the logits of the same
  ``generate`` call. Vision special tokens (and padded vocabulary rows) are forbidden
  at sampling and in ``logprobs`` alike.
- Visual-token budget: before each generation the prompt length (image tokens
  included) plus ``max_new_tokens`` is checked against the context; whole oldest turns
  are dropped with their images (never turn 0 with the system prompt and task).
- Each image is encoded once per episode: vision-encoder outputs are cached on the
  episode's token segments (keyed by a fingerprint of the vision weights) and reused
  at later turns. ``vision_stats`` counts encodes.
- Optional LoRA through peft.

The same class loads the embedded tiny model (``HFPolicy()``) and a real checkpoint
directory (``HFPolicy("/models/Qwen2.5-VL-3B-Instruct", dtype="bfloat16")``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmgym.agents.chat import Conversation, Message, message_parts
from mmgym.agents.policy import Generation, SamplingParams
from mmgym.agents.tokens import MODEL_INPUTS_KEY, ModelInputs, Segment, TokenState, build_rollout_batch, concat_media

if TYPE_CHECKING:
    import torch

    from mmgym.core import RolloutBatch, Trajectory

__all__ = ["HFPolicy", "LoraSettings", "ModelLoadError", "VisionStats"]

logger = logging.getLogger(__name__)

# Special tokens a VLM uses for image/video slots. Sampling one and feeding it back
# crashes the training forward ("Image features and image tokens do not match").
VISION_TOKEN_STRINGS = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<image>", "<video>", "<|image|>", "<|video|>", "<fake_token_around_image>", "<image_soft_token>",
    "<start_of_image>", "<end_of_image>", "<img>", "</img>", "<IMG_CONTEXT>",
)
# Model types whose ``get_image_features`` takes (pixel_values, image_grid_thw) with
# patches stacked per image and returns one feature block per image (cacheable).
_GRID_VISION_MODELS = ("qwen2_vl", "qwen2_5_vl")
_SEQ_INPUT_KEYS = ("input_ids", "attention_mask")
_PROBE_USER = "mmgym-probe-user"
_PROBE_REPLY = "mmgym-probe-reply"
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "mmgym_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}},
}


class ModelLoadError(ValueError):
    """A model directory that does not exist, does not load, or has no chat template."""


@dataclass(slots=True, frozen=True)
class LoraSettings:
    """LoRA adapters (peft) on the language model's linear layers.

    ``target_modules`` is a peft regex or list of module names; the default matches the
    attention and MLP projections of the language model only (not the vision tower).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")


@dataclass(slots=True)
class VisionStats:
    """Vision-encoder accounting. ``images_encoded`` counts images that went through the
    encoder; ``images_reused`` counts images served from the per-episode cache."""

    calls: int = 0
    images_encoded: int = 0
    images_reused: int = 0
    videos_encoded: int = 0

    def reset(self) -> None:
        self.calls = self.images_encoded = self.images_reused = self.videos_encoded = 0


@dataclass(slots=True)
class _Slot:
    """One image of a generation batch, in batch order (for the feature cache)."""

    segment: Segment
    index: int


@dataclass(slots=True)
class _Pending:
    conv: Conversation
    state: TokenState
    row: int
    out_index: int
    gen: Generation | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tiny_model_path() -> Path:
    """Folder of the embedded tiny Qwen2.5-VL (built by scripts/build_tiny_model.py)."""
    return Path(__file__).resolve().parents[1] / "assets" / "tiny_qwen2_5_vl"


class HFPolicy:
    """A transformers VLM as an mmgym ``Policy`` (see the module docstring).

    Args:
        model: a local checkpoint directory (default: the embedded tiny model).
        device: torch device for the model and its inputs.
        dtype: ``None`` (the checkpoint's own, float32 for the tiny model), ``"auto"``,
            ``"bfloat16"``, ... or a ``torch.dtype``.
        lora: wrap the model with LoRA adapters (only they are trainable).
        max_context: context length in tokens (default: the model's max positions).
        tool_result_role: chat role for tool results, ``"user"`` (works with every
            template) or ``"tool"``.
        cache_vision: reuse each image's encoder output within an episode.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ...).
        logprob_micro_batch: rows per forward in ``logprobs`` (``None``: all at once).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        lora: LoraSettings | None = None,
        max_context: int | None = None,
        tool_result_role: Literal["user", "tool"] = "user",
        cache_vision: bool = True,
        attn_implementation: str | None = "sdpa",
        logprob_micro_batch: int | None = None,
        trust_remote_code: bool = False,
    ):
        import torch

        path = Path(model) if model is not None else tiny_model_path()
        self.name = str(path)
        processor, hf_model = _load(path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
        self._setup(processor, hf_model, device=torch.device(device), lora=lora, max_context=max_context,
                    tool_result_role=tool_result_role, cache_vision=cache_vision, logprob_micro_batch=logprob_micro_batch)

    @classmethod
    def from_model(cls, model: Any, processor: Any, *, name: str = "in-memory", device: str | torch.device = "cpu",
                   lora: LoraSettings | None = None, max_context: int | None = None,
                   tool_result_role: Literal["user", "tool"] = "user", cache_vision: bool = True,
                   logprob_micro_batch: int | None = None) -> HFPolicy:
        """Wrap an already loaded model and processor."""
        import torch

        self = cls.__new__(cls)
        self.name = name
        _check_chat_template(processor, name)
        self._setup(processor, model, device=torch.device(device), lora=lora, max_context=max_context,
                    tool_result_role=tool_result_role, cache_vision=cache_vision, logprob_micro_batch=logprob_micro_batch)
        return self

    def _setup(self, processor: Any, model: Any, *, device: torch.device, lora: LoraSettings | None, max_context: int | None,
               tool_result_role: str, cache_vision: bool, logprob_micro_batch: int | None) -> None:
        import torch

        if tool_result_role not in ("user", "tool"):
            raise ValueError(f"tool_result_role must be 'user' or 'tool', got {tool_result_role!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.device = device
        self.tool_result_role = tool_result_role
        self.logprob_micro_batch = logprob_micro_batch
        self.vision_stats = VisionStats()
        self._cache_slots: list[_Slot] | None = None
        model.to(device)
        model.eval()
        config = model.config
        self.model_type = str(getattr(config, "model_type", ""))
        self._vision_module = _find_vision_owner(model)
        self.cache_vision = bool(cache_vision and self.model_type in _GRID_VISION_MODELS and self._vision_module is not None)
        if self._vision_module is not None:
            self._patch_vision(self._vision_module)
        if lora is not None:
            model = _apply_lora(model, lora)
        self.model = model
        self.lora = lora

        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_max = int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or 32768
        self.max_context = int(max_context) if max_context is not None else model_max
        if self.max_context < 16:
            raise ValueError(f"max_context must be >= 16 tokens, got {self.max_context}")
        vocab = int(getattr(text_cfg, "vocab_size", 0) or len(self.tokenizer))
        self.vocab_size = vocab
        self.pad_token_id = _pad_id(self.tokenizer, model)
        self.eos_token_ids = _eos_ids(self.tokenizer, model)
        suppress = set(_vision_token_ids(self.tokenizer, config))
        suppress.update(range(len(self.tokenizer), vocab))  # padded rows: no token to decode
        suppress -= set(self.eos_token_ids)
        self.suppress_token_ids = sorted(i for i in suppress if 0 <= i < vocab)
        self._suppress_mask = torch.zeros(vocab, dtype=torch.bool)
        self._suppress_mask[self.suppress_token_ids] = True
        self.image_token_id = _token_id(self.tokenizer, getattr(processor, "image_token", None)) or getattr(config, "image_token_id", None)
        self._frame = _ChatFrame(processor, tool_result_role)

    # ------------------------------------------------------------------ protocol
    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[Generation]:
        """Sample one reply per conversation (see the module docstring).

        Conversations whose input is rejected get ``finish_reason="error"``; those that
        cannot fit even after dropping old turns get ``finish_reason="budget"``; the rest
        of the batch goes on.
        """
        import torch

        results: list[Generation | None] = [None] * len(conversations)
        batch: list[_Pending] = []
        for i, conv in enumerate(conversations):
            state = self._sync(conv)
            if state.error is not None:
                results[i] = Generation(text="", finish_reason="error", error=state.error)
                continue
            if not self._fit(conv, state, sampling.max_new_tokens):
                results[i] = Generation(
                    text="",
                    finish_reason="budget",
                    error=(f"context full: {len(state)} prompt tokens + {sampling.max_new_tokens} new tokens exceed "
                           f"max_context={self.max_context} after dropping every droppable turn"),
                )
                continue
            batch.append(_Pending(conv=conv, state=state, row=len(batch), out_index=i))
        if batch:
            with torch.no_grad():
                gens = self._generate_batch([p.state for p in batch], sampling)
            for p, g in zip(batch, gens):
                results[p.out_index] = g
        return [g for g in results if g is not None]

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) log-prob of each token of ``batch.input_ids`` given its prefix, under the
        current weights, at the temperature the sampler used, with the same forbidden
        tokens; 0 where ``action_mask`` is 0. Differentiable (call under ``no_grad`` for
        reference/old log-probs)."""
        import torch

        B, T = batch.input_ids.shape
        inputs: list[ModelInputs | None] = list(batch.extras.get(MODEL_INPUTS_KEY) or [None] * B)
        temps = batch.extras.get("temperature")
        temps = torch.ones(B) if temps is None else torch.as_tensor(temps, dtype=torch.float32).reshape(B)
        step = self.logprob_micro_batch or B
        rows_out: list[torch.Tensor] = []
        for lo in range(0, B, max(1, step)):
            hi = min(B, lo + step)
            rows_out.append(self._logprobs_rows(batch, inputs, temps, lo, hi))
        out = torch.cat(rows_out, dim=0) if rows_out else torch.zeros(B, T)
        return torch.where(batch.action_mask.to(out.device), out, torch.zeros((), device=out.device, dtype=out.dtype))

    # ------------------------------------------------------------------ helpers for users
    def build_batch(self, trajectories: list[Trajectory], **kw: Any) -> RolloutBatch:
        """``build_rollout_batch`` with this model's pad id."""
        return build_rollout_batch(trajectories, self.pad_token_id, **kw)

    def parameters(self):
        return (p for p in self.model.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> HFPolicy:
        self.model.train(mode)
        return self

    def eval(self) -> HFPolicy:
        return self.train(False)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights under the base model's names (LoRA merged in), e.g. for vLLM."""
        if self.lora is None:
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        self.model.merge_adapter()
        try:
            out: dict[str, torch.Tensor] = {}
            for k, v in self.model.state_dict().items():
                if "lora_" in k:
                    continue
                name = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
                out[name] = v.detach().clone()
            return out
        finally:
            self.model.unmerge_adapter()

    def render(self, conv: Conversation) -> str:
        """The conversation as the chat template renders it (for inspection)."""
        return self._frame.render(conv.system, conv.tools, conv.to_chat(with_media=False)[int(conv.system is not None):],
                                  add_generation_prompt=bool(conv.messages) and conv.messages[-1].role != "assistant")

    def __repr__(self) -> str:
        return f"HFPolicy({self.name!r}, params={self.num_parameters():,}, device={self.device})"

    # ------------------------------------------------------------------ token state
    def _sync(self, conv: Conversation) -> TokenState:
        """Bring ``conv.state`` up to date with ``conv.messages`` (append-only)."""
        state = conv.state
        msgs = conv.messages
        if not isinstance(state, TokenState) or state.owner is not self._frame or state.n_msgs > len(msgs):
            state = TokenState(owner=self._frame)
            conv.state = state
        if state.error is not None:
            return state
        try:
            self._consume(conv, state)
        except _InputRejected as e:
            state.error = str(e)
        return state

    def _consume(self, conv: Conversation, state: TokenState) -> None:
        msgs = conv.messages
        if not msgs:
            raise _InputRejected("the conversation has no messages")
        i = state.n_msgs
        if i == 0:
            first = msgs[0]
            if first.role not in ("user", "tool"):
                raise _InputRejected(f"the first message must be the task (role user), got role {first.role!r}")
            text = self._frame.prompt_text(conv.system, conv.tools, first)
            state.append(self._segment("prompt", first.turn, text, first))
            i = 1
        while i < len(msgs):
            m = msgs[i]
            prev = msgs[i - 1]
            if m.role == "assistant":
                if prev.role == "assistant":
                    raise _InputRejected("two assistant messages in a row")
                pending = state.pending
                if pending is not None and pending.text == m.text:
                    pending.closed = True
                    close = self._frame.close_text(ended_with=self._token_text(pending.ids[-1]) if pending.ended else None)
                    if close:
                        state.append(self._text_segment("close", pending.turn, close))
                else:
                    if pending is not None:  # the recorded reply was replaced: keep the text as given
                        state.segments.pop()
                    text = self._frame.given_text(conv.system, conv.tools, m)
                    seg = self._text_segment("given", m.turn, text)
                    seg.text = m.text
                    state.append(seg)
            else:
                if prev.role != "assistant":
                    raise _InputRejected("observations must alternate with assistant replies")
                text = self._frame.obs_text(conv.system, conv.tools, m)
                state.append(self._segment("obs", m.turn, text, m))
            i += 1
            state.n_msgs = i
        state.n_msgs = len(msgs)
        if msgs[-1].role == "assistant":
            raise _InputRejected("the conversation ends with an assistant message: nothing to reply to")

    def _segment(self, kind: Any, turn: int, text: str, msg: Message) -> Segment:
        """Process one rendered chunk with its media through the model's processor."""
        import numpy as np

        images = [np.ascontiguousarray(im) for im in msg.images]
        videos = [np.stack([np.asarray(f) for f in msg.frames])] if msg.frames else []
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            kwargs["do_sample_frames"] = False
        try:
            for k, im in enumerate(images):
                if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8 or min(im.shape[:2]) < 1:
                    raise ValueError(f"image {k} must be uint8 HxWx3, got {im.dtype} {im.shape}")
            out = self.processor(**kwargs)
        except Exception as e:  # the processor rejected this observation's media
            raise _InputRejected(f"the processor rejected turn {turn}'s input: {type(e).__name__}: {e}") from e
        ids = out["input_ids"][0].tolist()
        seq: dict[str, list[int]] = {}
        media: dict[str, Any] = {}
        for k, v in out.items():
            if k in _SEQ_INPUT_KEYS:
                continue
            if hasattr(v, "shape") and v.ndim == 2 and v.shape[0] == 1 and v.shape[1] == len(ids) and k.endswith("ids"):
                seq[k] = v[0].tolist()
            elif v is not None:
                media[k] = v
        n_img = len(images)
        if self.image_token_id is not None and n_img == 0 and self.image_token_id in ids:
            raise _InputRejected(f"turn {turn}'s text holds image tokens but no image")
        return Segment(kind=kind, turn=turn, ids=ids, seq=seq, media=media, num_images=n_img, num_videos=len(videos),
                       features=[None] * n_img)

    def _text_segment(self, kind: Any, turn: int, text: str) -> Segment:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Segment(kind=kind, turn=turn, ids=list(ids))

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id)) or ""

    def _fit(self, conv: Conversation, state: TokenState, max_new: int) -> bool:
        """Drop whole oldest turns (with their images) until prompt + max_new fits."""
        while len(state) + max_new > self.max_context:
            turns = state.droppable_turns()
            if not turns:
                return False
            state.drop_turn(turns[0])
            conv.drop_turn(turns[0])
            logger.debug("dropped turn %d to fit max_context=%d", turns[0], self.max_context)
        return True

    # ------------------------------------------------------------------ sampling
    def _generate_batch(self, states: list[TokenState], sampling: SamplingParams) -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        inputs, slots = self._collate(states, pad_left=True)
        prompt_len = inputs["input_ids"].shape[1]
        gen_cfg = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=None if sampling.greedy else sampling.temperature,
            top_p=None if sampling.greedy else sampling.top_p,
            top_k=None if sampling.greedy else 0,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            suppress_tokens=list(self.suppress_token_ids) or None,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=True,
        )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self._cache_slots = slots if self.cache_vision else None
        try:
            out = self.model.generate(**inputs, generation_config=gen_cfg,
                                      **({"stop_strings": list(sampling.stop), "tokenizer": self.tokenizer} if sampling.stop else {}))
        finally:
            self._cache_slots = None
        new = out.sequences[:, prompt_len:].cpu()
        n_dropped_now = [len(s.dropped) for s in states]
        temp = sampling.logprob_temperature
        mask = self._suppress_mask.to(out.logits[0].device) if out.logits else None
        gens: list[Generation] = []
        eos = set(self.eos_token_ids)
        for b, state in enumerate(states):
            row = new[b].tolist()
            n, ended = len(row), False
            for j, t in enumerate(row):
                if t in eos:
                    n, ended = j + 1, True
                    break
            stopped = False
            if sampling.stop:
                cut = _stop_cut(self.tokenizer, row[: n - 1 if ended else n], sampling.stop)
                if cut is not None:
                    n, ended, stopped = cut, False, True
            ids = row[:n]
            lps: list[float] = []
            if ids:
                step_logits = torch.stack([out.logits[j][b] for j in range(n)]).float() / temp
                step_logits = step_logits.masked_fill(mask, float("-inf"))
                lp = torch.log_softmax(step_logits, dim=-1).gather(1, torch.tensor(ids, device=step_logits.device)[:, None])
                lps = lp[:, 0].cpu().tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            finish = "stop" if (ended or stopped) else "length"
            state.append(Segment(kind="gen", turn=state.current_turn(), ids=ids, logprobs=lps,
                                 context=n_dropped_now[b], ended=ended, text=text))
            gens.append(Generation(text=text, token_ids=ids, logprobs=lps, finish_reason=finish))
        return gens

    def _collate(self, states: list[TokenState], *, pad_left: bool) -> tuple[dict[str, Any], list[_Slot]]:
        """Pad the active segments of each state into model inputs (+ image slots)."""
        import torch

        seqs = [s.ids() for s in states]
        L = max(len(s) for s in seqs)
        B = len(states)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        seq_keys = sorted({k for st in states for seg in st.active() for k in seg.seq})
        seq = {k: torch.zeros((B, L), dtype=torch.long) for k in seq_keys}
        media_parts: list[dict[str, Any]] = []
        slots: list[_Slot] = []
        for b, st in enumerate(states):
            ids = seqs[b]
            off = L - len(ids) if pad_left else 0
            input_ids[b, off: off + len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, off: off + len(ids)] = 1
            pos = off
            for seg in st.active():
                for k in seg.seq:
                    seq[k][b, pos: pos + len(seg)] = torch.tensor(seg.seq[k], dtype=torch.long)
                pos += len(seg)
                if seg.media:
                    media_parts.append(seg.media)
                slots.extend(_Slot(seg, j) for j in range(seg.num_images))
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, **seq}
        inputs.update(concat_media(media_parts))
        self._check_image_tokens(inputs, len(slots))
        return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}, slots

    def _check_image_tokens(self, inputs: dict[str, Any], n_images: int) -> None:
        """Guard: image tokens must equal image features (never cut through an image)."""
        grid = inputs.get("image_grid_thw")
        if self.image_token_id is None or grid is None:
            return
        merge = int(getattr(getattr(self.processor, "image_processor", None), "merge_size", 1) or 1)
        expected = int((grid.prod(-1) // (merge * merge)).sum())
        found = int((inputs["input_ids"] == self.image_token_id).sum())
        if found != expected or grid.shape[0] != n_images:
            raise RuntimeError(f"mmgym bug: {found} image tokens for {expected} image features ({n_images} images)")

    # ------------------------------------------------------------------ training forward
    def _logprobs_rows(self, batch: RolloutBatch, inputs: list[ModelInputs | None], temps: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        import torch

        T = batch.input_ids.shape[1]
        am = batch.attention_mask[lo:hi]
        lengths = am.sum(-1)
        t_max = int(lengths.max()) if len(lengths) else 0
        out = torch.zeros((hi - lo, T), dtype=torch.float32, device=self.device)
        if t_max < 2:
            return out
        ids = batch.input_ids[lo:hi, :t_max].to(self.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": am[:, :t_max].long().to(self.device)}
        rows = inputs[lo:hi]
        seq_keys = sorted({k for mi in rows if mi is not None for k in mi.seq})
        for k in seq_keys:
            t = torch.zeros((hi - lo, t_max), dtype=torch.long)
            for r, mi in enumerate(rows):
                if mi is not None and k in mi.seq:
                    vals = mi.seq[k][:t_max]
                    t[r, : len(vals)] = torch.tensor(vals, dtype=torch.long)
            kwargs[k] = t.to(self.device)
        media = concat_media([mi.media for mi in rows if mi is not None and mi.media])
        kwargs.update({k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in media.items()})
        self._check_image_tokens(kwargs, sum(mi.num_images for mi in rows if mi is not None))
        logits = self.model(**kwargs, use_cache=False).logits[:, :-1].float()
        temp = temps[lo:hi].to(logits.device).clamp_min(1e-6)[:, None, None]
        logits = (logits / temp).masked_fill(self._suppress_mask.to(logits.device), float("-inf"))
        lp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])[..., 0]
        out = torch.cat([torch.zeros((hi - lo, 1), device=lp.device, dtype=lp.dtype), lp,
                         torch.zeros((hi - lo, T - t_max), device=lp.device, dtype=lp.dtype)], dim=1)
        return out

    # ------------------------------------------------------------------ vision cache
    def _patch_vision(self, owner: Any) -> None:
        """Wrap ``owner.get_image_features`` to count encodes and serve cached features."""
        original = owner.get_image_features
        policy = self

        def get_image_features(pixel_values: Any, image_grid_thw: Any = None, **kwargs: Any) -> Any:
            slots = policy._cache_slots
            n_images = int(image_grid_thw.shape[0]) if image_grid_thw is not None else int(pixel_values.shape[0])
            if slots is None or image_grid_thw is None or len(slots) != n_images:
                policy.vision_stats.calls += 1
                policy.vision_stats.images_encoded += n_images
                return original(pixel_values, image_grid_thw, **kwargs)
            return policy._cached_features(original, pixel_values, image_grid_thw, slots, kwargs)

        owner.get_image_features = get_image_features

        if hasattr(owner, "get_video_features"):
            original_video = owner.get_video_features

            def get_video_features(pixel_values_videos: Any, video_grid_thw: Any = None, **kwargs: Any) -> Any:
                policy.vision_stats.videos_encoded += int(video_grid_thw.shape[0]) if video_grid_thw is not None else 1
                return original_video(pixel_values_videos, video_grid_thw, **kwargs)

            owner.get_video_features = get_video_features

    def _vision_fingerprint(self) -> tuple[int, ...]:
        visual = getattr(self._vision_module, "visual", None)
        if visual is None:
            return ()
        return tuple(int(getattr(p, "_version", 0)) for p in visual.parameters()) + (id(visual),)

    def _cached_features(self, original: Any, pixel_values: Any, grid: Any, slots: list[_Slot], kwargs: dict[str, Any]) -> Any:
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        fp = self._vision_fingerprint()
        patches = grid.prod(-1).tolist()
        starts = [0]
        for n in patches:
            starts.append(starts[-1] + int(n))
        missing = [i for i, s in enumerate(slots) if not _fresh(s.segment.features[s.index], fp)]
        if missing:
            rows = torch.cat([pixel_values[starts[i]: starts[i + 1]] for i in missing], dim=0)
            enc = original(rows, grid[missing], return_dict=True, **{k: v for k, v in kwargs.items() if k != "return_dict"})
            feats = enc.pooler_output
            for i, f in zip(missing, feats):
                slots[i].segment.features[slots[i].index] = (fp, f.detach())
            self.vision_stats.calls += 1
            self.vision_stats.images_encoded += len(missing)
        self.vision_stats.images_reused += len(slots) - len(missing)
        pooled = tuple(s.segment.features[s.index][1] for s in slots)
        return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=pooled)


class _InputRejected(Exception):
    """Per-conversation input problem (recorded on the episode, never raised to callers)."""


def _fresh(entry: Any, fp: tuple[int, ...]) -> bool:
    return entry is not None and entry[0] == fp


class _ChatFrame:
    """Renders pieces of a conversation with the model's chat template.

    Every later piece is cut out of a full rendering as the text after a probe prefix,
    so the pieces concatenate to exactly what the template renders for the whole chat.
    """

    def __init__(self, processor: Any, tool_result_role: str):
        self.processor = processor
        self.tool_result_role = tool_result_role
        self.tools_in_template = self._detect_tools()
        base = self._render_raw([{"role": "user", "content": [{"type": "text", "text": _PROBE_USER}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": _PROBE_REPLY}]}], None, False)
        at = base.rfind(_PROBE_REPLY)
        if at < 0:
            raise ModelLoadError("the chat template does not render assistant messages")
        self.close = base[at + len(_PROBE_REPLY):]

    # templates differ in how they take content; HF processors accept content-part lists
    def _render_raw(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool) -> str:
        kw: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kw["tools"] = tools
        apply = getattr(self.processor, "apply_chat_template")
        if getattr(self.processor, "chat_template", None) is None and hasattr(self.processor, "tokenizer"):
            apply = self.processor.tokenizer.apply_chat_template
        text = apply(messages, **kw)
        if isinstance(text, list):
            text = text[0]
        return str(text)

    def _detect_tools(self) -> bool:
        msgs = [{"role": "user", "content": [{"type": "text", "text": _PROBE_USER}]}]
        try:
            with_tools = self._render_raw(msgs, [_PROBE_TOOL], True)
        except Exception:
            return False
        return "mmgym_probe_tool" in with_tools

    def _head(self, system: str | None, tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """System message (with a tool description when the template ignores ``tools=``)."""
        if tools and not self.tools_in_template:
            system = ((system + "\n\n") if system else "") + hermes_tool_prompt(tools)
            tools = None
        head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
        return head, tools

    def render(self, system: str | None, tools: list[dict[str, Any]] | None, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        head, tools = self._head(system, tools)
        return self._render_raw(head + messages, tools, add_generation_prompt)

    def prompt_text(self, system: str | None, tools: list[dict[str, Any]] | None, first: Message) -> str:
        return self.render(system, tools, [_chat(first, "user")], True)

    def _suffix(self, system: str | None, tools: list[dict[str, Any]] | None, prefix: list[dict[str, Any]],
                prefix_gen: bool, piece: dict[str, Any], gen: bool) -> str:
        base = self.render(system, tools, prefix, prefix_gen)
        full = self.render(system, tools, prefix + [piece], gen)
        if not full.startswith(base):
            raise _InputRejected("the chat template is not prefix-stable (a later message changes earlier text); "
                                 "multi-turn rollouts need a template that only appends")
        return full[len(base):]

    def obs_text(self, system: str | None, tools: list[dict[str, Any]] | None, m: Message) -> str:
        probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE_USER}]},
                 {"role": "assistant", "content": [{"type": "text", "text": _PROBE_REPLY}]}]
        return self._suffix(system, tools, probe, False, _chat(m, self.tool_result_role if m.role == "tool" else "user"), True)

    def given_text(self, system: str | None, tools: list[dict[str, Any]] | None, m: Message) -> str:
        probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE_USER}]}]
        return self._suffix(system, tools, probe, True, {"role": "assistant", "content": [{"type": "text", "text": m.text}]}, False)

    def close_text(self, ended_with: str | None) -> str:
        """What follows a sampled reply: the template's message end, minus the
        end-of-turn token when the model already produced it."""
        if ended_with and self.close.startswith(ended_with):
            return self.close[len(ended_with):]
        return self.close


def _chat(m: Message, role: str) -> dict[str, Any]:
    return {"role": role, "content": message_parts(m, with_media=False)}


def hermes_tool_prompt(tools: list[dict[str, Any]]) -> str:
    """Qwen2.5 / Hermes tool description, for templates that ignore ``tools=``."""
    import json

    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def _stop_cut(tokenizer: Any, ids: list[int], stops: tuple[str, ...]) -> int | None:
    """Smallest k such that decode(ids[:k]) contains a stop string (None if none does)."""
    if not ids:
        return None
    full = tokenizer.decode(ids, skip_special_tokens=False)
    if not any(s in full for s in stops):
        return None
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        if any(s in text for s in stops):
            return k
    return None


# ---------------------------------------------------------------------- loading
def _check_chat_template(processor: Any, name: str) -> None:
    tok = getattr(processor, "tokenizer", None)
    if getattr(processor, "chat_template", None) is None and getattr(tok, "chat_template", None) is None:
        raise ModelLoadError(f"model {name!r} has no chat template (processor and tokenizer have none); "
                             "add chat_template.jinja to the model folder")


def _load(path: Path, *, dtype: Any, attn_implementation: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} does not exist or is not a folder "
                             "(HFPolicy loads local checkpoint folders; download the model first)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {str(path)!r} has no config.json: not a transformers checkpoint folder")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"could not load a processor from {str(path)!r}: {type(e).__name__}: {e}") from e
    _check_chat_template(processor, str(path))
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
    except Exception as e:
        raise ModelLoadError(f"could not load an image-text-to-text model from {str(path)!r}: {type(e).__name__}: {e}") from e
    return processor, model


def _find_vision_owner(model: Any) -> Any:
    """The module whose ``get_image_features`` the forward pass calls (the inner model)."""
    for mod in model.modules():
        if hasattr(mod, "visual") and hasattr(mod, "get_image_features") and hasattr(mod, "language_model"):
            return mod
    for mod in model.modules():
        if mod is not model and hasattr(mod, "get_image_features"):
            return mod
    return None


def _apply_lora(model: Any, lora: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")
    return get_peft_model(model, cfg)


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    if not token:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if tid is None or (unk is not None and tid == unk and token != tokenizer.unk_token) else int(tid)


def _vision_token_ids(tokenizer: Any, config: Any) -> list[int]:
    ids = set()
    vocab = tokenizer.get_vocab()
    for s in VISION_TOKEN_STRINGS:
        if s in vocab:
            ids.add(int(vocab[s]))
    for attr in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "image_token_index", "video_token_index", "boi_token_index", "eoi_token_index"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    return sorted(ids)


def _pad_id(tokenizer: Any, model: Any) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(model.generation_config, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def _eos_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    ids: list[int] = []
    g = getattr(model.generation_config, "eos_token_id", None)
    for v in (g if isinstance(g, (list, tuple)) else [g]) + [getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    im_end = _token_id(tokenizer, "<|im_end|>")
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    if not ids:
        raise ModelLoadError("the model defines no end-of-sequence token (generation_config.eos_token_id)")
    return tuple(ids)
