"""``MedTriage``: multi-agent medical triage as a PettingZoo ``ParallelEnv``, modelled on
MMedAgent-RL (a triage doctor routes the case to specialists; an attending physician
weighs their opinions — right, conflicting or wrong — against its own reading and decides).

Agents: ``triage``, ``specialist_<k>`` for each specialty in ``SPECIALTIES`` and
``attending``. Each observation is the single-agent dict of DESIGN §2 plus ``active``
(Discrete(2)); actions are text. Phases:

1. ``triage`` sees the case and calls ``refer(specialties=[...])``.
2. The referred specialists give opinions. Scripted or policy specialists answer inside
   the env in the same step; specialists built with ``"agent"`` become active and answer
   through the API (``<answer>...</answer>`` plus a short rationale).
3. ``attending`` sees the case and the opinions (``[from specialist_k] Answer: ...``) and
   answers with ``<answer>...</answer>``.

Rewards (all terms in ``info[agent]["reward_terms"]``): triage ``routing`` (1 for exactly the
matching specialty, 1/n when it is among n referrals); attending the rubric's ``accuracy`` +
``format``; agent specialists ``accuracy`` of their opinion; every malformed reply or
wrong-phase action (triage answering, attending calling a tool) a negative ``format``
term and a feedback observation (source 2). Actions from inactive agents are ignored and
recorded in ``info[agent]["ignored_action"]``. ``info[agent]["bucket"]`` is the C-MARL
bucket of the opinions the attending got (``correct`` / ``conflict`` / ``wrong`` / ``none``).

Use ``parallel_env(**kwargs)`` or ``env(**kwargs)`` (AEC view via PettingZoo's converter).
Single-agent Gymnasium views live in ``mmgym.envs.medtriage_views``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv
from pettingzoo.utils.conversions import parallel_to_aec

from mmgym.core import ToolCall, UnicodeText
from mmgym.core.text import tags_balanced
from mmgym.envs.base import MAX_ACTION, MAX_TEXT, SOURCE_FEEDBACK, SOURCE_TASK, SOURCE_TOOL, make_observation_space
from mmgym.envs.medtriage_cases import QUESTION_TYPES, SPECIALTIES, MedCase, verify_case
from mmgym.envs.medtriage_common import (
    CaseSource,
    ReferState,
    ReferTool,
    Team,
    attending_prompt,
    role_system_prompt,
    routing_score,
    specialist_prompt,
    triage_prompt,
)
from mmgym.envs.medtriage_specialists import Opinion, bucket_of, majority_attending, opinion_from_reply, oracle_attending
from mmgym.rewards import RUBRICS, RewardContext, Rubric
from mmgym.tools import HermesParser, run_tool, tool_schema

__all__ = ["MedTriageEnv", "parallel_env", "env", "majority_attending", "oracle_attending"]

log = logging.getLogger(__name__)
PHASES = ("triage", "specialists", "attending", "done")


class MedTriageEnv(ParallelEnv):
    """Multi-agent medical triage (MMedAgent-RL). See the module docstring.

    Args:
        dataset / image_root / lang / default_specialty: a medical VQA JSON/JSONL file in the
            VQA-RAD / SLAKE / PathVQA layout (see ``medvqa_rows``); without it, procedural cases.
        scan_size, p_normal, question_types: procedural case options.
        specialists: specialty -> ``"scripted"`` (default), ``"agent"`` (acts through this
            API), a ``ScriptedSpecialist``, an object with ``generate(conversations, sampling)``
            or a callable ``(obs) -> str``; a single string applies to every specialty.
        specialist_accuracy / outside_accuracy: scripted accuracy inside / outside the
            specialty (``None`` outside = chance).
        wrong_agreement: probability that wrong scripted specialists agree on one wrong answer.
        curriculum: ``uniform`` (default), ``natural`` (no forcing), ``easy_to_hard``, a bucket
            name, or a ``CurriculumSchedule``; ``curriculum_episodes`` advances its progress
            per episode, ``set_curriculum_progress`` or ``options={"progress": p}`` sets it and
            ``options={"bucket": b}`` forces one episode's bucket.
        max_referrals: most specialties one referral may name.
        max_invalid: malformed replies tolerated per agent; one more ends that agent's phase.
        invalid_penalty: size of the negative ``format`` term for a malformed reply.
        out_of_turn_penalty: negative ``format`` term for text from an inactive agent (default 0).
        rubric: the attending's reward preset (``mmgym.rewards.RUBRICS``) or a ``Rubric``.
    """

    metadata = {"name": "mmgym_medtriage_v0", "render_modes": ["rgb_array"], "is_parallelizable": True}

    def __init__(
        self,
        *,
        dataset: str | None = None,
        image_root: str | None = None,
        lang: str = "en",
        default_specialty: str = "pathology",
        scan_size: int = 160,
        p_normal: float = 0.15,
        question_types: tuple[str, ...] = QUESTION_TYPES,
        specialists: Mapping[str, Any] | str | None = None,
        specialist_accuracy: float | Mapping[str, float] = 0.85,
        outside_accuracy: float | None = None,
        wrong_agreement: float = 0.5,
        curriculum: Any = "uniform",
        curriculum_episodes: int | None = None,
        max_referrals: int = 2,
        max_invalid: int = 2,
        invalid_penalty: float = 0.1,
        out_of_turn_penalty: float = 0.0,
        specialist_reward: float = 1.0,
        rubric: str | Rubric = "accuracy",
        render_mode: str | None = None,
    ):
        if max_invalid < 0:
            raise ValueError(f"max_invalid must be >= 0, got {max_invalid}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} not supported; use one of {self.metadata['render_modes']}")
        self.cases = CaseSource(dataset, image_root=image_root, lang=lang, default_specialty=default_specialty, scan_size=scan_size, p_normal=p_normal, question_types=question_types)
        self.team = Team.build(
            specialists, specialist_accuracy=specialist_accuracy, outside_accuracy=outside_accuracy, wrong_agreement=wrong_agreement,
            curriculum=curriculum, curriculum_episodes=curriculum_episodes, allow_agents=True,
        )
        self.max_invalid = int(max_invalid)
        self.invalid_penalty = float(invalid_penalty)
        self.out_of_turn_penalty = float(out_of_turn_penalty)
        self.specialist_reward = float(specialist_reward)
        self.rubric: Rubric = RUBRICS.get(rubric)() if isinstance(rubric, str) else rubric
        self.render_mode = render_mode
        self.parser = HermesParser()
        self.refer_tool = ReferTool(max_referrals)
        # Each phase ends after at most max_invalid + 1 replies, so an episode is bounded.
        self.max_steps = 3 * (self.max_invalid + 1)
        self.possible_agents = ["triage", *(f"specialist_{s}" for s in SPECIALTIES), "attending"]
        self.agents: list[str] = []
        base = make_observation_space(self.max_steps)
        self.observation_spaces = {a: spaces.Dict({**base.spaces, "active": spaces.Discrete(2)}) for a in self.possible_agents}
        self.action_spaces = {a: UnicodeText(MAX_ACTION) for a in self.possible_agents}
        self.np_random, self.np_random_seed = seeding.np_random(None)
        self.case: MedCase | None = None
        self._phase = "done"

    # ------------------------------------------------------------------ PettingZoo API
    def observation_space(self, agent: str) -> spaces.Dict:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> UnicodeText:
        return self.action_spaces[agent]

    def set_curriculum_progress(self, progress: float) -> None:
        """C-MARL schedule position in [0, 1] (easy buckets first, hard ones later)."""
        self.team.set_progress(progress)

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
        if seed is not None:
            self.np_random, self.np_random_seed = seeding.np_random(seed)
        options = dict(options or {})
        index = options.get("task_index")
        if index is not None:
            n = self.cases.num_cases()
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0 or (n is not None and index >= n):
                raise ValueError(f"options['task_index'] must be an int in [0, {n if n is not None else 'inf'}), got {index!r}")
            index = int(index)
        self.case, self._rng = self.cases.sample(self.np_random, index)
        self._bucket_target = self.team.next_bucket(self._rng, options)
        self.agents = list(self.possible_agents)
        self._phase = "triage"
        self._step_count = 0
        self._invalid = dict.fromkeys(self.possible_agents, 0)
        self._tags_ok = dict.fromkeys(self.possible_agents, True)
        self._refer = ReferState()
        self._referred: list[str] = []
        self._opinions: dict[str, Opinion] = {}
        self._pending: list[str] = []
        self._notes: list[str] = []
        self._accuracy = 0.0
        self._reason = ""
        self._begin_step()
        self._emit("triage", triage_prompt(self.case), (self.case.image,), SOURCE_TASK)
        obs = {a: self._observe(a) for a in self.agents}
        infos = {a: self._reset_info(a) for a in self.agents}
        return obs, infos

    def step(self, actions: Mapping[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            raise RuntimeError("the episode is over (no live agents); call reset()")
        actions = dict(actions or {})
        self._step_count += 1
        self._begin_step()
        active = self.active_agents()
        for agent in self.agents:
            if agent not in active and agent in actions and actions[agent] not in (None, ""):
                self._ignore(agent, actions[agent])
        if self._phase == "triage":
            self._triage_turn(actions.get("triage"))
        elif self._phase == "specialists":
            for agent in active:
                self._specialist_turn(agent, actions.get(agent))
        elif self._phase == "attending":
            self._attending_turn(actions.get("attending"))
        if self._phase != "done" and self._step_count >= self.max_steps:
            self._finish("max_turns")  # unreachable by construction; a guard against endless episodes
        return self._outputs()

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self.case.image if self.case is not None else np.zeros((8, 8, 3), np.uint8)
        return None

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ phases
    def active_agents(self) -> list[str]:
        """Agents whose actions take effect in the current phase."""
        if self._phase == "triage":
            return ["triage"]
        if self._phase == "specialists":
            return [f"specialist_{s}" for s in self._pending]
        if self._phase == "attending":
            return ["attending"]
        return []

    def _parse(self, agent: str, action: Any) -> Any:
        if action is None:
            return None, f"no action was given for the active agent '{agent}'"
        if not isinstance(action, str):
            return None, f"the action must be a str, got {type(action).__name__}"
        self._tags_ok[agent] &= tags_balanced(action)
        parsed = self.parser.parse(action)
        return (parsed, None) if parsed.error is None else (None, parsed.error)

    def _triage_turn(self, action: Any) -> None:
        parsed, err = self._parse("triage", action)
        if parsed is not None:
            if parsed.answer is not None:
                err = "the triage doctor does not answer; refer the case with refer(specialties=[...])"
            elif len(parsed.tool_calls) != 1 or parsed.tool_calls[0].name != "refer":
                names = ", ".join(c.name[:40] for c in parsed.tool_calls)
                err = f"the triage doctor makes exactly one call, refer(specialties=[...]); got: {names}"
        if err is not None:
            if self._invalid_reply("triage", err):
                self._notes.append("The triage doctor made no valid referral.")
                self._start_consultation([])
            return
        call: ToolCall = parsed.tool_calls[0]
        res = run_tool(self.refer_tool, self._refer, call)
        self._info["triage"]["tool_calls"] = [call.to_json()]
        if res.error is not None:
            self._info["triage"]["tool_errors"] = [res.error]
            if self._invalid_reply("triage", res.error):
                self._notes.append("The triage doctor made no valid referral.")
                self._start_consultation([])
            return
        self._terms["triage"]["routing"] = routing_score(self._refer.referred, self.case.specialty)
        self._emit("triage", res.text, (), SOURCE_TOOL)
        self._start_consultation(list(self._refer.referred))

    def _start_consultation(self, referred: list[str]) -> None:
        self._referred = referred
        self._notes.append(f"[from triage] Referred to: {', '.join(referred)}." if referred else "No specialist was consulted.")
        internal = [s for s in referred if self.team.backends[s] != "agent"]
        opinions, errors = self.team.internal_opinions(self.case, internal, self._rng, self._bucket_target, self._specialist_obs)
        self._opinions.update(opinions)
        self._notes.extend(f"{e.split(':')[0]} gave no valid opinion." for e in errors)
        self._pending = [s for s in referred if self.team.backends[s] == "agent"]
        if self._pending:
            self._phase = "specialists"
            for s in self._pending:
                obs = self._specialist_obs(s)
                self._emit(f"specialist_{s}", obs["text"], obs["images"], SOURCE_TASK)
        else:
            self._start_attending()

    def _specialist_obs(self, specialty: str) -> dict[str, Any]:
        return {"text": specialist_prompt(self.case, specialty), "images": (self.case.image,), "frames": (), "frame_times": (), "source": SOURCE_TASK, "turn": 0, "active": 1}

    def _specialist_turn(self, agent: str, action: Any) -> None:
        s = agent[len("specialist_"):]
        parsed, err = self._parse(agent, action)
        op = None
        if parsed is not None:
            op, err = opinion_from_reply(s, action, self.case)
        if op is None:
            if self._invalid_reply(agent, err or "invalid opinion"):
                self._notes.append(f"specialist_{s} gave no valid opinion.")
                self._pending.remove(s)
        else:
            self._opinions[s] = op
            self._pending.remove(s)
            self._terms[agent]["accuracy"] = self.specialist_reward * float(op.correct)
            self._emit(agent, "Opinion recorded and sent to the attending physician.", (), SOURCE_TOOL)
        if not self._pending:
            self._start_attending()

    def _start_attending(self) -> None:
        self._phase = "attending"
        ops = self.opinions()
        for a in self.agents:
            self._info[a]["bucket"] = bucket_of(ops)
        self._emit("attending", attending_prompt(self.case, ops, " ".join(self._notes)), (self.case.image,), SOURCE_TASK)

    def opinions(self) -> list[Opinion]:
        """The opinions given so far, in referral order."""
        return [self._opinions[s] for s in self._referred if s in self._opinions]

    def _attending_turn(self, action: Any) -> None:
        parsed, err = self._parse("attending", action)
        if parsed is not None and parsed.answer is None:
            err = "the attending physician has no tools; reply with <answer>...</answer>"
        if err is not None:
            if self._invalid_reply("attending", err):
                self._outcome(None, 0.0, format_ok=False)
                self._finish("max_invalid")
            return
        self._accuracy = verify_case(self.case, parsed.answer)
        self._outcome(parsed.answer, self._accuracy, format_ok=parsed.format_ok)
        self._finish("answer")

    def _outcome(self, answer: str | None, accuracy: float, *, format_ok: bool) -> None:
        ctx = RewardContext(
            answer=answer, accuracy=float(accuracy), format_ok=format_ok, tags_ok=self._tags_ok["attending"],
            num_invalid=self._invalid["attending"], answer_chars=len(answer or ""), metrics={"accuracy": float(accuracy)},
        )
        for k, v in self.rubric.score(ctx).items():
            self._terms["attending"][k] = self._terms["attending"].get(k, 0.0) + v

    def _finish(self, reason: str) -> None:
        self._phase = "done"
        self._reason = reason
        ops = self.opinions()
        metrics = {
            "accuracy": float(self._accuracy),
            "routing": routing_score(self._referred, self.case.specialty),
            "num_referred": float(len(self._referred)),
            "opinions_correct": float(np.mean([o.correct for o in ops])) if ops else 0.0,
        }
        for a in self.agents:
            self._info[a].update(
                success=bool(self._accuracy >= 1.0), score=float(self._accuracy), termination_reason=reason,
                bucket=bucket_of(ops), referred=list(self._referred), metrics=dict(metrics),
            )

    # ------------------------------------------------------------------ bookkeeping
    def _begin_step(self) -> None:
        self._out: dict[str, tuple[str, tuple, int]] = {}
        self._terms: dict[str, dict[str, float]] = {a: {} for a in self.agents}
        self._info: dict[str, dict[str, Any]] = {
            a: {"role": a.split("_")[0], "tool_calls": [], "tool_errors": [], "parse_error": None, "ignored_action": None}
            for a in self.agents
        }

    def _emit(self, agent: str, text: str, images: tuple, source: int) -> None:
        prev = self._out.get(agent)
        if prev is not None:  # several messages in one step: concatenate
            text, images, source = prev[0] + "\n" + text, prev[1] + tuple(images), max(prev[2], source)
        self._out[agent] = (text, tuple(images), source)

    def _invalid_reply(self, agent: str, error: str) -> bool:
        """Penalise a malformed reply; ``True`` when the agent has now exceeded ``max_invalid``."""
        self._invalid[agent] += 1
        self._info[agent]["parse_error"] = error
        self._terms[agent]["format"] = self._terms[agent].get("format", 0.0) - self.invalid_penalty
        over = self._invalid[agent] > self.max_invalid
        tail = " Too many invalid replies: your turn is over." if over else f" {self.parser.instructions()}"
        self._emit(agent, f"Invalid reply: {error}.{tail}", (), SOURCE_FEEDBACK)
        return over

    def _ignore(self, agent: str, action: Any) -> None:
        self._info[agent]["ignored_action"] = action[:200] if isinstance(action, str) else f"<{type(action).__name__}>"
        if self.out_of_turn_penalty:
            self._terms[agent]["format"] = self._terms[agent].get("format", 0.0) - self.out_of_turn_penalty
            self._emit(agent, "It is not your turn; your reply was ignored.", (), SOURCE_FEEDBACK)

    def _observe(self, agent: str) -> dict[str, Any]:
        text, images, source = self._out.get(agent, ("", (), SOURCE_TASK))
        text = text[:MAX_TEXT]
        n = len(images)
        if text.count("<image>") != n:  # agent-written text never forges placeholders
            text = text.replace("<image>", "[image]") + "".join(" <image>" for _ in range(n))
        return {
            "text": text,
            "images": tuple(np.ascontiguousarray(i, dtype=np.uint8) for i in images),
            "frames": (),
            "frame_times": (),
            "source": int(source),
            "turn": int(min(self._step_count, self.max_steps)),
            "active": int(agent in self.active_agents()),
        }

    def _reset_info(self, agent: str) -> dict[str, Any]:
        role = agent.split("_")[0]
        spec = agent[len("specialist_"):] if role == "specialist" else None
        return {
            "role": role,
            "task_id": self.case.case_id,
            "system_prompt": role_system_prompt(role, spec),
            "tool_schemas": [tool_schema(self.refer_tool)] if agent == "triage" else [],
            "max_turns": self.max_steps,
            "bucket_target": self._bucket_target or "natural",
            "active": int(agent in self.active_agents()),
        }

    def _outputs(self) -> tuple[dict, dict, dict, dict, dict]:
        done = self._phase == "done"
        truncated = done and self._reason == "max_turns"
        obs, rewards, terms, truncs, infos = {}, {}, {}, {}, {}
        for a in self.agents:
            obs[a] = self._observe(a)
            rewards[a] = float(sum(self._terms[a].values()))
            terms[a] = bool(done and not truncated)
            truncs[a] = bool(truncated)
            info = self._info[a]
            info.update(reward_terms=dict(self._terms[a]), num_invalid=self._invalid[a], phase=self._phase, active=obs[a]["active"])
            infos[a] = info
        if done:
            self.agents = []
        return obs, rewards, terms, truncs, infos

    # ------------------------------------------------------------------ scripted
    def oracle_actions(self) -> dict[str, str]:
        """What perfect active agents reply now (reads the ground truth)."""
        out: dict[str, str] = {}
        for a in self.active_agents():
            if a == "triage":
                out[a] = self.parser.format_call(ToolCall("refer", {"specialties": [self.case.specialty]}))
            elif a == "attending":
                out[a] = oracle_attending(self.case)
            else:
                out[a] = f"<answer>{self.case.answer_key}</answer> The image shows it."
        return out


def parallel_env(**kwargs: Any) -> MedTriageEnv:
    """The ``MedTriage`` ParallelEnv (PettingZoo-style constructor)."""
    return MedTriageEnv(**kwargs)


def env(**kwargs: Any) -> Any:
    """The AEC view of ``MedTriage`` (PettingZoo's ``parallel_to_aec`` converter)."""
    return parallel_to_aec(parallel_env(**kwargs))
