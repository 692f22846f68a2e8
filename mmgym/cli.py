"""The ``mmgym`` command line: parsing only; the work lives in the packages."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mmgym.core.config import ConfigError, parse_override

__all__ = ["main"]


def _kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        path, value = parse_override(it)
        if len(path) != 1:
            raise ConfigError(f"env kwarg {it!r} must be a plain key=value")
        out[path[0]] = value
    return out


def _cmd_envs(args: argparse.Namespace) -> int:
    from mmgym.envs.registration import ENV_IDS

    width = max(len(k) for k in ENV_IDS)
    for env_id, (_, _, desc) in ENV_IDS.items():
        print(f"{env_id:<{width}}  {desc}")
    return 0


def _cmd_play(args: argparse.Namespace) -> int:
    import gymnasium as gym

    from mmgym.agents.play import play
    from mmgym.envs.registration import ENV_IDS

    if args.env_id not in gym.registry and args.env_id not in ENV_IDS:
        print(f"mmgym play: unknown env {args.env_id!r}; run `mmgym envs` for the list", file=sys.stderr)
        return 2
    summary = play(args.env_id, agent=args.agent, episodes=args.episodes, out=args.out, seed=args.seed, env_kwargs=_kv(args.env_kwargs), progress=True)
    print(json.dumps(summary, indent=2))
    print(f"episode pages: {summary['index']}")
    return 0


def _load_train_config(args: argparse.Namespace, extra: Sequence[str] = ()):
    from mmgym.core import load_config
    from mmgym.trainer.config import TrainConfig

    return load_config(TrainConfig, args.config, [*extra, *args.overrides])


def _split_config_arg(args: argparse.Namespace) -> None:
    """``mmgym train a=b`` has no config file: the first positional is an override."""
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config, *args.overrides]
        args.config = None


def _cmd_train(args: argparse.Namespace, *, sft_only: bool = False) -> int:
    from mmgym.trainer import train
    from mmgym.trainer.run_dir import RunDirError

    _split_config_arg(args)
    if args.resume and (args.config or args.overrides):
        raise ConfigError("--resume continues a run with its saved config; drop the config file and overrides")
    if args.resume:
        from mmgym.trainer.run_dir import RunDir

        cfg = RunDir.open_for_resume(args.resume).train_config()
    else:
        cfg = _load_train_config(args, ["iterations=0"] if sft_only else [])
    try:
        summary = train(cfg, resume=args.resume, progress=not args.quiet)
    except RunDirError as e:
        print(f"mmgym {args.command}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"run folder: {summary['run_dir']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmgym.agents import HFPolicy
    from mmgym.trainer.common import evaluate, model_dir
    from mmgym.trainer.run_dir import RunDir

    src = model_dir(args.checkpoint)
    if not src.is_dir():
        raise ConfigError(f"{args.checkpoint!r} is not a run folder, checkpoint or model folder")
    env_id, env_kwargs, tool_schemas, max_new = args.env or "mmgym/ChainOfFocus-v0", _kv(args.env_kwargs), True, 40
    run = RunDir.enclosing(Path(args.checkpoint))
    if run is not None:  # a run folder or one of its checkpoints: evaluate as the run did, unless told otherwise
        cfg = run.train_config()
        if args.env is None:
            env_id = cfg.env.id
            env_kwargs = {**cfg.env.make_kwargs, **env_kwargs}
        tool_schemas, max_new = cfg.rollout.tool_schemas, cfg.rollout.max_new_tokens
        print(f"mmgym eval: prompts and env settings from the run folder {run.path}", file=sys.stderr)
    if args.tool_schemas is not None:
        tool_schemas = args.tool_schemas
    if args.max_new_tokens is not None:
        max_new = args.max_new_tokens
    from mmgym.envs.registration import env_policy_tokens

    policy = HFPolicy(src, add_tokens=env_policy_tokens(env_id, env_kwargs))  # a run's checkpoints hold them already
    metrics, _ = evaluate(policy, env_id, env_kwargs, episodes=args.episodes, max_new_tokens=max_new,
                          tool_schemas=tool_schemas, pages_dir=Path(args.out) if args.out else None,
                          pages=args.pages if args.out else 0, progress=True)
    print(json.dumps(metrics, indent=2))
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from mmgym.envs.server import serve

    token = args.token or os.environ.get("MMGYM_SERVER_TOKEN") or None
    serve(args.env_id, host=args.host, port=args.port, env_kwargs=_kv(args.env_kwargs), token=token, max_sessions=args.max_sessions, session_timeout_s=args.session_timeout, step_timeout_s=args.step_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgym", description="Multimodal agent RL gym: envs, agents, algorithms, trainer.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("envs", help="list every registered environment")
    e.set_defaults(fn=_cmd_envs)
    pl = sub.add_parser("play", help="run a scripted agent and write HTML episode pages")
    pl.add_argument("env_id", nargs="?", default="mmgym/ChainOfFocus-v0", help="environment id (default: mmgym/ChainOfFocus-v0)")
    pl.add_argument("--agent", default="oracle", choices=["oracle", "random", "first_view"], help="scripted agent")
    pl.add_argument("--episodes", type=int, default=3)
    pl.add_argument("--out", default="runs/play", help="output folder for the pages")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="keyword arguments for gymnasium.make")
    pl.set_defaults(fn=_cmd_play)
    for name, helptext in (("train", "warm start + multi-turn RL (defaults: the embedded model on ChainOfFocus)"),
                           ("sft", "the supervised warm start on oracle demonstrations only")):
        t = sub.add_parser(name, help=helptext)
        t.add_argument("config", nargs="?", default=None, help="YAML config (see examples/)")
        t.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. algo.loss.clip_high=0.28")
        t.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last complete checkpoint")
        t.add_argument("--quiet", action="store_true", help="no progress bars")
        t.set_defaults(fn=_cmd_train if name == "train" else (lambda a: _cmd_train(a, sft_only=True)))
    ev = sub.add_parser("eval", help="evaluate a run folder or checkpoint on held-out tasks")
    ev.add_argument("checkpoint", help="run folder, checkpoint folder or model folder")
    ev.add_argument("--env", default=None, help="env id (default: the run's env, else mmgym/ChainOfFocus-v0)")
    ev.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    ev.add_argument("--episodes", type=int, default=200)
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's rollout.max_new_tokens, else 40")
    ev.add_argument("--tool-schemas", action=argparse.BooleanOptionalAction, default=None,
                    help="list the tools' JSON schemas in the prompt (default: as the run did, else yes)")
    ev.add_argument("--out", default=None, help="write sample episode pages here")
    ev.add_argument("--pages", type=int, default=8)
    ev.set_defaults(fn=_cmd_eval)
    sv = sub.add_parser("serve", help="host an env over HTTP/WebSocket (OpenEnv protocol; extra: server)")
    sv.add_argument("env_id", help="environment id, e.g. mmgym/ChainOfFocus-v0")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (anything but loopback needs a token)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--token", default=None, help="auth token (default: $MMGYM_SERVER_TOKEN)")
    sv.add_argument("--max-sessions", type=int, default=64)
    sv.add_argument("--session-timeout", type=float, default=600.0, help="idle seconds before a session is closed")
    sv.add_argument("--step-timeout", type=float, default=60.0, help="seconds one env call may take")
    sv.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="keyword arguments for gymnasium.make")
    sv.set_defaults(fn=_cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, ValueError) as e:
        print(f"mmgym {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
