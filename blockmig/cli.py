"""Command line: the only module that prints or chooses exit codes.

Each subcommand has an `_add_<name>` that declares its arguments and a
`_cmd_<name>` that runs it. Library code reports progress through callbacks
and failure through BlockmigError; this module renders both.
"""

import argparse
import json
import math
import os
import signal
import sys

from blockmig import __version__, sizes
from blockmig.datapath.copy import DEFAULT_JOURNAL_INTERVAL
from blockmig.errors import BlockmigError, UsageError
from blockmig.ids import check_id


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
    _add_report(sub)
    _add_lab(sub)
    _add_array(sub)
    return parser


def _argument_type(parse):
    """A blockmig.sizes / blockmig.ids parser as an argparse type: its ValueError or UsageError is the one line."""

    def convert(text: str):
        try:
            return parse(text)
        except (ValueError, UsageError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


parse_size = _argument_type(sizes.parse_size)  # '4M' -> 4194304: binary suffixes K, M, G, T ('iB', 'B' accepted)
chunk_size_argument = _argument_type(sizes.parse_chunk_size)  # a positive multiple of 4096, at most 256M
max_rate_argument = _argument_type(sizes.parse_max_rate)  # bytes per second, at least 1M
id_argument = _argument_type(lambda text: check_id(text, "id"))


def _seconds_argument(low: float, high: float, low_included: bool = True):
    """A number of seconds in a range; nan and inf are not seconds (a nan timeout would never expire)."""

    def parse_seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"not a number of seconds: {text!r}") from None
        if not math.isfinite(value) or not (low <= value if low_included else low < value) or value > high:
            raise ValueError(f"{text!r} seconds: must be {'from' if low_included else 'above'} {low:g} "
                             f"{'to' if low_included else 'and at most'} {high:g}")
        return value

    return _argument_type(parse_seconds)


