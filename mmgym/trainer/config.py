"""Trainer configuration: nested frozen dataclasses (DESIGN §8).

Load with ``mmgym.core.load_config(TrainConfig, yaml_path, ["algo.loss.clip_high=0.28"])``;
unknown keys and wrong types are errors that name the key, and ``__post_init__`` rejects
bad combinations with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

from mmgym.algos import (
    SAMPLERS,
    DurianConfig,
    DurianEstimatorConfig,
    EstimatorConfig,
    LossConfig,
    MatchTIRConfig,
    MatchTIREstimatorConfig,
    PrimeConfig,
    PrimeEstimatorConfig,
    TokenWeightConfig,
)

__all__ = ["EnvSection", "ModelSection", "RolloutSection", "SFTSection", "PrimeSection", "DurianSection", "AlgoSection", "OptimSection",
           "LearnerSection", "TrainConfig"]


def _default_env_kwargs() -> dict[str, Any]:
    # The tiny default model learns region zoom far faster than pixel coordinates; the
    # zoom turn gets its own verified reward (DeepEyes' tool reward / LongVT's IoU idea).
    # Stripe symbols and option-text answers: the tiny vision tower reads stripe orientation
    # once zoomed (it never learned the small glyph shapes), and the first view hides it.
    # A 2x2 grid with markers twice as large (0.08 of the canvas: 9 px in the 112 px view,
    # still unreadable there; 36 px once zoomed, as on a 4x4 grid at 0.04) and the tint at
    # 0.6: RL teaches the warm start which region to zoom (README, "Results").
    return {"zoom": "region", "grid": 2, "view_size": 112, "zoom_size": 224, "marker_frac": 0.08,
            "symbols": "stripes", "grid_code": True, "grid_code_alpha": 0.6, "answer_format": "text",
            "question_types": ["attribute"], "zoom_reward": 0.5, "max_turns": 2}


@dataclass(frozen=True)
class EnvSection:
    id: str = "mmgym/ChainOfFocus-v0"
    """Registered environment id."""
    kwargs: dict[str, Any] | None = None
    """Keyword arguments for ``gymnasium.make``; None: the default recipe's kwargs for
    ``mmgym/ChainOfFocus-v0`` (region zoom, see ``_default_env_kwargs``), none for other ids."""
    eval_episodes: int = 200
    """Held-out evaluation tasks: ``task_index`` 0..eval_episodes-1, never drawn in training."""
    eval_every: int = 30
    """Evaluate every this many RL iterations (0: only before and after RL)."""
    backend: str = "local"
    """Where the RL rollouts' envs run (``mmgym.envs.pool.BACKENDS``): ``local`` in the
    trainer's process; ``process`` in worker processes, ``ray`` in Ray actors (an env worker
    pool: env steps overlap, and an env that raises, hangs or crashes ends only its own
    episode, which is left out of the update). Demonstrations and evaluation stay local."""
    workers: int | None = None
    """Worker processes (or Ray actors) of the pool (None: one per CPU core, at most one
    per env); ``process`` and ``ray`` only."""
    address: str | None = None
    """``ray.init`` address of the cluster (e.g. ``auto``; None: start or join a local one);
    ``ray`` only."""
    step_timeout_s: float = 60.0
    """Bound on one env step inside the pool; a step past it ends its episode as ``env_error``
    (the worker is replaced)."""

    @property
    def make_kwargs(self) -> dict[str, Any]:
        if self.kwargs is not None:
            return dict(self.kwargs)
        return _default_env_kwargs() if self.id == "mmgym/ChainOfFocus-v0" else {}

    def __post_init__(self) -> None:
        from mmgym.envs.pool import BACKENDS

        if self.eval_episodes < 1:
            raise ValueError(f"env.eval_episodes must be >= 1, got {self.eval_episodes}")
        if self.eval_every < 0:
            raise ValueError(f"env.eval_every must be >= 0, got {self.eval_every}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown env.backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.workers is not None:
            if self.workers < 1:
                raise ValueError(f"env.workers must be >= 1 (or unset), got {self.workers}")
            if self.backend == "local":
                raise ValueError("env.workers needs a pool: set env.backend=process (or ray) too")
        if self.address is not None and self.backend != "ray":
            raise ValueError(f"env.address is the Ray cluster address: it needs env.backend=ray, not {self.backend!r}")
        if not self.step_timeout_s > 0:
            raise ValueError(f"env.step_timeout_s must be > 0, got {self.step_timeout_s}")


@dataclass(frozen=True)
class ModelSection:
    path: str = "embedded:focus_warm"
    """A model folder (transformers format), a run or checkpoint folder, or ``embedded:NAME``
    for a model shipped in the package: ``embedded:base`` (the untrained tiny Qwen2.5-VL) or
    ``embedded:focus_warm`` (its warm start on ChainOfFocus, scripts/build_warm_start.py)."""
    lora: bool = False
    """Train LoRA adapters only (the reference model is then the adapter-disabled base)."""
    lora_rank: int = 8
    max_context: int | None = None
    """Context length in tokens (default: the model's own)."""
    device: str = "auto"
    """Learner device: ``auto`` (the local rank's CUDA device when there is one, else the
    CPU), ``cpu``, ``cuda`` or ``cuda:N``."""


@dataclass(frozen=True)
class RolloutSection:
    tasks_per_iter: int = 8
    """Distinct tasks per RL iteration (N)."""
    group_size: int = 8
    """Episodes per task (G of GRPO)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    system_prompt: str | None = None
    tool_schemas: bool = False
    """Pass the env's tool schemas to the chat template; the default recipe turns this off
    (the task text says how to zoom, and the tiny model's context is better spent on images)."""
    backend: str = "hf"
    """What samples the RL rollouts (``BACKENDS``): ``hf``, the learner itself (transformers);
    ``vllm``, a vLLM engine (extra ``vllm``, CUDA) built on the configured model folder,
    into which the learner's weights (LoRA merged) are pushed before the first rollout and
    after every update (logged as ``rollout/sync_s``). Demonstrations and evaluation stay
    on the learner."""
    recompute_old_logprobs: bool | None = None
    """Replace the sampler's log-probs by the learner's (one no-grad forward per batch,
    before the update) as pi_old of the PPO ratio, so the ratio starts at 1 and measures
    only the update, not the sampler's numerics; logs their mean absolute difference as
    ``rollout/logprob_gap``. False: the ratio divides by the sampler's own log-probs.
    None: True with ``backend=vllm``, False with ``hf`` (the same model and kernels)."""
    gpu_memory_utilization: float = 0.5
    """vLLM only: fraction of the GPU's memory the engine may take (weights + KV cache);
    leave the rest to the learner when both share a GPU."""
    tensor_parallel_size: int = 1
    """vLLM only: GPUs the engine shards the model over."""
    enforce_eager: bool = False
    """vLLM only: no CUDA graphs (slower decoding, faster start, less memory)."""
    max_images_per_prompt: int = 8
    """vLLM only: images one context may hold (vLLM's ``limit_mm_per_prompt``): the first
    view plus one per tool result, so at least the env's ``max_turns``."""

    BACKENDS: ClassVar[tuple[str, ...]] = ("hf", "vllm")

    @property
    def recomputes_old_logprobs(self) -> bool:
        """``recompute_old_logprobs`` with its default resolved."""
        if self.recompute_old_logprobs is None:
            return self.backend == "vllm"
        return self.recompute_old_logprobs

    def __post_init__(self) -> None:
        if self.tasks_per_iter < 1 or self.group_size < 1:
            raise ValueError("rollout.tasks_per_iter and rollout.group_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        if self.backend not in self.BACKENDS:
            raise ValueError(f"unknown rollout.backend {self.backend!r}; choose one of: {', '.join(self.BACKENDS)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"rollout.gpu_memory_utilization is a fraction of the GPU's memory: it must lie in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_images_per_prompt < 1:
            raise ValueError(f"rollout.max_images_per_prompt must be >= 1, got {self.max_images_per_prompt}")


@dataclass(frozen=True)
class SFTSection:
    enabled: bool = False
    """Supervised warm start on oracle demonstrations before RL."""
    demonstrations: int = 1024
    """Oracle episodes recorded through the rollout path (the demonstration budget)."""
    steps: int = 600
    """Optimizer steps over the demonstrations."""
    checkpoint_every: int = 100
    """Write a checkpoint (``checkpoints/sft_XXXXXXX``) every this many SFT steps (0: none),
    so ``mmgym train --resume`` continues a long warm start where it stopped (the
    demonstrations are recorded again from the same seeds). Deleted once RL starts."""
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    zoom_noise: float = 0.0
    """Probability that a demonstration's zoom goes to a random place (then the answer is a
    guess): noisy demonstrations teach reading but not localisation."""
    mask_tool_arguments: bool = False
    """Leave the tokens of tool-call argument values (``14`` in ``{"region": 14}``) out of the
    loss: the warm start learns the call's format and to read its result, not which
    arguments to pass (that is left to RL)."""
    mask_guesses: bool = False
    """Leave out of the loss the answers that noisy demonstrations guess after a zoom that
    missed (the last turn of an episode whose ``zoom_hit`` metric is 0): with
    ``zoom_noise=1`` the warm start then names a region uniformly at random (every region
    explored, nothing learned about where to look) and learns to answer only from zooms
    that show the target."""

    observation_loss: float = 0.0
    """Weight of a language-model loss on the demonstrations' context text (prompts, tool
    results, feedback: every real token that is neither generated nor a vision token),
    added to the loss on the oracle's replies. Observations restate what came before (a
    receptacle's object list repeats the map's, ``You picked up obj_2`` the call), so an
    untrained model gets many more examples of copying from its context than the replies
    alone give. 0 (default): replies only."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.observation_loss) and self.observation_loss >= 0):
            raise ValueError(f"sft.observation_loss must be a finite number >= 0, got {self.observation_loss}")
        if self.demonstrations < 1 or self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 0:
            raise ValueError("sft.demonstrations and sft.batch_size must be >= 1, sft.steps and sft.checkpoint_every >= 0")
        if not 0.0 <= self.zoom_noise <= 1.0:
            raise ValueError(f"sft.zoom_noise must lie in [0, 1], got {self.zoom_noise}")


@dataclass(frozen=True)
class PrimeSection(PrimeConfig):
    """PRIME's implicit process reward model (``algo.estimator.estimator=prime``; read only then).

    The PRM starts as a trainable copy of the frozen reference (the weights RL starts from:
    the warm start), is scored against that reference, r_t = beta * log(pi_phi / pi_ref)
    per generated token, and is trained online with its own AdamW on the cross-entropy of
    PRIME Eq. 4 against each episode's success (the verified outcome label). Inherited
    fields, with PRIME's defaults: ``update`` ("before" | "after"), ``beta`` (0.05),
    ``process_coef`` (PRIME ``reward_dpo_coef``, 5) and ``outcome_coef`` (``reward_gt_coef``, 5);
    see ``mmgym.algos.PrimeConfig``. Logged as ``prime/loss``, ``prime/acc``, ``prime/reward_mean``.
    """

    lr: float = 2e-4
    """PRM learning rate. PRIME's recipe trains a 7B PRM at 1e-6, twice its actor's 5e-7;
    the embedded tiny model's policy trains at ``optim.lr`` 1e-4, so 2e-4 keeps that ratio
    (1e-6 would leave a 1M-parameter PRM almost where it started within a few hundred
    steps). Scale it with ``optim.lr`` for a real model."""
    grad_clip: float = 10.0
    """Gradient-norm clip of the PRM's steps (PRIME's recipe: 10.0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr > 0:
            raise ValueError(f"algo.prime.lr must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"algo.prime.grad_clip must be > 0, got {self.grad_clip}")


@dataclass(frozen=True)
class DurianSection(DurianConfig):
    """Durian's difficulty bins (``algo.estimator.estimator=durian_grpo``; read only then).

    Each episode's difficulty is ``combine_difficulty``: visual_weight * z(visual entropy
    of the task's first image) - confidence_weight * z(the policy's confidence, the mean
    log-prob of the episode's sampled tokens), z-scored over the batch; a prompt group's
    difficulty is its episodes' mean, and groups of similar difficulty share one reward std.
    Inherited fields: ``num_bins`` (4), ``binning`` ("quantile" | "uniform"), ``edges``
    (fixed inner edges, overriding both), ``std_mode`` ("pooled" | "total"); see
    ``mmgym.algos.DurianConfig``. Logged as ``durian/bins`` (bins holding a group),
    ``durian/difficulty_std`` and ``durian/no_image`` (episodes without a first image).
    """

    visual_weight: float = 1.0
    """Weight of the z-scored visual entropy (higher = harder)."""
    confidence_weight: float = 1.0
    """Weight of the z-scored policy confidence (higher = easier)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.visual_weight < 0 or self.confidence_weight < 0:
            raise ValueError(f"algo.durian.visual_weight and confidence_weight must be >= 0, got {self.visual_weight} "
                             f"and {self.confidence_weight}")
        if self.visual_weight == 0 and self.confidence_weight == 0:
            raise ValueError("algo.durian.visual_weight and confidence_weight are both 0: every episode would have the "
                             "same difficulty; set one > 0 (or use algo.estimator.estimator=grpo)")


@dataclass(frozen=True)
class AlgoSection:
    estimator: EstimatorConfig = field(
        default_factory=lambda: EstimatorConfig(estimator="mt_grpo", mt_lambda=3.0, mt_outcome="total"))
    """Advantage estimator (``mmgym.algos.ESTIMATORS``). Default: MT-GRPO with the zoom turn's
    own advantage weighted 3 (``mt_lambda``; the paper's 1, and 2, taught the embedded model
    where to look more slowly) and the whole episode return as its outcome reward
    (``mt_outcome="total"``: the paper's ``final`` did as well on two of three seeds and
    worse on the third). Measurements: README, "Results"."""
    loss: LossConfig = field(default_factory=lambda: LossConfig(kl_coef=0.01, clip_high=0.28))
    ppo_epochs: int = 1
    minibatch_size: int = 32
    sampler: str = "uniform"
    """Task sampler (``mmgym.algos.SAMPLERS``); tasks are drawn from a pool of ``task_pool`` seeds."""
    task_pool: int = 4096
    drop_zero_variance_groups: bool = False
    """DAPO dynamic sampling: exclude groups whose returns are all equal from the update."""
    token_weights: TokenWeightConfig = field(default_factory=TokenWeightConfig)
    """Per-token weights multiplied into the advantages of the policy-gradient term only
    (``mmgym.algos.TOKEN_WEIGHTS``; e.g. ``algo.token_weights.name=vppo``): none (default),
    vppo (two extra no-grad forwards per update, with and without the images), tor (tokens
    of tool-call turns are perception tokens), delta_logp (needs the reference forward, run
    even when ``loss.kl_coef`` is 0), fipo. Logged as ``tw/...``."""
    prime: PrimeSection = field(default_factory=PrimeSection)
    """PRIME's implicit PRM and its reward weights, used when ``estimator.estimator`` is
    ``prime`` (one more trainable model copy and its optimizer; the reference forward runs
    even when ``loss.kl_coef`` is 0)."""
    matchtir: MatchTIRConfig = field(default_factory=MatchTIRConfig)
    """MatchTIR's matching and weights, used when ``estimator.estimator`` is ``matchtir``:
    ``assignment`` ("hard" | "soft"), ``sinkhorn_reg``, ``sinkhorn_iters``, ``gamma`` (of the
    turn returns), ``traj_weight`` and ``turn_weight`` (``mmgym.algos.MatchTIRConfig``).
    Each turn's reward is its calls' similarity to the task's gold calls (the env's
    ``gold_tool_calls``); an episode without gold calls gets the trajectory-level advantage
    only. Logged as ``matchtir/skipped`` (episodes without gold) and
    ``matchtir/turn_reward_mean`` (over the turns of episodes with gold)."""
    durian: DurianSection = field(default_factory=DurianSection)
    """Durian's difficulty bins, used when ``estimator.estimator`` is ``durian_grpo``."""

    @property
    def estimator_config(self) -> EstimatorConfig:
        """The config the estimator is called with: ``estimator``, carrying its section when
        the estimator reads one (``prime``, ``matchtir``, ``durian_grpo``: ``mmgym.algos``'
        ``PrimeEstimatorConfig``, ``MatchTIREstimatorConfig``, ``DurianEstimatorConfig``)."""
        base = {f.name: getattr(self.estimator, f.name) for f in fields(self.estimator)}
        name = self.estimator.estimator
        if name == "prime":
            return PrimeEstimatorConfig(**base, prime=self.prime)
        if name == "matchtir":
            return MatchTIREstimatorConfig(**base, matchtir=self.matchtir)
        if name == "durian_grpo":
            return DurianEstimatorConfig(**base, durian=self.durian)
        return self.estimator

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1 or self.minibatch_size < 1:
            raise ValueError("algo.ppo_epochs and algo.minibatch_size must be >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown algo.sampler {self.sampler!r}; known: {', '.join(SAMPLERS.names())}")
        if self.estimator.estimator in ("gae", "bilevel_gae"):
            raise ValueError(f"algo.estimator.estimator={self.estimator.estimator!r} needs a critic, which this trainer "
                             "does not build yet; use grpo, dr_grpo, rloo, reinforce_pp, gigpo or mt_grpo")
        if self.estimator.estimator == "igpo":
            raise ValueError("algo.estimator.estimator='igpo' needs teacher-forced answer log-probs per turn, "
                             "which this trainer does not compute yet; its math is in mmgym.algos for your own loop")
        if self.loss.entropy_coef != 0.0:
            raise ValueError("algo.loss.entropy_coef must be 0: the HF backend returns sampled-token log-probs only")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("optim.lr and optim.grad_clip must be > 0")


@dataclass(frozen=True)
class LearnerSection:
    """How the learner's update runs across data-parallel ranks (``torchrun --nproc-per-node N``)."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """``ddp``: every rank holds the whole AdamW state and gradients are all-reduced
    (``mmgym.trainer.distributed``); ``deepspeed``: a DeepSpeed ZeRO engine (extra
    ``deepspeed``) partitions AdamW's state (and with stage 2 the gradients) across ranks,
    saving memory per rank (``mmgym.trainer.deepspeed_learner``). The same updates up to rounding."""
    zero_stage: int = 2
    """ZeRO stage with ``strategy=deepspeed``: 1 (optimizer state partitioned) or 2 (also
    the gradients). Stage 3 is not supported (see ``__post_init__``)."""

    def __post_init__(self) -> None:
        if self.zero_stage == 3:
            raise ValueError("learner.zero_stage=3 partitions the weights, but every rank generates its own rollouts with "
                             "the full model (a different number of forwards per rank, each a collective under ZeRO-3); use 2")
        if self.zero_stage not in (1, 2):
            raise ValueError(f"learner.zero_stage must be 1 or 2, got {self.zero_stage}")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 90
    """RL iterations (collect -> score -> estimate -> update)."""
    seed: int = 0
    out_root: str = "runs"
    """Run folders are created under this directory."""
    run_name: str | None = None
    """Run folder name (default: a timestamp and the seed)."""
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    """The latest checkpoints kept; older ones are deleted (but see ``keep_warm_start``)."""
    keep_warm_start: bool = True
    """Never delete checkpoint ``step_0000000``, the weights RL starts from (after the warm
    start, if any): the "before RL" model for ``mmgym eval``, the start of RL runs with other
    seeds (``model.path=RUN/checkpoints/step_0000000/model sft.enabled=false``) and the KL
    reference after a resume."""
    sample_episodes: int = 4
    """Episodes written as HTML pages at each evaluation."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    max_bad_updates: int = 3
    """Consecutive non-finite losses that stop the run (the last good checkpoint stays)."""
    env: EnvSection = field(default_factory=EnvSection)
    model: ModelSection = field(default_factory=ModelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    sft: SFTSection = field(default_factory=SFTSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    learner: LearnerSection = field(default_factory=LearnerSection)

    def with_resolved_env(self) -> TrainConfig:
        """This config with ``env.kwargs`` spelled out (``env.make_kwargs``), so a run folder's
        config.yaml keeps the task it ran even when the defaults change later."""
        return replace(self, env=replace(self.env, kwargs=self.env.make_kwargs))

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        group_estimators = ("grpo", "dr_grpo", "rloo", "gigpo", "mt_grpo", "prime", "matchtir", "durian_grpo")
        if self.algo.estimator.estimator in group_estimators and self.rollout.group_size < 2:
            raise ValueError(f"algo.estimator.estimator={self.algo.estimator.estimator!r} compares episodes within a group: "
                             "set rollout.group_size >= 2")
