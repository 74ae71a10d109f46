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
    _add_migrate(sub)
    _add_status(sub)
    _add_resume(sub)
    _add_rollback(sub)
    _add_lab(sub)
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


def _add_migrate(sub) -> None:
    parser = sub.add_parser("migrate", help="move the host's volume to another array and switch the host over")
    parser.add_argument("device", metavar="DEVICE", help="host device: /dev/mapper/NAME, /dev/dm-N, or /dev/sdX (relogin)")
    parser.add_argument("--to-target", required=True, metavar="IQN", help="destination array's iSCSI target")
    parser.add_argument("--to-portal", required=True, metavar="IP:PORT", help="destination array's portal")
    backing = parser.add_mutually_exclusive_group()
    backing.add_argument("--backing-dir", metavar="DIR", help="file-backed destination in DIR (default: the source's)")
    backing.add_argument("--backing-device", metavar="DEV", help="destination on this block device (exact size)")
    parser.add_argument("--mode", choices=("online", "offline"),
                        help="online: the host keeps writing, changes are tracked on the maps stacked on its multipath "
                             "map (LVM) and copied in delta passes, IO is held only for the last delta; offline: a "
                             "fence for the whole copy (default: online where the host's writes can be tracked)")
    parser.add_argument("--max-hold", type=float, default=1.0, metavar="SECONDS",
                        help="online: hold host IO only once the last delta is estimated to copy in this long (default 1)")
    parser.add_argument("--fence", choices=("writeprotect", "suspend", "none"),
                        help="offline: keep the source unchanged during the copy: write-protect the host's mapping "
                             "(default), hold host IO on the map, or none (only if the host is quiesced)")
    parser.add_argument("--switch", choices=("multipath", "relogin"), default="multipath",
                        help="move the host by a multipath path switch (default) or iSCSI logout/login")
    parser.add_argument("--switch-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="if the destination path is not in the map this long after the hold began, put the "
                             "source path back and stop (default 10)")
    parser.add_argument("--worm", action="store_true", help="write-protect the destination for the host afterwards")
    parser.add_argument("--chunk-size", type=parse_size, default=4 << 20, help="chunk length (default 4M)")
    parser.add_argument("--max-rate", type=parse_size, help="throttle the copy to this many bytes per second")
    parser.add_argument("--id", dest="migration_id", help="migration id (default: time and WWID)")
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout, then the report")
    parser.set_defaults(func=_cmd_migrate)


def _cmd_migrate(args) -> int:
    from blockmig.migration import MigrationRequest, plan_migration, run_migration

    request = MigrationRequest(
        device=args.device, to_target=args.to_target, to_portal=args.to_portal,
        backing_dir=args.backing_dir, backing_device=args.backing_device, fence=args.fence,
        switch=args.switch, worm=args.worm, chunk_size=args.chunk_size, max_rate=args.max_rate,
        migration_id=args.migration_id, switch_timeout=args.switch_timeout, mode=args.mode, max_hold=args.max_hold,
    )
    journal = plan_migration(request)
    with _MigrationRenderer(args.json) as render:
        render({"event": "planned", "id": journal.id, "journal": journal.path})
        report = run_migration(journal.id, render)
    _print_report(report, args.json)
    return 0


def _add_resume(sub) -> None:
    parser = sub.add_parser("resume", help="finish a migration that stopped (crash, kill, error)")
    parser.add_argument("migration_id", metavar="ID")
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout, then the report")
    parser.set_defaults(func=_cmd_resume)


def _cmd_resume(args) -> int:
    from blockmig.migration import resume_migration

    with _MigrationRenderer(args.json) as render:
        report = resume_migration(args.migration_id, render)
    _print_report(report, args.json)
    return 0


def _add_rollback(sub) -> None:
    parser = sub.add_parser("rollback", help="before the switch: back to the source, destination removed")
    parser.add_argument("migration_id", metavar="ID")
    parser.add_argument("--json", action="store_true", help="print the final state as JSON")
    parser.set_defaults(func=_cmd_rollback)


def _cmd_rollback(args) -> int:
    from blockmig.migration import rollback_migration

    with _MigrationRenderer(args.json) as render:
        summary = rollback_migration(args.migration_id, render)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"migration {summary['id']} rolled back: host on {summary['source'].get('target')}, "
              f"destination volume removed, fence lifted")
    return 0


def _add_status(sub) -> None:
    parser = sub.add_parser("status", help="show migrations (all, or one ID) from their journals")
    parser.add_argument("migration_id", metavar="ID", nargs="?")
    parser.add_argument("--json", action="store_true", help="machine-readable")
    parser.set_defaults(func=_cmd_status)


