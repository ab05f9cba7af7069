"""The ``alexnet-fast`` command: ``info`` (and ``train``, ``eval``, ``bench``, ``viz``)."""
from __future__ import annotations

import argparse
import importlib
import sys


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: the flag's error names it and what was expected."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_info(args) -> int:
    from alexnet_fast.info import format_info, info

    print(format_info(info()))
    return 0


# Modules that add subcommands: each has ``add_commands(subparsers)``, which sets ``func`` on its
# parsers and imports anything heavy only when its command runs.
COMMAND_MODULES = ("alexnet_fast.train", "alexnet_fast.viz", "alexnet_fast.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexnet-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU, built and usable backends, what auto picks")
    p.set_defaults(func=_cmd_info)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    from alexnet_fast import backends

    args = build_parser().parse_args(argv)
    try:
        backends.get_backend()  # a bad ALEXNET_FAST_BACKEND is reported here, not mid-command
    except ValueError as e:
        print(f"alexnet-fast: error: {e}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
