"""The ``Policy`` protocol (DESIGN §5) and scripted policies.

Every backend — HF transformers, vLLM, scripted — maps conversations to text::

    generations = policy.generate(conversations, SamplingParams(temperature=1.0))
    generations[i].text, generations[i].token_ids, generations[i].logprobs

and model backends also give ``policy.logprobs(batch)``: the log-probability of each
token of a ``RolloutBatch`` under the current weights, computed exactly as the sampler
computed it (same temperature, same forbidden tokens), so PPO ratios start at 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from mmgym.agents.chat import Conversation

if TYPE_CHECKING:
    import torch

    from mmgym.core import RolloutBatch

__all__ = ["SamplingParams", "Generation", "Policy", "ScriptedPolicy", "FinishReason"]

FinishReason = Literal["stop", "length", "budget", "error"]


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to sample one reply.

    temperature: 0 means greedy; log-probs are then those of the untempered model.
    top_p: nucleus sampling mass (1.0 = off). Log-probs are of the tempered but
        un-truncated distribution (as verl and TRL compute them).
    max_new_tokens: reply length cap; a reply cut mid tool call is just malformed output.
    stop: strings that end a reply (kept in the text, like the closing tag they are).
    seed: seeds the sampler for this call (``None``: the global torch RNG as it is).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # a bare string would be read as characters
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The temperature the recorded log-probs are computed at (1 when greedy)."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass(slots=True)
class Generation:
    """One reply. ``token_ids``/``logprobs`` are empty for scripted policies.

    finish_reason: ``stop`` (end-of-turn token or stop string), ``length`` (hit
    ``max_new_tokens``), ``budget`` (the context was full even after dropping old turns;
    nothing was generated) or ``error`` (this conversation's input was rejected; see
    ``error``).
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    error: str | None = None


@runtime_checkable
class Policy(Protocol):
    """Conversations in, text out; see the module docstring."""

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[Generation]: ...

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor: ...


class ScriptedPolicy:
    """Adapts a callable ``conversation -> text`` (an oracle, a random agent, a test
    script) to the ``Policy`` protocol, so baselines run through the same rollout code.

    ``logprobs`` returns zeros of shape (B, T): a scripted policy is deterministic given
    its input and has nothing to train.
    """

    def __init__(self, fn: Callable[[Conversation], str], *, name: str = "scripted"):
        if not callable(fn):
            raise TypeError(f"ScriptedPolicy needs a callable conversation -> text, got {type(fn).__name__}")
        self.fn = fn
        self.name = name

    @classmethod
    def from_agent(cls, agent: Any) -> ScriptedPolicy:
        """Adapt an env-level agent (``act(env, obs, info) -> str``, e.g. ``OracleAgent``)
        through the ``env``, ``obs`` and ``info`` the rollout keeps in ``Conversation.meta``."""

        def act(conv: Conversation) -> str:
            try:
                env, obs, info = conv.meta["env"], conv.meta["obs"], conv.meta["info"]
            except KeyError as e:
                raise ValueError(
                    f"{getattr(agent, 'name', type(agent).__name__)} acts on the env: run it through "
                    "RolloutCollector, which puts env/obs/info in Conversation.meta"
                ) from e
            if env is None:
                raise ValueError(
                    f"{getattr(agent, 'name', type(agent).__name__)} acts on the env object, but the envs run in a "
                    "worker pool (Conversation.meta['env'] is None): use RolloutCollector(..., backend='local')"
                )
            return agent.act(env, obs, info)

        return cls(act, name=str(getattr(agent, "name", type(agent).__name__)))

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams | None = None) -> list[Generation]:
        out: list[Generation] = []
        for conv in conversations:
            text = self.fn(conv)
            if not isinstance(text, str):
                raise TypeError(f"scripted policy {self.name!r} returned {type(text).__name__}, expected str")
            out.append(Generation(text=text))
        return out

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        import torch

        return torch.zeros(batch.input_ids.shape, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"ScriptedPolicy({self.name!r})"