def _add_copy(sub) -> None:
    parser = sub.add_parser("copy", help="copy SOURCE onto DEST through the guard, resumable")
    parser.add_argument("source", metavar="SOURCE", help="source block device (read with O_DIRECT)")
    parser.add_argument("destination", metavar="DEST", help="destination block device, at least as large")
    parser.add_argument("--chunk-size", type=chunk_size_argument,
                        help="chunk length, a multiple of 4K up to 256M, e.g. 4M (default 4M, or the journal's)")
    parser.add_argument("--journal", help="copy journal (default /var/lib/blockmig/copy-<hash of paths>.json)")
    parser.add_argument("--resume", action="store_true", help="continue from the journal (start fresh if none)")
    parser.add_argument("--max-rate", type=max_rate_argument,
                        help="throttle to this many bytes per second, at least 1M, e.g. 100M")
    parser.add_argument("--journal-interval", type=_seconds_argument(0, 3600), default=DEFAULT_JOURNAL_INTERVAL,
                        metavar="SECONDS",
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
        write_json_atomically(args.manifest, manifest.to_dict(), private_dir=False)  # a file the user names
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
    parser = sub.add_parser("migrate", help="move the host's volumes to another array and switch the host over")
    parser.add_argument("device", metavar="DEVICE", nargs="*",
                        help="host device(s): /dev/mapper/NAME, /dev/dm-N, or /dev/sdX (relogin); several make a plan")
    parser.add_argument("--plan", metavar="FILE", help="a JSON or TOML plan of several volumes (see README)")
    parser.add_argument("--from-target", metavar="IQN",
                        help="every volume the host uses from this source target (a plan)")
    parser.add_argument("--parallel", type=int, metavar="N",
                        help="a plan's volumes copied and verified at once (default 2, or the plan file's)")
    # Options default to None here, so that only those given override a plan file's defaults.
    parser.add_argument("--to-target", metavar="IQN", help="destination array's iSCSI target (required)")
    parser.add_argument("--to-portal", metavar="IP:PORT", help="destination array's portal (required)")
    backing = parser.add_mutually_exclusive_group()
    backing.add_argument("--backing-dir", metavar="DIR", help="file-backed destination in DIR (default: the source's)")
    backing.add_argument("--backing-device", metavar="DEV", help="destination on this block device (exact size)")
    parser.add_argument("--backstore", choices=("handler", "kernel"),
                        help="what serves the destination during the copy: blockmig's handler (default), whose "
                             "guard executes the migrator's writes only at the reserved address, or the kernel's "
                             "fileio/iblock from the start; after the copy it is the kernel's")
    parser.add_argument("--mode", choices=("online", "offline", "pass-through"),
                        help="online (or pass-through, the same): the host keeps writing; the destination joins "
                             "its multipath map first, passed through to the source until the copy converges, no "
                             "IO held at any path change, whatever is on the map (the default for a map); "
                             "offline: a fence for the whole copy (the default for a bare disk, and where "
                             "--fence or --switch relogin is given)")
    parser.add_argument("--max-hold", type=_seconds_argument(0, 60, low_included=False), metavar="SECONDS",
                        help="online: commit once the last dirty chunks are estimated to copy in this long; they "
                             "are copied one at a time, and a host write to the one being copied waits for it "
                             "(default 1)")
    parser.add_argument("--fence", choices=("writeprotect", "suspend", "none"),
                        help="offline: keep the source unchanged during the copy: write-protect the host's mapping "
                             "(default), hold host IO on the map, or none (only if the host is quiesced)")
    parser.add_argument("--switch", choices=("multipath", "relogin", "together"),
                        help="move the host by a multipath path switch (default) or iSCSI logout/login; "
                             "together: a plan's maps switched as one consistency group")
    parser.add_argument("--switch-timeout", type=_seconds_argument(1, 600), metavar="SECONDS",
                        help="offline: if the destination path is not in the map this long after the hold began, "
                             "put the source path back and stop (default 10)")
    parser.add_argument("--worm", action="store_true", default=None,
                        help="write-protect the destination for the host afterwards")
    parser.add_argument("--chunk-size", type=chunk_size_argument,
                        help="chunk length, a multiple of 4K and of the volume's block size, up to 256M (default 4M)")
    parser.add_argument("--max-rate", type=max_rate_argument,
                        help="throttle the copy to this many bytes per second (at least 1M)")
    parser.add_argument("--min-rate", type=max_rate_argument,
                        help="online: while the host's IO is slowed by the copy, the array holds the copy back, "
                             "down to this many bytes per second (at least 1M; default 1M)")
    parser.add_argument("--id", dest="migration_id", type=id_argument,
                        help="migration (or plan) id: letters, digits, '.', '_', '-', at most 41 (default: time and WWID)")
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout, then the report")
    _add_no_syslog(parser)
    parser.set_defaults(func=_cmd_migrate)


MIGRATE_OPTIONS = ("to_target", "to_portal", "backing_dir", "backing_device", "fence", "switch", "switch_timeout",
                   "chunk_size", "max_rate", "min_rate", "worm", "mode", "max_hold", "backstore")


def _cmd_migrate(args) -> int:
    from blockmig.errors import UsageError
    from blockmig.migration import MigrationRequest, plan_migration, run_migration

    given = {key: getattr(args, key) for key in MIGRATE_OPTIONS if getattr(args, key) is not None}
    if args.plan or args.from_target or len(args.device) > 1:
        return _migrate_plan(args, given)
    if not args.device:
        raise UsageError("name the DEVICE to move, several, --from-target IQN, or --plan FILE")
    if given.get("switch") == "together":
        raise UsageError("--switch together groups several volumes; one volume switches alone (use multipath)")
    if args.parallel is not None:
        raise UsageError("--parallel is for several volumes (a plan)")
    for required in ("to_target", "to_portal"):
        if required not in given:
            raise UsageError(f"--{required.replace('_', '-')} is required")
    journal = plan_migration(MigrationRequest(device=args.device[0], migration_id=args.migration_id, **given))
    with _MigrationRenderer(args.json) as render:
        render({"event": "planned", "id": journal.id, "journal": journal.path})
        report = run_migration(journal.id, render)
    _print_report(report, args.json)
    return 0


def _migrate_plan(args, given: dict) -> int:
    from blockmig import plan
    from blockmig.errors import UsageError

    if args.parallel is not None and args.parallel < 1:
        raise UsageError(f"--parallel must be at least 1, not {args.parallel}")
    if args.plan:
        if args.device or args.from_target:
            raise UsageError("--plan FILE names the volumes: give no DEVICE and no --from-target with it")
        spec = plan.load_plan_file(args.plan, given)
        spec.plan_id = args.migration_id or spec.plan_id
    else:
        devices = list(args.device)
        if args.from_target:
            devices += plan.devices_of_target(args.from_target, include_bare_disks=given.get("switch") == "relogin")
        entries = [(f"volume {n + 1} ({device})", device, None, {}) for n, device in enumerate(devices)]
        spec = plan.build_plan(entries, given, args.migration_id, plan.DEFAULT_PARALLEL)
    if args.parallel is not None:
        spec.parallel = args.parallel
    journal = plan.plan_volumes(spec)
    with _PlanRenderer(args.json) as render:
        render({"event": "planned", "id": journal.id, "members": journal.members, "journal": journal.path})
        report = plan.run_plan(journal.id, render)
    return _print_plan_report(report, args.json)


def _print_plan_report(report: dict, as_json: bool) -> int:
    """One line per volume and a total; exit 1 if any volume did not finish."""
    if as_json:
        print(json.dumps({"event": "plan_report", **report}), flush=True)
    else:
        print(f"plan {report['plan']} (switch {report['policy']}, parallel {report['parallel']}):")
        for volume in report["volumes"]:
            held = volume["io_held_seconds"]
            print(f"  {volume['map']:<16} {volume['outcome']:<8} {volume['size']} bytes, copy "
                  f"{'-' if volume['copy_seconds'] is None else volume['copy_seconds']} s, IO held "
                  f"{'-' if held is None else f'{held * 1000:.0f} ms'}  ({volume['id']})"
                  + (f": {volume['error']}" if volume.get("error") else ""))
        print(f"  total {report['bytes']} bytes in {report['wall_seconds']} s, {report['mb_per_s']} MB/s; "
              f"{len(report['volumes']) - report['failed']} of {len(report['volumes'])} volumes done")
    return 1 if report["failed"] else 0


def _add_resume(sub) -> None:
    parser = sub.add_parser("resume", help="finish a migration that stopped (crash, kill, error)")
    parser.add_argument("migration_id", metavar="ID", type=id_argument)
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout, then the report")
    _add_no_syslog(parser)
    parser.set_defaults(func=_cmd_resume)


def _cmd_resume(args) -> int:
    from blockmig import plan
    from blockmig.migration import resume_migration

    if plan.is_plan(args.migration_id):
        with _PlanRenderer(args.json) as render:
            report = plan.run_plan(args.migration_id, render)
        return _print_plan_report(report, args.json)

    with _MigrationRenderer(args.json) as render:
        report = resume_migration(args.migration_id, render)
    _print_report(report, args.json)
    return 0


def _add_rollback(sub) -> None:
    parser = sub.add_parser("rollback", help="before the switch: back to the source, destination removed")
    parser.add_argument("migration_id", metavar="ID", type=id_argument)
    parser.add_argument("--json", action="store_true", help="print the final state as JSON")
    _add_no_syslog(parser)
    parser.set_defaults(func=_cmd_rollback)


def _cmd_rollback(args) -> int:
    from blockmig import plan
    from blockmig.migration import rollback_migration

    if plan.is_plan(args.migration_id):
        with _PlanRenderer(args.json) as render:
            result = plan.rollback_plan(args.migration_id, render)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"plan {result['id']}: rolled back {', '.join(result['rolled_back']) or 'none'}; "
                  f"left on the destination (already switched): {', '.join(result['on_destination']) or 'none'}"
                  + "".join(f"; {member} failed: {error}" for member, error in result["failed"].items()))
        return 1 if result["failed"] else 0

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
    parser.add_argument("migration_id", metavar="ID", nargs="?", type=id_argument)
    parser.add_argument("--json", action="store_true", help="machine-readable")
    parser.set_defaults(func=_cmd_status)


