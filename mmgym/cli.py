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
