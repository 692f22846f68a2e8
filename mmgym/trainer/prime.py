"""PRIME's implicit process reward model inside the trainer (Cui et al. 2025,
arXiv:2502.01456; the math is ``mmgym.algos.prime``).

:class:`ImplicitPRM` holds the PRM pi_phi (an ``HFPolicy`` of the policy's architecture,
started from the frozen reference) and its own AdamW. Per RL iteration the trainer calls

- :meth:`ImplicitPRM.step`: one pass over the batch in minibatches, one step each, on
  PRIME's cross-entropy (Eq. 4) against the episodes' success labels;
- :meth:`ImplicitPRM.process_rewards`: r_t = beta * (log pi_phi(y_t) - log pi_ref(y_t))
  on the generated tokens (Eq. 3), without gradient;

``step`` before ``process_rewards`` (``update="before"``) or after it (``"after"``); the
reference log-probs come from the trainer's frozen reference, the one the KL term uses.
The PRM stays in eval mode (no dropout), so the rewards and the loss read one function.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmgym.agents import HFPolicy
from mmgym.algos import implicit_process_rewards, prime_prm_loss
from mmgym.core import RolloutBatch
from mmgym.trainer.common import backward_step, select_rows
from mmgym.trainer.config import PrimeSection

__all__ = ["ImplicitPRM"]

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
OPTIMIZER = "optim.pt"


class ImplicitPRM:
    """The PRM pi_phi, its AdamW and its hyperparameters (``algo.prime``).

    Args:
      model: the PRM, e.g. ``reference.clone(name="prm")`` with the policy's trainable
        parameters made trainable (``HFPolicy.clone`` keeps its own vision tower).
      cfg: ``algo.prime``.  minibatch_size: rows per PRM step (``algo.minibatch_size``).
      weight_decay: AdamW weight decay (``optim.weight_decay``).
    """

    def __init__(self, model: HFPolicy, cfg: PrimeSection, *, minibatch_size: int, weight_decay: float = 0.0):
        self.model = model.eval()
        self.cfg = cfg
        self.minibatch_size = int(minibatch_size)
        self.optimizer = torch.optim.AdamW(list(model.parameters()), lr=cfg.lr, weight_decay=weight_decay)

    def step(self, batch: RolloutBatch, ref_logprobs: torch.Tensor) -> dict[str, float]:
        """Train on ``batch``: rows in order, ``minibatch_size`` at a time, one AdamW step
        each on ``prime_prm_loss`` with label = ``batch.success``.

        Args:
          batch: B rows.  ref_logprobs: (B, T) reference log-probs (no gradient).

        Returns:
          ``prime/loss`` (mean BCE), ``prime/acc`` (fraction of rows whose sign of
          z = beta * sum_t q_t matches the label, each row judged before the step on its
          minibatch) and ``prime/logit_mean``, averaged over rows.
        """
        labels = batch.success.float()
        totals = {"prime/loss": 0.0, "prime/acc": 0.0, "prime/logit_mean": 0.0}
        seen = 0
        for lo in range(0, batch.batch_size, self.minibatch_size):
            idx = list(range(lo, min(lo + self.minibatch_size, batch.batch_size)))
            mb = select_rows(batch, idx)
            logp = self.model.logprobs(mb)
            loss, m = prime_prm_loss(logp, ref_logprobs[idx].to(logp.device), mb.action_mask.to(logp.device),
                                     labels[idx].to(logp.device), beta=self.cfg.beta)
            if not self._apply(loss):
                continue
            n = len(idx)
            seen += n
            totals["prime/loss"] += n * float(loss.detach())
            totals["prime/acc"] += n * float(m["prm_acc"])
            totals["prime/logit_mean"] += n * float(m["prm_logit_mean"])
        return {k: v / seen for k, v in totals.items()} if seen else {}

    def _apply(self, loss: torch.Tensor) -> bool:
        """Backward + clip + step, unless the loss is not finite (then skip and warn)."""
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            log.warning("non-finite PRIME PRM loss (%s); PRM step skipped", float(loss))
            return False
        backward_step(self.model, self.optimizer, loss, self.cfg.grad_clip)
        return True

    def process_rewards(self, batch: RolloutBatch, ref_logprobs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, T) implicit process rewards under the current PRM (0 off the action mask),
        and ``prime/reward_mean``: their mean over the generated tokens."""
        with torch.no_grad():
            logp = self.model.logprobs(batch)
        mask = batch.action_mask.to(logp.device)
        rewards = implicit_process_rewards(logp, ref_logprobs.to(logp.device), mask, beta=self.cfg.beta)
        mean = float(rewards.sum() / mask.sum().clamp(min=1))
        return rewards, {"prime/reward_mean": mean}

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt: Path) -> None:
        """Write ``ckpt/prm/model.safetensors`` (every weight) and ``ckpt/prm/optim.pt``;
        ``ckpt`` is the trainer's temporary checkpoint folder (``RunDir.save_checkpoint``
        fsyncs and renames it)."""
        from safetensors.torch import save_model

        folder = ckpt / "prm"
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model.model, str(folder / WEIGHTS))
        torch.save({"optimizer": self.optimizer.state_dict()}, folder / OPTIMIZER)

    @classmethod
    def load(cls, folder: Path, like: HFPolicy, cfg: PrimeSection, *, minibatch_size: int,
             weight_decay: float = 0.0) -> ImplicitPRM:
        """The PRM saved by :meth:`save` in ``folder`` (a checkpoint's ``prm/``): a clone of
        ``like`` (the architecture and which parameters train) with the saved weights and
        optimizer state."""
        from safetensors.torch import load_model

        model = like.clone(name="prm")
        load_model(model.model, str(folder / WEIGHTS))
        prm = cls(model, cfg, minibatch_size=minibatch_size, weight_decay=weight_decay)
        prm.optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=False)["optimizer"])
        return prm
