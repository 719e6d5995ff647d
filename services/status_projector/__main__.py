"""`python -m services.status_projector [run]` serves; `... rebuild` replays FLEET into fresh views."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from services.status_projector.runtime import run_rebuild, serve
from shared import telemetry
from shared.config import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.status_projector")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="project FLEET into Redis and serve the status API (the default)")
    rb = commands.add_parser("rebuild", help="replay FLEET from sequence 1 into a fresh namespace and switch to it")
    rb.add_argument("--no-swap", action="store_true", help="build the namespace but keep serving the current one")
    rb.add_argument("--namespace", help="namespace to build (default: a fresh one); never the one being served")
    rb.add_argument("--grace", type=float, default=5.0, help="seconds before the old namespace is deleted")
    args = parser.parse_args(argv)
    settings = get_settings()
    telemetry.setup("status_projector", settings.log_level, settings.otel_console)
    if args.command == "rebuild":
        result = asyncio.run(run_rebuild(settings, swap=not args.no_swap, namespace=args.namespace,
                                         grace_s=args.grace))  # fmt: skip
        print(json.dumps(result.__dict__))
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