def _cmd_status(args) -> int:
    from blockmig.migration import migration_status

    summaries = migration_status(args.migration_id)
    if args.json:
        print(json.dumps(summaries if args.migration_id is None else summaries[0], indent=2))
        return 0
    if not summaries:
        print("no migrations")
    for summary in summaries:
        source, destination = summary["source"], summary["destination"]
        print(f"{summary['id']}: {summary['state']}"
              + (f" in {summary['current_step']}" if summary["state"] not in ("done", "rolled_back") else "")
              + (f" ({summary['error']})" if summary.get("error") and summary["state"] == "failed" else ""))
        print(f"  source      {source.get('map') or source.get('device')} wwid {source.get('wwid')} "
              f"{source.get('size')} bytes on {source.get('target')}")
        print(f"  destination {destination.get('volume')} on {destination.get('target')} "
              f"({destination.get('backing')})")
        print(f"  mode {summary['mode']}, fence {summary['fence']}, switch {summary['switch']}, "
              f"worm {'yes' if summary['worm'] else 'no'}")
        if summary.get("online"):
            state = summary["online"]
            delta = state.get("delta_bytes")
            print(f"  online pass {state.get('pass')}, delta {'?' if delta is None else f'{delta / 2**20:.1f} MiB'}, "
                  f"estimated hold {state.get('estimated_hold', '?')} s (max {state.get('max_hold')} s)")
        for name, step in summary["steps"].items():
            print(f"  {name:<18} {step.get('state', '?'):<8} {step.get('done') or step.get('started') or ''}")
    return 0


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": "report", **report}), flush=True)
        return
    held = report.get("io_held_seconds")
    print(f"migrated {report['map'] or report['host_disk']} (WWID {report['wwid']}, {report['size']} bytes, "
          f"{report['chunks']} chunks of {report['chunk_size']})")
    print(f"  from {report['source']['target']} {report['source']['backing']}")
    print(f"  to   {report['destination']['target']} {report['destination']['backing']}")
    print(f"  volume digest sha256:{report['volume_digest']} (copied and verified)")
    print(f"  copy {report['copy_seconds']} s, verify {report['verify_seconds']} s, "
          f"host IO held at the switch {'n/a' if held is None else f'{held * 1000:.0f} ms'}, "
          f"total {report['total_seconds']} s")
    print(f"  mode {report.get('mode', 'offline')}, fence {report['fence']}, switch {report['switch']}, "
          f"worm {'yes' if report['worm'] else 'no'}")
    if report.get("online"):
        final = report.get("final_delta") or {}
        print(f"  online: {len(report['online']['passes'])} delta passes before the hold, last delta "
              f"{final.get('chunks', '?')} chunks copied in the hold")


class _MigrationRenderer:
    """Progress bars for the copy and verify, one line per step on stderr; JSON lines with --json."""

    def __init__(self, as_json: bool):
        self._as_json = as_json
        self._bars = _ProgressRenderer(as_json)

    def __call__(self, event: dict) -> None:
        if self._as_json or event["event"] in ("start", "chunk", "verify_start", "verified_chunk"):
            self._bars(event)
            return
        if event["event"] in ("done", "verify_done"):
            self._bars.close()
        elif event["event"] == "step":
            print(f"blockmig: {event['step']}: {event['state']}", file=sys.stderr, flush=True)
        elif event["event"] == "io_resumed" and event.get("io_held_seconds") is not None:
            print(f"blockmig: host IO held {event['io_held_seconds'] * 1000:.0f} ms", file=sys.stderr, flush=True)
        elif event["event"] in ("copy_retry", "rollback", "planned", "switch_revert", "delta"):
            details = ", ".join(f"{k} {v}" for k, v in event.items() if k != "event")
            print(f"blockmig: {event['event'].replace('_', ' ')}: {details}", file=sys.stderr, flush=True)

    def __enter__(self) -> "_MigrationRenderer":
        return self

    def __exit__(self, *exc_info) -> None:
        self._bars.close()


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

    def close(self) -> None:
        """End the current bar; the next start event opens a new one."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __exit__(self, *exc_info) -> None:
        self.close()


def _add_lab(sub) -> None:
    # No `from blockmig import lab` here: it imports the host stack (pyudev, tenacity, asyncio),
    # about 0.3 s of start-up in the lab VM that every `blockmig copy` would pay.
    parser = sub.add_parser("lab", help="build, inspect or remove the lab arrays and host paths")
    actions = parser.add_subparsers(dest="lab_action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="source array with a volume the host uses via multipath; empty destination")
    up.add_argument("--size", type=parse_size, help="source volume size (default 64M)")
    up.add_argument("--backing-dir", help="where backing files live (default /var/lib/blockmig-lab)")
    down = actions.add_parser("down", help="remove every map, session, target and backing file of the lab")
    down.add_argument("--backing-dir", help="where backing files live (default /var/lib/blockmig-lab)")
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

    backing_dir = getattr(args, "backing_dir", None) or lab.DEFAULT_BACKING_DIR
    if args.lab_action == "up":
        _print_lab_status(lab.lab_up(args.size or lab.DEFAULT_SIZE, backing_dir, on_step=step))
    elif args.lab_action == "down":
        for item in lab.lab_down(backing_dir, on_step=step):
            print(f"removed {item}")
    else:
        status = lab.lab_status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_lab_status(status)
    return 0


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
