"""Registers every ``mmgym/...`` id with Gymnasium (imported by ``import mmgym``)."""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

__all__ = ["ENV_IDS", "NEEDS_EXTRA", "env_policy_tokens", "register_all"]

# id -> (entry point, kwargs, one-line description)
ENV_IDS: dict[str, tuple[str, dict, str]] = {
    "mmgym/VQA-v0": ("mmgym.envs.vqa:VQAEnv", {}, "Visual question answering on procedural shape scenes (choice, exact, numeric answers)."),
    "mmgym/ChainOfFocus-v0": ("mmgym.envs.focus:ChainOfFocusEnv", {}, "V*-style visual search: the answer is readable only after zooming (bbox zoom)."),
    "mmgym/ChainOfFocusRegion-v0": ("mmgym.envs.focus:ChainOfFocusEnv", {"zoom": "region", "grid": 6, "zoom_size": 336}, "Chain-of-Focus with zoom(region=k) on a 6x6 grid drawn on the first view."),
    "mmgym/VideoFrames-v0": ("mmgym.envs.video:VideoFramesEnv", {}, "Long-video QA: sparse low-res overview, then crop_video / get_frames / zoom_frame (LOVE-R1, LongVT)."),
    "mmgym/PushBlock-v0": ("mmgym.envs.vla:PushBlockEnv", {}, "VLA: push a block onto a target from a top-down camera; 7-D action tokens in chunks of 8."),
    "mmgym/PushBlock-Continuous-v0": ("mmgym.envs.vla:PushBlockEnv", {"action": "continuous"}, "PushBlock with a Box (8, 7) action for vector policies."),
    "mmgym/ManiSkill-PickCube-v0": ("mmgym.envs.maniskill:ManiSkillEnv", {"task": "PickCube-v1"}, "VLA: ManiSkill3 PickCube, camera + instruction, 7-D action tokens (extra: maniskill)."),
    "mmgym/ManiSkill-PushCube-v0": ("mmgym.envs.maniskill:ManiSkillEnv", {"task": "PushCube-v1"}, "VLA: ManiSkill3 PushCube, camera + instruction, 7-D action tokens (extra: maniskill)."),
    "mmgym/ManiSkill-v0": ("mmgym.envs.maniskill:ManiSkillEnv", {}, "VLA: any ManiSkill3 task by keyword, make(..., task='StackCube-v1') (extra: maniskill)."),
    "mmgym/AskToAct-v0": ("mmgym.envs.ask_to_act:AskToActEnv", {}, "Ask-to-Act: fetch the right object under an ambiguous instruction, asking as few clarifying questions as needed."),
    "mmgym/MedTriage-Attending-v0": ("mmgym.envs.medtriage_views:MedTriageAttendingEnv", {}, "MMedAgent-RL attending physician: weigh scripted specialists' opinions (right, conflicting, wrong) and answer."),
    "mmgym/MedTriage-Triage-v0": ("mmgym.envs.medtriage_views:MedTriageTriageEnv", {}, "MMedAgent-RL triage doctor: refer a synthetic scan to the specialty matching its modality/organ."),
    "mmgym/MedTriage-TwoRole-v0": ("mmgym.envs.medtriage_views:MedTriageTwoRoleEnv", {}, "MMedAgent-RL shared policy: episodes alternate triage doctor and attending physician (role in the system prompt)."),
}

# ids that need an optional extra (id -> extra); the registry test skips them without it
NEEDS_EXTRA: dict[str, str] = {"mmgym/ManiSkill-PickCube-v0": "maniskill", "mmgym/ManiSkill-PushCube-v0": "maniskill", "mmgym/ManiSkill-v0": "maniskill"}


def env_policy_tokens(env_id: str, kwargs: dict | None = None) -> tuple[str, ...]:
    """The tokens a policy must hold as single vocabulary entries to act in ``env_id`` with
    ``kwargs`` (e.g. PushBlock's 256 action tokens ``<act_K>``), from the env class's
    ``policy_tokens(**kwargs)`` classmethod; ``()`` when it has none. Builds no env (a
    ManiSkill env would start a simulator)."""
    from gymnasium.envs.registration import load_env_creator
    from gymnasium.envs.registration import spec as gym_spec

    spec = gym_spec(env_id)
    entry = spec.entry_point
    fn = getattr(entry if callable(entry) else load_env_creator(entry), "policy_tokens", None)
    if fn is None:
        return ()
    return tuple(fn(**{**(spec.kwargs or {}), **(kwargs or {})}))


def register_all() -> None:
    for env_id, (entry, kwargs, _desc) in ENV_IDS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry, kwargs=dict(kwargs))


register_all()
