"""mmgym.algos: pure math over tensors with stated shapes.

Registries (one signature each, so the trainer never special-cases an entry):

- ``ESTIMATORS``: ``estimate(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput``
  (``advantages`` (B, T), ``returns`` (B, T) or None): grpo, dr_grpo, rloo, reinforce_pp,
  reinforce_pp_baseline, gae, gigpo, bilevel_gae, mt_grpo, igpo.
- ``POLICY_LOSSES``: ``loss(logprobs, old_logprobs, advantages, mask, cfg: LossConfig)
  -> (per-token loss (B, T), metrics)``: ppo_clip, gspo.
- ``AGGREGATIONS``: ``agg(loss (B, T), mask (B, T), *, norm_length) -> scalar``:
  token_mean, seq_mean_token_mean, seq_mean_token_sum_norm (use ``aggregate``).
- ``SAMPLERS``: task samplers ``select / update / state_dict / load_state_dict``:
  uniform, vade.

Imports only ``mmgym.core`` (plus torch, numpy, scipy).
"""

from __future__ import annotations

from mmgym.algos.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageOutput,
    EstimatorConfig,
    compute_advantages,
    compute_answer_logprobs,
    discounted_returns,
    gae_advantages,
    group_normalize,
    information_gain_rewards,
    masked_whiten,
)
from mmgym.algos.credit import (
    anchor_ids,
    broadcast_turn_values,
    hamming_distance,
    phash,
    turn_end_positions,
    turn_rewards_to_tokens,
)
from mmgym.algos.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    LossConfig,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    value_loss,
)
from mmgym.algos.sampling import (
    SAMPLERS,
    DynamicSamplingResult,
    TaskSampler,
    UniformSampler,
    VADESampler,
    collect_dynamic_batches,
    dynamic_sampling_filter,
    overlong_shaping,
)

__all__ = [
    "AGGREGATIONS",
    "ESTIMATORS",
    "POLICY_LOSSES",
    "SAMPLERS",
    "AdvantageInputs",
    "AdvantageOutput",
    "DynamicSamplingResult",
    "EstimatorConfig",
    "LossConfig",
    "TaskSampler",
    "UniformSampler",
    "VADESampler",
    "aggregate",
    "anchor_ids",
    "broadcast_turn_values",
    "collect_dynamic_batches",
    "compute_advantages",
    "compute_answer_logprobs",
    "discounted_returns",
    "dynamic_sampling_filter",
    "entropy_from_logits",
    "gae_advantages",
    "group_normalize",
    "hamming_distance",
    "information_gain_rewards",
    "kl_penalty",
    "masked_whiten",
    "overlong_shaping",
    "phash",
    "turn_end_positions",
    "turn_rewards_to_tokens",
    "value_loss",
]
