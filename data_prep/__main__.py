"""`python -m data_prep encode|merge|verify …` — exit 0 ok, 1 verify found problems or an unexpected
error, 2 bad input or flags (clear message; do not requeue)."""

from __future__ import annotations

import argparse
import sys

from data_prep import encode, merge, verify
from data_prep.errors import DataPrepError
from ditscale.data.storage import RemoteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    encode.add_args(sub.add_parser("encode", help="images → posterior latents → shards (one worker)"))
    merge.add_args(sub.add_parser("merge", help="one index and dataset.json over all slices"))
    verify.add_args(sub.add_parser("verify", help="check hashes, counts and records of a merged dataset"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "encode":
            encode.run(encode.config_from_args(args))
            return 0
        if args.command == "merge":
            return merge.main(args)
        return verify.main(args)
    except DataPrepError as e:
        print(f"data_prep {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except RemoteError as e:  # refused credentials, missing bucket, store unreachable: a human fixes it
        print(f"data_prep {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
