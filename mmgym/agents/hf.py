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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmgym.agents.chat import Conversation
from mmgym.agents.encoder import EpisodeEncoder, ModelLoadError, check_chat_template
from mmgym.agents.policy import Generation, SamplingParams
from mmgym.agents.tokens import MODEL_INPUTS_KEY, ModelInputs, Segment, TokenState, build_rollout_batch, concat_media

if TYPE_CHECKING:
    import torch

    from mmgym.core import RolloutBatch, Trajectory

__all__ = ["HFPolicy", "LoraSettings", "ModelLoadError", "VisionStats"]

logger = logging.getLogger(__name__)

# Model types whose ``get_image_features`` takes (pixel_values, image_grid_thw) with
# patches stacked per image and returns one feature block per image (cacheable).
_GRID_VISION_MODELS = ("qwen2_vl", "qwen2_5_vl")


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
        trust_remote_code: passed to ``from_pretrained`` (for models outside transformers).
        add_tokens: tokens to make single vocabulary entries (e.g. a VLA env's action bins);
            those the tokenizer lacks are added and the embeddings grown (new rows at the mean
            of the old ones, padded to a multiple of 64). Saved checkpoints keep them.
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
        add_tokens: Sequence[str] = (),
    ):
        import torch

        path = Path(model) if model is not None else tiny_model_path()
        self.name = str(path)
        processor, hf_model = _load(path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
        self.added_tokens = add_vocabulary(processor, hf_model, add_tokens)
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
        self._setup(processor, model, device=torch.device(device), lora=lora, max_context=max_context,
                    tool_result_role=tool_result_role, cache_vision=cache_vision, logprob_micro_batch=logprob_micro_batch)
        return self

    def clone(self, *, name: str) -> HFPolicy:
        """An independent copy in eval mode: a deep copy of the model (the same parameters
        trainable, LoRA adapters included) with its own vision-feature wrapper, sharing the
        processor and settings. Use this, not ``copy.deepcopy(policy.model)``: the wrapper installed
        on the model is a closure over *this* model's vision tower, which a plain deep copy
        would keep, so the copy would read images with the original's (changing) weights."""
        import copy

        # memo {id(self): None}: the model's back-reference to this policy is not copied
        model = copy.deepcopy(self.model, {id(self): None})
        owner = _find_vision_owner(model)
        if owner is not None:
            for attr in ("get_image_features", "get_video_features", "_mmgym_patched", "_mmgym_policy"):
                owner.__dict__.pop(attr, None)
        twin = HFPolicy.from_model(model, self.processor, name=name, device=self.device, max_context=self.max_context,
                                   tool_result_role=self.encoder.tool_result_role, cache_vision=self.cache_vision,
                                   logprob_micro_batch=self.logprob_micro_batch)
        twin.lora = self.lora
        return twin

    def _setup(self, processor: Any, model: Any, *, device: torch.device, lora: LoraSettings | None, max_context: int | None,
               tool_result_role: str, cache_vision: bool, logprob_micro_batch: int | None) -> None:
        import torch

        self.encoder = EpisodeEncoder(processor, model.config, getattr(model, "generation_config", None),
                                      max_context=max_context, tool_result_role=tool_result_role, name=self.name)
        self.processor = processor
        self.tokenizer = self.encoder.tokenizer
        self.device = device
        self.logprob_micro_batch = logprob_micro_batch
        self.vision_stats = VisionStats()
        self._cache_slots: list[_Slot] | None = None
        model.to(device)
        model.eval()
        self.model_type = str(getattr(model.config, "model_type", ""))
        self._vision_module = _find_vision_owner(model)
        self.cache_vision = bool(cache_vision and self.model_type in _GRID_VISION_MODELS and self._vision_module is not None)
        if self._vision_module is not None:
            self._patch_vision(self._vision_module)
        if lora is not None:
            model = _apply_lora(model, lora)
        self.model = model
        self.lora = lora
        self._suppress_mask = torch.zeros(self.encoder.vocab_size, dtype=torch.bool)
        self._suppress_mask[self.encoder.suppress_token_ids] = True

    @property
    def max_context(self) -> int:
        return self.encoder.max_context

    @max_context.setter
    def max_context(self, value: int) -> None:
        if value < 16:
            raise ValueError(f"max_context must be >= 16 tokens, got {value}")
        self.encoder.max_context = int(value)

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.encoder.eos_token_ids

    @property
    def suppress_token_ids(self) -> list[int]:
        return self.encoder.suppress_token_ids

    @property
    def image_token_id(self) -> int | None:
        return self.encoder.image_token_id

    # ------------------------------------------------------------------ protocol
    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[Generation]:
        """Sample one reply per conversation (see the module docstring).

        Conversations whose input is rejected get ``finish_reason="error"``; those that
        cannot fit even after dropping old turns get ``finish_reason="budget"``; the rest
        of the batch goes on.
        """
        import torch

        results, ready = self.encoder.prepare(conversations, sampling.max_new_tokens)
        if ready:
            training = self.model.training
            self.model.eval()  # sample from the policy itself, never with dropout
            try:
                with torch.no_grad():
                    gens = self._generate_batch([p.state for p in ready], sampling)
            finally:
                self.model.train(training)
            for p, g in zip(ready, gens):
                results[p.index] = g
        return [g for g in results if g is not None]

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) log-prob of each token of ``batch.input_ids`` given its prefix, under the
        current weights, at the temperature the sampler used, with the same forbidden
        tokens; 0 where ``action_mask`` is 0. Differentiable (call under ``no_grad`` for
        reference/old log-probs). The model runs in its current mode: keep dropout off
        (``eval()``, the default) for ratios that start at exactly 1."""
        import torch

        B, T = batch.input_ids.shape
        inputs, temps, chunks = self._row_chunks(batch)
        out = torch.zeros((B, T), dtype=torch.float32, device=self.device)
        for idx in chunks:
            out[idx] = self._logprobs_rows(batch, inputs, temps, idx)
        return torch.where(batch.action_mask.to(out.device), out, torch.zeros((), device=out.device, dtype=out.dtype))

    def token_distributions(self, batch: RolloutBatch, *, blank_images: bool) -> torch.Tensor:
        """(B, A, V) log-probabilities over the vocabulary at each generated token, the
        distribution that token was drawn from: same temperature and forbidden tokens
        (-inf) as ``logprobs``, under the current weights, without gradient.

        Generated tokens are packed to the left in order: entry ``[b, a]`` is row ``b``'s
        ``a``-th token with ``action_mask`` 1, whose column is
        ``mmgym.agents.tokens.action_positions(batch.action_mask)[0][b, a]``; entries past a
        row's count are 0 (not a distribution). Only these positions are kept, computed in
        ``logprob_micro_batch`` rows at a time, so memory is B x A x V rather than B x T x V.

        ``blank_images=True`` runs the same token sequence with every image (and video
        frame) replaced by a constant: the processor's ``pixel_values`` set to 0, which
        after the processor's mean/std normalisation is a mean-gray picture. Image tokens,
        positions and grids are unchanged, so only what the vision tower sees differs
        (VPPO's "without the image" forward, arXiv:2510.09285).
        """
        import torch

        from mmgym.agents.tokens import action_positions

        B = batch.input_ids.shape[0]
        positions, valid = action_positions(batch.action_mask)
        V = self.encoder.vocab_size
        out = torch.zeros((B, positions.shape[1], V), dtype=torch.float32, device=self.device)
        inputs, temps, chunks = self._row_chunks(batch)
        with torch.no_grad():
            for idx in chunks:
                logits, _ = self._forward_rows(batch, inputs, temps, idx, blank_images=blank_images)
                # logits[:, j] predicts token j + 1; padded slots (column T) read column 0
                src = (positions[idx] - 1).clamp(0, logits.shape[1] - 1).to(logits.device)
                at = logits.gather(1, src.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
                lp = torch.log_softmax(at, dim=-1)
                out[idx] = torch.where(valid[idx].to(lp.device).unsqueeze(-1), lp, torch.zeros((), device=lp.device))
        return out

    # ------------------------------------------------------------------ helpers for users
    def build_batch(self, trajectories: list[Trajectory], **kw: Any) -> RolloutBatch:
        """``build_rollout_batch`` with this model's pad id."""
        return build_rollout_batch(trajectories, self.pad_token_id, **kw)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The trainable parameters (only the adapters with LoRA)."""
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
        """The conversation as the chat template renders it (what the model reads, with
        one placeholder token per image)."""
        return self.encoder.render(conv)

    def __repr__(self) -> str:
        return f"HFPolicy({self.name!r}, params={self.num_parameters():,}, device={self.device})"

    # ------------------------------------------------------------------ sampling
    def _generate_batch(self, states: list[TokenState], sampling: SamplingParams) -> list[Generation]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        inputs, slots = self._collate(states, pad_left=True)
        prompt_len = inputs["input_ids"].shape[1]
        cfg: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=True,
        )
        if not sampling.greedy:  # a fresh config: no top-k or repetition penalty from the checkpoint
            cfg.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if self.suppress_token_ids:
            cfg["suppress_tokens"] = list(self.suppress_token_ids)
        criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, sampling.stop, prompt_len)]) if sampling.stop else None
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self._cache_slots = slots if self.cache_vision else None
        try:
            out = self.model.generate(**inputs, generation_config=GenerationConfig(**cfg), stopping_criteria=criteria)
        finally:
            self._cache_slots = None
        new = out.sequences[:, prompt_len:].cpu()
        temp = sampling.logprob_temperature
        mask = self._suppress_mask.to(out.logits[0].device) if out.logits else None
        gens: list[Generation] = []
        for b, state in enumerate(states):
            row = new[b].tolist()
            n, ended, stopped = self.encoder.finish_reply(row, sampling.stop)
            ids = row[:n]
            lps: list[float] = []
            if ids:
                step_logits = torch.stack([out.logits[j][b] for j in range(n)]).float() / temp
                step_logits = step_logits.masked_fill(mask, float("-inf"))
                index = torch.tensor(ids, device=step_logits.device)[:, None]
                lps = torch.log_softmax(step_logits, dim=-1).gather(1, index)[:, 0].cpu().tolist()
            text = self.encoder.decode(ids)
            self.encoder.add_reply(state, ids, lps, ended=ended, text=text)
            gens.append(Generation(text=text, token_ids=ids, logprobs=lps, finish_reason="stop" if (ended or stopped) else "length"))
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
        expected = self.encoder.count_image_tokens(grid)
        found = int((inputs["input_ids"] == self.image_token_id).sum())
        if found != expected or grid.shape[0] != n_images:
            raise RuntimeError(f"mmgym bug: {found} image tokens for {expected} image features ({n_images} images)")

    # ------------------------------------------------------------------ training forward
    def _row_chunks(self, batch: RolloutBatch) -> tuple[list[ModelInputs | None], torch.Tensor, list[list[int]]]:
        """Per-row model inputs, (B,) sampling temperatures, and the rows with at least 2
        tokens (empty rows of scripted or failed episodes are skipped) in micro-batches."""
        import torch

        B = batch.input_ids.shape[0]
        inputs: list[ModelInputs | None] = list(batch.extras.get(MODEL_INPUTS_KEY) or [None] * B)
        temps = batch.extras.get("temperature")
        temps = torch.ones(B) if temps is None else torch.as_tensor(temps, dtype=torch.float32).reshape(B)
        lengths = batch.attention_mask.sum(-1).tolist()
        rows = [b for b in range(B) if lengths[b] >= 2]
        step = self.logprob_micro_batch or max(1, len(rows))
        return inputs, temps, [rows[lo: lo + step] for lo in range(0, len(rows), step)]

    def _logprobs_rows(self, batch: RolloutBatch, inputs: list[ModelInputs | None], temps: torch.Tensor,
                       idx: list[int]) -> torch.Tensor:
        """(len(idx), T) log-probs of rows ``idx`` (each with at least 2 tokens)."""
        import torch

        T = batch.input_ids.shape[1]
        n = len(idx)
        logits, ids = self._forward_rows(batch, inputs, temps, idx)
        t_max = ids.shape[1]
        # log-softmax at the sampled ids without a second (B, T, V) tensor
        lp = logits.gather(2, ids[:, 1:, None])[..., 0] - torch.logsumexp(logits, dim=-1)
        zero = torch.zeros((), device=lp.device, dtype=lp.dtype)
        return torch.cat([zero.expand(n, 1), lp, zero.expand(n, T - t_max)], dim=1)

    def _forward_rows(self, batch: RolloutBatch, inputs: list[ModelInputs | None], temps: torch.Tensor,
                      idx: list[int], *, blank_images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of rows ``idx``, cut to their longest sequence ``t_max``: float32
        logits (n, t_max - 1, V_model) predicting tokens 1..t_max-1, divided by each row's
        temperature, forbidden tokens at -inf; and the input ids (n, t_max).
        ``blank_images``: pixel values set to 0 (see ``token_distributions``)."""
        import torch

        n = len(idx)
        am = batch.attention_mask[idx]
        t_max = int(am.sum(-1).max())
        ids = batch.input_ids[idx, :t_max].to(self.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": am[:, :t_max].long().to(self.device)}
        rows = [inputs[b] for b in idx]
        for k in sorted({k for mi in rows if mi is not None for k in mi.seq}):
            t = torch.zeros((n, t_max), dtype=torch.long)
            for r, mi in enumerate(rows):
                if mi is not None and k in mi.seq:
                    vals = mi.seq[k][:t_max]
                    t[r, : len(vals)] = torch.tensor(vals, dtype=torch.long)
            kwargs[k] = t.to(self.device)
        media = concat_media([mi.media for mi in rows if mi is not None and mi.media])
        if blank_images:
            media = {k: (torch.zeros_like(v) if k.startswith("pixel_values") and isinstance(v, torch.Tensor) else v)
                     for k, v in media.items()}
        kwargs.update({k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in media.items()})
        self._check_image_tokens(kwargs, sum(mi.num_images for mi in rows if mi is not None))
        logits = self.model(**kwargs, use_cache=False).logits[:, :-1].float()
        temp = temps[idx].to(logits.device).clamp_min(1e-6)[:, None, None]
        logits = (logits / temp).masked_fill(self._suppress_mask.to(logits.device), float("-inf"))
        return logits, ids

    # ------------------------------------------------------------------ vision cache
    def _patch_vision(self, owner: Any) -> None:
        """Wrap ``owner.get_image_features`` to count encodes and serve cached features."""
        owner._mmgym_policy = self  # the wrappers serve the newest policy built on this model
        if getattr(owner, "_mmgym_patched", False):
            return
        owner._mmgym_patched = True
        original = owner.get_image_features

        def get_image_features(pixel_values: Any, image_grid_thw: Any = None, **kwargs: Any) -> Any:
            policy = owner._mmgym_policy
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
                owner._mmgym_policy.vision_stats.videos_encoded += int(video_grid_thw.shape[0]) if video_grid_thw is not None else 1
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


class _StopStrings:
    """Stops a row once its *generated* text contains a stop string (the prompt never
    counts, unlike transformers' ``stop_strings``, which also matches across it)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:].tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


def _fresh(entry: Any, fp: tuple[int, ...]) -> bool:
    return entry is not None and entry[0] == fp


# ---------------------------------------------------------------------- loading
def add_vocabulary(processor: Any, model: Any, tokens: Sequence[str]) -> int:
    """Add the ``tokens`` the processor's tokenizer lacks as whole tokens and grow the model's
    (tied or untied) embeddings to match; returns how many were added (0: nothing changed)."""
    tok = getattr(processor, "tokenizer", processor)
    vocab = tok.get_vocab()
    missing = list(dict.fromkeys(t for t in tokens if t not in vocab))
    if not missing:
        return 0
    bad = [t for t in missing if not isinstance(t, str) or not t or t != t.strip()]
    if bad:
        raise ValueError(f"tokens to add must be non-empty strings without surrounding spaces, got {bad[:3]!r}")
    tok.add_tokens(missing)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    ids = tok(missing[0], add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ModelLoadError(f"the tokenizer still splits the added token {missing[0]!r} into {len(ids)} pieces")
    logger.info("added %d tokens to the vocabulary (%d embedding rows)", len(missing), model.get_input_embeddings().weight.shape[0])
    return len(missing)


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
    check_chat_template(processor, str(path))
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype")
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kw["dtype"] = dtype
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


