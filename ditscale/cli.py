"""`ditscale <command> [args]`: one entry point over the `python -m` modules."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "ditscale.train",
    "sample": "ditscale.sample",
    "evaluate": "ditscale.evaluate.__main__",
    "export": "ditscale.engine.export",
    "checkpoint": "ditscale.engine.checkpoint",
    "interop": "ditscale.interop",
    "plan": "ditscale.plan",
    "prep": "data_prep.__main__",
    "quickstart": "ditscale.quickstart",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: ditscale {" + "|".join(COMMANDS) + "} [args]  (each takes --help)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
