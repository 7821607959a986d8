"""The front door: ``kvsched serve | simulate | ...``.

The one module that sees both the service and the load-test side; nothing imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence


def _serve(argv: Sequence[str]) -> int:
    from scheduler_service import config, server

    p = argparse.ArgumentParser(
        prog="kvsched serve", description="Run the kvsched scheduler service."
    )
    config.add_arguments(p)
    ns = p.parse_args(argv)
    try:
        cfg = config.resolve(ns)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    try:
        return asyncio.run(server.serve(cfg))
    except RuntimeError as exc:  # e.g. data dir locked by another process
        print(f"kvsched serve: {exc}", file=sys.stderr)
        return 2


def _delegate(module: str, func: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            print(f"this command is not available in this build ({exc})", file=sys.stderr)
            return 2
        result: int = getattr(mod, func)(list(argv))
        return result

    return run


COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "serve": ("run the scheduler service", _serve),
    "simulate": (
        "compare policies in the discrete-event simulator",
        _delegate("loadtest.sim.cli", "simulate_main"),
    ),
    "replay": (
        "replay a recorded or Mooncake trace through LRU / Belady / kvsched",
        _delegate("loadtest.sim.replay", "replay_main"),
    ),
    "loadtest": (
        "drive a live server with a synthetic agent fleet",
        _delegate("loadtest.fleet", "loadtest_main"),
    ),
    "top": ("live operator view of a running server", _delegate("kvsched.top", "top_main")),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: kvsched <command> [options]\n\ncommands:")
        for name, (desc, _) in COMMANDS.items():
            print(f"  {name:<10} {desc}")
        return 0 if args else 2
    cmd = COMMANDS.get(args[0])
    if cmd is None:
        print(f"kvsched: unknown command {args[0]!r} (try --help)", file=sys.stderr)
        return 2
    return cmd[1](args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
