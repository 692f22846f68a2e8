"""mmgym.algos: pure math over tensors with stated shapes.

Registries (one signature each, so the trainer never special-cases an entry):

- ``ESTIMATORS``: ``estimate(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput``
  (``advantages`` (B, T), ``returns`` (B, T) or None): grpo, dr_grpo, rloo, reinforce_pp,
  reinforce_pp_baseline, gae, gigpo, bilevel_gae, mt_grpo, igpo; fine-grained credit:
  prime (``prime.py``), matchtir (``matchtir.py``), durian_grpo (``durian.py``).
- ``TOKEN_WEIGHTS``: ``weights(inputs: TokenWeightInputs, cfg: TokenWeightConfig)
  -> (weights (B, T), metrics)`` multiplied into the advantages: none, vppo, tor,
  delta_logp, fipo (``token_weights.py``).
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
from mmgym.algos.durian import (
    DurianConfig,
    DurianEstimatorConfig,
    combine_difficulty,
    difficulty_bins,
    durian_normalize,
    visual_entropy,
)
from mmgym.algos.matchtir import (
    MatchTIRConfig,
    MatchTIREstimatorConfig,
    call_similarity,
    hard_assignment,
    matchtir_turn_rewards,
    matchtir_turn_rewards_batch,
    similarity_matrix,
    sinkhorn_plan,
    soft_assignment,
)
from mmgym.algos.prime import (
    PrimeConfig,
    PrimeEstimatorConfig,
    implicit_process_rewards,
    prime_advantages,
    prime_prm_loss,
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

from mmgym.algos.token_weights import (
    TOKEN_WEIGHTS,
    TokenWeightConfig,
    TokenWeightInputs,
    compute_token_weights,
    visual_dependency,
)

__all__ = [
    "AGGREGATIONS",
    "ESTIMATORS",
    "POLICY_LOSSES",
    "SAMPLERS",
    "TOKEN_WEIGHTS",
    "DurianConfig",
    "DurianEstimatorConfig",
    "MatchTIRConfig",
    "MatchTIREstimatorConfig",
    "PrimeConfig",
    "PrimeEstimatorConfig",
    "TokenWeightConfig",
    "TokenWeightInputs",
    "call_similarity",
    "combine_difficulty",
    "compute_token_weights",
    "difficulty_bins",
    "durian_normalize",
    "hard_assignment",
    "implicit_process_rewards",
    "matchtir_turn_rewards",
    "matchtir_turn_rewards_batch",
    "prime_advantages",
    "prime_prm_loss",
    "similarity_matrix",
    "sinkhorn_plan",
    "soft_assignment",
    "visual_dependency",
    "visual_entropy",
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
