"""``VLLMPolicy``: fast GPU rollout with vLLM (extra ``vllm``), weights synced from the learner.

Conversations go through the same ``EpisodeEncoder`` as ``HFPolicy`` (the model's own
chat template and processor, exact token bookkeeping, visual-token budget), so a
trajectory sampled here trains with ``HFPolicy.logprobs`` unchanged. vLLM receives each
context as token ids with one image placeholder per image plus the raw images in
``multi_modal_data`` (vLLM expands the placeholders with the same processor settings).

Sampling maps ``SamplingParams`` to ``vllm.SamplingParams`` (``logprobs=0``: the
sampled token's log-prob only). With vLLM's ``logprobs_mode="processed_logprobs"``
(vLLM >= 0.10) the recorded log-probs are of the tempered distribution, as in
``HFPolicy`` (with ``top_p < 1`` vLLM may also renormalise over the nucleus; HF's are
un-truncated); older vLLM returns raw (temperature-1) log-probs, and
``logprob_temperature`` says so, so the learner recomputes at the same temperature.
Forbidden tokens (vision specials) get vLLM's strongest ``logit_bias`` (-100).

Weights: ``load_weights(state_dict)`` / ``sync_from(hf_policy)`` push the learner's
weights (LoRA merged) into the running engine and reset its prefix cache.

vLLM is imported when a ``VLLMPolicy`` is built, never at ``import mmgym.agents``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmgym.agents.chat import Conversation
from mmgym.agents.encoder import EpisodeEncoder, ModelLoadError
from mmgym.agents.policy import Generation, SamplingParams
from mmgym.agents.tokens import TokenState, build_rollout_batch

if TYPE_CHECKING:
    import torch

    from mmgym.agents.hf import HFPolicy
    from mmgym.core import RolloutBatch, Trajectory

__all__ = ["VLLMPolicy", "import_vllm"]

logger = logging.getLogger(__name__)

_BIAS_FORBID = -100.0  # vLLM clamps logit_bias to [-100, 100]


def import_vllm() -> Any:
    """``import vllm`` or one clear error naming the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "VLLMPolicy needs vLLM, which is not installed: pip install 'mmgym[vllm]' (CUDA GPU required)"
        ) from e
    return vllm


