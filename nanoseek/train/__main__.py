"""`python -m nanoseek.train [train args]` (what torchrun launches), and `... speedrun [args]`."""

import argparse
import sys

from nanoseek.errors import NanoseekError
from nanoseek.train.cli import add_speedrun_parser, add_train_parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m nanoseek.train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_speedrun_parser(sub)
    if not argv or argv[0] not in ("train", "speedrun", "-h", "--help"):
        argv = ["train"] + list(argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