def _cmd_status(args) -> int:
    from blockmig import plan
    from blockmig.migration import migration_status
    from blockmig.state import unreadable_journals

    if args.migration_id and plan.is_plan(args.migration_id):
        _print_plan_status(plan.plan_status(args.migration_id), args.json)
        return 0
    plans = [] if args.migration_id else plan.list_plans()
    summaries = migration_status(args.migration_id)
    unreadable = [] if args.migration_id else [
        {"kind": damaged.kind, "id": damaged.name, "path": damaged.path, "error": damaged.reason}
        for damaged in unreadable_journals()]
    if args.json:
        print(json.dumps(summaries[0] if args.migration_id else
                         {"plans": plans, "migrations": summaries, "unreadable": unreadable}, indent=2))
        return 0
    for found in plans:
        print(f"plan {found['id']}: {found['state']}, switch {found['policy']}, members {', '.join(found['members'])}")
    for damaged in unreadable:  # listed, never in the way of the others
        print(f"{damaged['kind']} {damaged['id']}: unreadable ({damaged['error']})")
    if not summaries and not unreadable:
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
        if summary.get("online", {}) and summary["online"].get("mechanism") == "pass-through":
            state = summary["online"]
            print(f"  pass-through: {len(state['passes'])} delta passes, "
                  + ", ".join(_interval_text(i) for i in state["intervals"]))
        for name, step in summary["steps"].items():
            print(f"  {name:<18} {step.get('state', '?'):<8} {step.get('done') or step.get('started') or ''}")
    return 0