class VLLMPolicy:
    """A VLM served by ``vllm.LLM`` as an mmgym ``Policy`` (see the module docstring).

    Args:
        model: a local checkpoint folder (the same one ``HFPolicy`` loads).
        learner: the ``HFPolicy`` whose ``logprobs`` this policy's ``logprobs`` calls
            (vLLM gives no differentiable log-probs) and whose weights ``sync()`` pushes.
        max_context: context length in tokens (default: the model's max positions); also
            vLLM's ``max_model_len``.
        tool_result_role: chat role for tool results (``"user"`` or ``"tool"``).
        gpu_memory_utilization, tensor_parallel_size, dtype, seed, enforce_eager: passed
            to ``vllm.LLM``.
        max_images_per_prompt: vLLM's ``limit_mm_per_prompt["image"]``.
        llm_kwargs: any further ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        learner: HFPolicy | None = None,
        max_context: int | None = None,
        tool_result_role: Literal["user", "tool"] = "user",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool = False,
        max_images_per_prompt: int = 8,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        vllm = import_vllm()
        from transformers import AutoConfig, AutoProcessor, GenerationConfig

        path = Path(model)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {str(path)!r} does not exist or is not a transformers checkpoint folder")
        self.name = str(path)
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"could not load {str(path)!r}: {type(e).__name__}: {e}") from e
        try:
            gen_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        except Exception:  # no generation_config.json: end-of-sequence from the tokenizer
            gen_config = None
        self.encoder = EpisodeEncoder(processor, config, gen_config, max_context=max_context,
                                      tool_result_role=tool_result_role, name=self.name)
        self.learner = learner
        self._vllm = vllm
        kw: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(path),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=self.encoder.max_context,
            enforce_eager=enforce_eager,
            limit_mm_per_prompt={"image": int(max_images_per_prompt)},
        )
        kw.update(llm_kwargs or {})
        self.processed_logprobs = True
        try:
            self.llm = vllm.LLM(**{"logprobs_mode": "processed_logprobs", **kw})
        except TypeError as e:  # vLLM < 0.10 has no logprobs_mode: raw (temperature-1) log-probs
            if "logprobs_mode" not in str(e):
                raise
            self.processed_logprobs = False
            self.llm = vllm.LLM(**kw)
        self._bias = {int(i): _BIAS_FORBID for i in self.encoder.suppress_token_ids}

    # ------------------------------------------------------------------ protocol
    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[Generation]:
        """Sample one reply per conversation; same contract as ``HFPolicy.generate``."""
        results, ready = self.encoder.prepare(conversations, sampling.max_new_tokens)
        if ready:
            prompts = [self._prompt(p.state) for p in ready]
            params = [self._params(sampling, i) for i in range(len(ready))]
            outs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
            for p, out in zip(ready, outs):
                results[p.index] = self._record(p.state, out.outputs[0], sampling)
        return [g for g in results if g is not None]

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """Training log-probs come from the learner (``HFPolicy``) this policy samples for."""
        if self.learner is None:
            raise RuntimeError("VLLMPolicy only samples: build it with learner=HFPolicy(...) "
                               "or call the learner's logprobs(batch)")
        return self.learner.logprobs(batch)

    def logprob_temperature(self, sampling: SamplingParams) -> float:
        """Temperature of the recorded log-probs (1 when vLLM returns raw log-probs)."""
        return sampling.logprob_temperature if self.processed_logprobs else 1.0

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    @property
    def max_context(self) -> int:
        return self.encoder.max_context

    def build_batch(self, trajectories: list[Trajectory], **kw: Any) -> RolloutBatch:
        return build_rollout_batch(trajectories, self.pad_token_id, **kw)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named weights (e.g. ``HFPolicy.export_state_dict()``) into the engine."""
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        model = self._driver_model()
        if model is not None:
            model.load_weights(weights=items)
        else:  # engine in worker processes: send CPU tensors through vLLM's RPC
            cpu = [(k, v.detach().cpu()) for k, v in items]
            self.llm.collective_rpc(_load_weights_on_worker, args=(cpu,))
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if callable(reset):
            reset()  # cached KV blocks were computed with the old weights
        logger.info("loaded %d weight tensors into vLLM", len(items))

    def sync(self) -> None:
        """Push the learner's current weights (LoRA merged) into vLLM."""
        if self.learner is None:
            raise ValueError("VLLMPolicy.sync() needs learner=HFPolicy(...)")
        self.load_weights(self.learner.export_state_dict())

    def _driver_model(self) -> Any:
        """The in-process model, if vLLM runs in this process (V0, or V1 without multiprocessing)."""
        engine = getattr(self.llm, "llm_engine", None)
        executor = getattr(engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        for chain in (("model_runner", "model"), ("worker", "model_runner", "model")):
            obj = worker
            for attr in chain:
                obj = getattr(obj, attr, None)
            if obj is not None and hasattr(obj, "load_weights"):
                return obj
        return None

    # ------------------------------------------------------------------ helpers
    def _prompt(self, state: TokenState) -> dict[str, Any]:
        """Token ids with each image's (clip's) placeholder run collapsed to one token (vLLM
        expands it again with the model's processor), plus the raw media in order."""
        collapse = {t for t in (self.encoder.image_token_id, self.encoder.video_token_id) if t is not None}
        ids: list[int] = []
        images: list[Any] = []
        videos: list[Any] = []
        for seg in state.active():
            images.extend(seg.images)
            videos.extend(seg.videos)
            for t in seg.ids:
                if t in collapse and ids and ids[-1] == t:
                    continue
                ids.append(t)
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        media: dict[str, Any] = {}
        if images:
            from PIL import Image

            media["image"] = [Image.fromarray(im) for im in images]
        if videos:
            media["video"] = list(videos)
        if media:
            prompt["multi_modal_data"] = media
        return prompt

    def _params(self, sampling: SamplingParams, i: int) -> Any:
        kw: dict[str, Any] = dict(
            n=1,
            temperature=0.0 if sampling.greedy else float(sampling.temperature),
            top_p=1.0 if sampling.greedy else float(sampling.top_p),
            max_tokens=int(sampling.max_new_tokens),
            stop=list(sampling.stop) or None,
            stop_token_ids=list(self.encoder.eos_token_ids),
            include_stop_str_in_output=True,
            skip_special_tokens=True,
            logprobs=0,
        )
        if sampling.seed is not None:  # one seed per request: equal prompts must still differ
            kw["seed"] = int(sampling.seed) + i
        if self._bias:
            kw["logit_bias"] = dict(self._bias)
        return self._vllm.SamplingParams(**kw)

    def _record(self, state: TokenState, out: Any, sampling: SamplingParams) -> Generation:
        raw_ids = [int(t) for t in out.token_ids]
        n, ended, stopped = self.encoder.finish_reply(raw_ids, sampling.stop)
        ids = raw_ids[:n]
        lps: list[float] = []
        for step, tok in zip(out.logprobs or [], ids):
            entry = step.get(tok) if step else None
            lps.append(float(entry.logprob) if entry is not None else float("nan"))
        if len(lps) != len(ids):
            lps += [float("nan")] * (len(ids) - len(lps))
        text = self.encoder.decode(ids)
        self.encoder.add_reply(state, ids, lps, ended=ended, text=text)
        finish = "stop" if (ended or stopped or out.finish_reason == "stop") else "length"
        return Generation(text=text, token_ids=ids, logprobs=lps, finish_reason=finish)

    def __repr__(self) -> str:
        return f"VLLMPolicy({self.name!r}, max_context={self.max_context})"


def _load_weights_on_worker(worker: Any, items: list[tuple[str, Any]]) -> None:
    """Runs inside each vLLM worker (``LLM.collective_rpc``)."""
    model = worker.model_runner.model
    device = next(model.parameters()).device
    model.load_weights(weights=[(k, v.to(device)) for k, v in items])
