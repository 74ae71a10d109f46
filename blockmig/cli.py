"""Command line: the only module that prints or chooses exit codes.

Each subcommand has an `_add_<name>` that declares its arguments and a
`_cmd_<name>` that runs it. Library code reports progress through callbacks
and failure through BlockmigError; this module renders both.
"""

import argparse
import json
import sys

from blockmig import __version__
from blockmig.datapath.copy import DEFAULT_JOURNAL_INTERVAL
from blockmig.errors import BlockmigError

SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class _OneLineErrorParser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr too, like every other blockmig error."""

    def error(self, message: str):
        self.exit(2, f"blockmig: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="blockmig",
        description="Move a block volume between iSCSI arrays with a guarded copy, then switch the host.",
    )
    parser.add_argument("--version", action="version", version=f"blockmig {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_copy(sub)
    _add_verify(sub)
    return parser


def parse_size(text: str) -> int:
    """'4M' -> 4194304; binary suffixes K, M, G, T (an optional trailing 'iB' or 'B' is accepted)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in SIZE_SUFFIXES else ""
    try:
        number = float(value[: len(value) - len(suffix)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4M, 512K, 1G)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(number * SIZE_SUFFIXES[suffix])


def _add_copy(sub) -> None:
    parser = sub.add_parser("copy", help="copy SOURCE onto DEST through the guard, resumable")
    parser.add_argument("source", metavar="SOURCE", help="source block device (read with O_DIRECT)")
    parser.add_argument("destination", metavar="DEST", help="destination block device, at least as large")
    parser.add_argument("--chunk-size", type=parse_size, help="chunk length, e.g. 4M (default 4M, or the journal's)")
    parser.add_argument("--journal", help="copy journal (default /var/lib/blockmig/copy-<hash of paths>.json)")
    parser.add_argument("--resume", action="store_true", help="continue from the journal (start fresh if none)")
    parser.add_argument("--max-rate", type=parse_size, help="throttle to this many bytes per second, e.g. 100M")
    parser.add_argument("--journal-interval", type=float, default=DEFAULT_JOURNAL_INTERVAL, metavar="SECONDS",
                        help="seconds between journal writes (default 1; 0: after every acknowledged chunk)")
    parser.add_argument("--manifest", help="also write the manifest (chunk digests) to this file")
    parser.add_argument("--allow-files", action="store_true", help="accept regular files (tests, dry runs)")
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout instead of a bar")
    parser.set_defaults(func=_cmd_copy)


def _cmd_copy(args) -> int:
    from blockmig.datapath import copy_volume
    from blockmig.datapath.journal import write_json_atomically

    with _ProgressRenderer(args.json) as render:
        manifest = copy_volume(
            args.source,
            args.destination,
            args.journal,
            chunk_size=args.chunk_size,
            resume=args.resume,
            allow_regular_files=args.allow_files,
            max_rate=args.max_rate,
            journal_interval=args.journal_interval,
            on_event=render,
        )
    if args.manifest:
        write_json_atomically(args.manifest, manifest.to_dict())
    if not args.json:
        print(f"copied {args.source} -> {args.destination}: {manifest.size} bytes in {manifest.chunk_count} chunks, "
              f"volume digest sha256:{manifest.volume_digest}")
    return 0


def _add_verify(sub) -> None:
    parser = sub.add_parser("verify", help="re-read DEST (and SOURCE) and compare with the manifest")
    parser.add_argument("destination", metavar="DEST", help="the copy's destination")
    parser.add_argument("--manifest", required=True, help="manifest file, or the copy journal")
    parser.add_argument("--source", help="also re-read this source and compare it")
    parser.add_argument("--allow-files", action="store_true", help="accept regular files (tests, dry runs)")
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout instead of a bar")
    parser.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    from blockmig.datapath import load_manifest, verify_volume

    manifest = load_manifest(args.manifest)
    for path in [args.destination] + ([args.source] if args.source else []):
        with _ProgressRenderer(args.json) as render:
            digest = verify_volume(path, manifest, allow_regular_file=args.allow_files, on_event=render)
        if not args.json:
            print(f"verified {path}: {manifest.size} bytes match the manifest, volume digest sha256:{digest}")
    return 0


class _ProgressRenderer:
    """Turns engine events into a tqdm bar on a terminal, or JSON lines with --json."""

    def __init__(self, as_json: bool):
        self._as_json = as_json
        self._bar = None

    def __call__(self, event: dict) -> None:
        if self._as_json:
            print(json.dumps(event), flush=True)
            return
        if not sys.stderr.isatty():
            return
        kind = event["event"]
        if kind in ("start", "verify_start"):
            from tqdm import tqdm

            self._bar = tqdm(total=event["size"], initial=event.get("resume_from", 0), unit="B", unit_scale=True,
                             unit_divisor=1024, desc="copy" if kind == "start" else "verify", file=sys.stderr)
        elif self._bar is not None and kind in ("chunk", "verified_chunk"):
            self._bar.update(event.get("reserved_address", event.get("end")) - self._bar.n)

    def __enter__(self) -> "_ProgressRenderer":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.close()


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments; turn a BlockmigError into one line on stderr and its exit code."""
    try:
        return args.func(args) or 0
    except BlockmigError as exc:
        print(f"blockmig: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("blockmig: interrupted; the journal allows resume or rollback", file=sys.stderr)
        return 130