def _print_plan_status(status: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    print(f"plan {status['id']}: {status['state']}, switch {status['policy']}, parallel {status['parallel']}")
    for member in status["members"]:
        print(f"  {member['id']}: {member['state']}"
              + (f" in {member['current_step']}" if member.get("current_step") and member["state"] != "done" else "")
              + (f", {member.get('map')}, {member.get('copied')} of {member.get('size')} bytes copied"
                 if "size" in member else "")
              + (f" ({member['error']})" if member.get("error") and member["state"] == "failed" else ""))


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
    if report.get("online") and report["online"].get("mechanism") == "pass-through":
        state = report["online"]
        print(f"  pass-through: {len(state['passes'])} delta passes; host IO slowed or held: "
              + ", ".join(_interval_text(i) for i in state["intervals"]))


def _interval_text(interval: dict) -> str:
    """'commit 1.8 s (one chunk's writes held 0.12 s at most)': a pass-through interval for status and report."""
    text = f"{interval['phase']} {interval['seconds']} s"
    if interval.get("yielded_seconds"):
        return text + f" (its writes yielded {interval['yielded_seconds']:.1f} s to the host's IO)"
    if interval.get("longest_hold") is not None:
        return text + f" (one chunk's writes held {interval['longest_hold']:.3f} s at most)"
    return text + (" (writes to the last chunks held)" if interval.get("held") else "")


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
        else:
            self._print_line(event)

    @staticmethod
    def _print_line(event: dict) -> None:
        """A step, the hold's length, or a notable event; prefixed by the volume when a plan runs several."""
        who = f"{event['host_volume']}: " if "host_volume" in event else ""
        if event["event"] == "step":
            print(f"blockmig: {who}{event['step']}: {event['state']}", file=sys.stderr, flush=True)
        elif event["event"] == "io_resumed" and event.get("io_held_seconds") is not None:
            print(f"blockmig: {who}host IO held {event['io_held_seconds'] * 1000:.0f} ms", file=sys.stderr, flush=True)
        elif event["event"] in ("copy_retry", "rollback", "planned", "switch_revert", "member_failed", "delta"):
            details = ", ".join(f"{k} {v}" for k, v in event.items() if k not in ("event", "host_volume"))
            print(f"blockmig: {who}{event['event'].replace('_', ' ')}: {details}", file=sys.stderr, flush=True)

    def __enter__(self) -> "_MigrationRenderer":
        return self

    def __exit__(self, *exc_info) -> None:
        self._bars.close()


class _PlanRenderer(_MigrationRenderer):
    """Several volumes at once: on a terminal a bar per volume and a total bar (bytes copied of all volumes,
    rate, ETA); step lines prefixed by the volume; with --json every event, each with its migration id."""

    def __init__(self, as_json: bool):
        super().__init__(as_json)
        self._member_bars: dict[str, _ProgressRenderer] = {}
        self._copied: dict[str, int] = {}
        self._total = None

    def __call__(self, event: dict) -> None:
        if self._as_json:
            print(json.dumps(event), flush=True)
            return
        kind = event["event"]
        if kind == "plan" and sys.stderr.isatty():
            from tqdm import tqdm

            for position, member in enumerate(event["members"]):
                self._member_bars[member["id"]] = _ProgressRenderer(False, position, member["host_volume"])
            self._total = tqdm(total=sum(m["size"] for m in event["members"]), unit="B", unit_scale=True,
                               unit_divisor=1024, desc="all volumes", position=len(event["members"]), file=sys.stderr)
        elif kind in ("start", "chunk", "verify_start", "verified_chunk", "done", "verify_done"):
            bar = self._member_bars.get(event.get("id"))
            if bar is not None:
                bar.close() if kind in ("done", "verify_done") else bar(event)
            if self._total is not None and kind in ("start", "chunk") and event.get("phase") == "copy":
                done = event.get("reserved_address", event.get("resume_from", 0))
                self._total.update(done - self._copied.get(event["id"], 0))
                self._copied[event["id"]] = done
        else:
            self._print_line(event)

    def __exit__(self, *exc_info) -> None:
        for bar in self._member_bars.values():
            bar.close()
        if self._total is not None:
            self._total.close()


class _ProgressRenderer:
    """Turns engine events into a tqdm bar on a terminal, or JSON lines with --json."""

    def __init__(self, as_json: bool, position: int | None = None, label: str = ""):
        self._as_json = as_json
        self._bar = None
        self._position = position
        self._label = label

    def __call__(self, event: dict) -> None:
        if self._as_json:
            print(json.dumps(event), flush=True)
            return
        if not sys.stderr.isatty():
            return
        kind = event["event"]
        if kind in ("start", "verify_start"):
            from tqdm import tqdm

            phase = event.get("phase") or ("copy" if kind == "start" else "verify")
            self._bar = tqdm(total=event["size"], initial=event.get("resume_from", 0), unit="B", unit_scale=True,
                             unit_divisor=1024, desc=f"{self._label} {phase}".strip(), file=sys.stderr,
                             position=self._position, leave=self._position is None)
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


def _add_no_syslog(parser) -> None:
    parser.add_argument("--no-syslog", action="store_true",
                        help="write no audit records to the system log (default: tagged blockmig, if /dev/log exists)")


def _add_report(sub) -> None:
    parser = sub.add_parser("report", help="a migration's or a plan's report; --plot draws its timeline")
    parser.add_argument("migration_id", metavar="ID", help="a migration or a plan")
    parser.add_argument("--plot", metavar="FILE", help="draw the timeline to FILE.svg or FILE.png (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="the report and the recorded events as JSON")
    parser.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    """The report as `migrate` ends with (a plan's, or `status` while not done); the picture on request."""
    from blockmig import plan, report, timeline
    from blockmig.state import MigrationJournal

    if args.plot and not args.plot.lower().endswith(report.PLOT_SUFFIXES):
        from blockmig.errors import UsageError

        raise UsageError(f"--plot {args.plot}: the file name must end in .svg or .png")
    if args.plot:
        report.require_matplotlib()
    picture = report.load(args.migration_id)  # refuses an unknown id before anything is drawn
    is_plan = plan.is_plan(args.migration_id)
    if args.json:
        members = [MigrationJournal.load(row.migration_id) for row in picture.rows]
        print(json.dumps({"id": args.migration_id, "kind": "plan" if is_plan else "migration",
                          "migrations": [{"status": journal.summary(),
                                          "events": timeline.load_records(journal.directory)}
                                         for journal in members]}))
    elif is_plan:
        found = plan.PlanJournal.load(args.migration_id)
        if found.data.get("report"):
            _print_plan_report(found.data["report"], False)
        else:
            _print_plan_status(plan.plan_status(args.migration_id), False)
    else:
        journal = MigrationJournal.load(args.migration_id)
        if journal.data["state"] == "done":
            _print_report(journal.data["report"], False)
        else:
            _cmd_status(argparse.Namespace(migration_id=args.migration_id, json=False))
    if args.plot:
        report.draw(picture, args.plot)
        print(f"picture: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


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


def _add_array(sub) -> None:
    parser = sub.add_parser("array", help="array-side commands: serve a volume with blockmig's own backstore")
    actions = parser.add_subparsers(dest="array_action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="serve one volume (TCMU) until SIGTERM or SIGINT")
    serve.add_argument("--name", required=True, help="storage object name")
    backing = serve.add_mutually_exclusive_group(required=True)
    backing.add_argument("--backing-file", help="backing file (created sparse if missing; needs --size)")
    backing.add_argument("--backing-device", help="backing block device (its whole size)")
    serve.add_argument("--size", type=parse_size, help="volume size with --backing-file, e.g. 64M")
    serve.add_argument("--serial", help="VPD unit serial (hex digits make the NAA/WWID); random if omitted")
    serve.add_argument("--migrator-serial", help="NAME-migrator's own serial (default: NAME's)")
    serve.add_argument("--geometry-from", metavar="VOLUME",
                       help="present this LIO volume's geometry and identity")
    serve.add_argument("--geometry", metavar="JSON",
                       help="present this geometry (lio.volume_geometry's keys; what `blockmig migrate` passes)")
    serve.add_argument("--guard-initiator", metavar="IQN",
                       help="also serve NAME-migrator for this initiator only, guarded; NAME refuses writes")
    serve.add_argument("--pass-through-source", metavar="DEV",
                       help="until the commit, NAME reads from and writes to this device (the source volume "
                            "over the array's own session to the source array), the destination kept current; "
                            "needs --guard-initiator and --chunk-size")
    serve.add_argument("--chunk-size", type=parse_size, help="the migration's chunk (the pass-through's dirty map)")
    serve.add_argument("--min-rate", type=max_rate_argument,
                       help="with --pass-through-source: the copy's floor while its writes yield to the host's "
                            "(default 1M per second)")
    serve.add_argument("--state-dir",
                       help="where the guard's state file lives (default /var/lib/blockmig/backstore)")
    serve.add_argument("--run-dir", help="where the control socket lives (default /run/blockmig)")
    parser.set_defaults(func=_cmd_array)


def _cmd_array(args) -> int:
    from blockmig.array.tcmu import service
    from blockmig.errors import UsageError

    if args.backing_file and not args.size:
        raise UsageError("--backing-file needs --size")
    if args.backing_device and args.size:
        raise UsageError("--size is only for --backing-file: a device serves its whole size")
    if bool(args.pass_through_source) != bool(args.chunk_size):
        raise UsageError("--pass-through-source and --chunk-size go together")
    if args.min_rate and not args.pass_through_source:
        raise UsageError("--min-rate paces a copy under the host's passed-through IO: it needs --pass-through-source")
    if args.pass_through_source and not args.guard_initiator:
        raise UsageError("--pass-through-source needs --guard-initiator (the migrator's view the copy writes)")
    if args.migrator_serial and not args.guard_initiator:
        raise UsageError("--migrator-serial is for the migrator's view: it needs --guard-initiator")
    for serial in (args.serial, args.migrator_serial):
        if serial:
            from blockmig.array.lio import check_serial
            from blockmig.errors import ArrayError

            try:
                check_serial(serial)
            except ArrayError as exc:
                raise UsageError(str(exc)) from None
    geometry = {}
    if args.geometry_from and args.geometry:
        raise UsageError("give --geometry-from or --geometry, not both")
    if args.geometry_from:
        from blockmig.array.lio import volume_geometry

        geometry = volume_geometry(args.geometry_from)
    elif args.geometry:
        geometry = _geometry_argument(args.geometry)
    if args.backing_file:
        service.prepare_backing_file(args.backing_file, args.size)
    request = service.ServeRequest(
        name=args.name, backing=args.backing_file or args.backing_device, size=args.size, serial=args.serial,
        migrator_serial=args.migrator_serial,
        geometry=geometry, guard_initiator=args.guard_initiator,
        source=args.pass_through_source, chunk_size=args.chunk_size or 0,
        **({"min_rate": args.min_rate} if args.min_rate else {}),
        state_dir=args.state_dir or service.STATE_DIR, run_dir=args.run_dir or service.RUN_DIR,
    )
    server = service.VolumeServer(request)
    try:
        views = server.start()
    except BaseException:
        server.stop()  # remove what the failed start made
        raise
    try:
        print("; ".join(f"serving {role} view as storage object {so} on {uio}" for role, so, uio in views),
              flush=True)
        server.run()
    except BaseException:
        server.stop(remove=False)  # a handler bug: keep the objects and the ring for a restart
        raise
    server.stop()
    return 0


def _geometry_argument(text: str) -> dict[str, str]:
    from blockmig.errors import UsageError

    try:
        geometry = json.loads(text)
    except ValueError:
        geometry = None
    if not isinstance(geometry, dict) or not all(isinstance(k, str) and isinstance(v, (str, int))
                                                  for k, v in geometry.items()):
        raise UsageError(f"--geometry must be a JSON object of names to values, not {text[:60]!r}")
    return {key: str(value) for key, value in geometry.items()}


def main(argv: list[str] | None = None) -> int:
    from blockmig import signals

    signals.install(_tell_admin)
    return run(build_parser().parse_args(argv))


def _tell_admin(text: str) -> None:
    """From a signal handler: os.write, as a print could land inside another print to stderr (reentrant)."""
    os.write(sys.stderr.fileno(), f"blockmig: {text}\n".encode())


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments; turn a BlockmigError into one line on stderr and its exit code."""
    if getattr(args, "no_syslog", False):
        from blockmig import timeline

        timeline.set_syslog(False)
    from blockmig import signals

    try:
        return args.func(args) or 0
    except BlockmigError as exc:
        message, code = str(exc), exc.exit_code
        signum = signals.received()
        if signum is not None:  # whatever error the stop ended in, the exit says which signal asked for it
            name = signal.Signals(signum).name
            code = 128 + signum
            # One shape for scripts and admins: "interrupted by SIGTERM: <where it stopped, how to go on>".
            message = message.replace(f"interrupted by {name}: ", "").replace(f"interrupted by {name}", "")
            message = f"interrupted by {name}: " + (message or "the journals say where to resume (blockmig status)")
        print(f"blockmig: error: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("blockmig: interrupted; the journal allows resume or rollback", file=sys.stderr)
        return 130
