"""Command line: the only module that prints or chooses exit codes.

Each subcommand has an `_add_<name>` that declares its arguments and a
`_cmd_<name>` that runs it. Library code reports progress through callbacks
and failure through BlockmigError; this module renders both.
"""

import argparse
import sys

from blockmig import __version__
from blockmig.errors import BlockmigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockmig",
        description="Move a block volume between iSCSI arrays with a guarded copy, then switch the host.",
    )
    parser.add_argument("--version", action="version", version=f"blockmig {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    del sub  # subcommands are added by the issues that build them
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except BlockmigError as exc:
        print(f"blockmig: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("blockmig: interrupted; the journal allows resume or rollback", file=sys.stderr)
        return 130
