"""Command line: the only module that prints or chooses exit codes.

Each subcommand has an `_add_<name>` that declares its arguments and a
`_cmd_<name>` that runs it. Library code reports progress through callbacks
and failure through BlockmigError; this module renders both.
"""

import argparse
import json
import re
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
    _add_lab(sub)
    return parser


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' -> bytes (binary units; a trailing 'iB' or 'B' is accepted)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 64M, 1G or a byte count")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _add_lab(sub) -> None:
    from blockmig import lab

    parser = sub.add_parser("lab", help="build, inspect or remove the lab arrays and host paths")
    actions = parser.add_subparsers(dest="lab_action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="source array with a volume the host uses via multipath; empty destination")
    up.add_argument("--size", type=parse_size, default=lab.DEFAULT_SIZE, help="source volume size (default 64M)")
    up.add_argument("--backing-dir", default=lab.DEFAULT_BACKING_DIR, help="where backing files live")
    down = actions.add_parser("down", help="remove every map, session, target and backing file of the lab")
    down.add_argument("--backing-dir", default=lab.DEFAULT_BACKING_DIR, help="where backing files live")
    status = actions.add_parser("status", help="say what of the lab exists")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_cmd_lab)


def _print_lab_status(status: dict) -> None:
    print("lab is up" if status["up"] else "lab is not (fully) up")
    for array in status["arrays"]:
        print(f"array {array['target']} on {', '.join(array['portals'])}")
        for volume in array["volumes"]:
            print(f"  volume {volume['name']} lun {volume['lun']} {volume['size']} bytes wwid {volume['wwid']}"
                  f" backing {volume['backing']}")
            for mapping in volume["mappings"]:
                wp = " write-protected" if mapping["write_protect"] else ""
                print(f"    mapped to {mapping['initiator']} as lun {mapping['lun']}{wp}")
    for session in status["sessions"]:
        disks = ", ".join(f"lun {lun}: /dev/{name}" for lun, name in session["disks"].items()) or "no disks"
        print(f"session {session['sid']} {session['target']} at {session['portal']} via {session['iface']}"
              f" ({session['state']}): {disks}")
    for found in status["maps"]:
        paths = ", ".join(f"{p['dev']} {p['dm_state']}/{p['checker']}" for p in found["paths"]) or "no paths"
        print(f"map {found['device']} wwid {found['wwid']}: {paths}")


def _cmd_lab(args) -> int:
    from blockmig import lab

    def step(text: str) -> None:
        print(f"lab: {text}", file=sys.stderr)

    if args.lab_action == "up":
        _print_lab_status(lab.lab_up(args.size, args.backing_dir, on_step=step))
    elif args.lab_action == "down":
        for item in lab.lab_down(args.backing_dir, on_step=step):
            print(f"removed {item}")
    else:
        status = lab.lab_status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_lab_status(status)
    return 0


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
