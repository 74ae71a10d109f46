"""Many volumes in one migration: the plan file, planning all or nothing, and the runner.

A plan is a list of ordinary migrations (each with its own journal, guard and
VolumeLock, so `status/resume/rollback MEMBER_ID` work per volume) plus a plan
journal, <state root>/../plans/<PLAN_ID>/plan.json, that `status/resume/rollback
PLAN_ID` work from. Members' copies and verifies run in threads of this process,
up to `parallel` at once; their control-plane steps take the orchestrator's CONTROL_PLANE.

Switch policies: "each" (default) switches every volume as soon as it is
verified; "together" (a consistency group, `--switch together`) runs every member
up to verify, then switches all of them in one hold (migration.switch_members), then
finishes each. A group needs multipath maps (a path switch) and two volumes at least.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from blockmig import signals, timeline
from blockmig.array import lio
from blockmig.datapath.digest import MAX_MANIFEST_BYTES
from blockmig.errors import BlockmigError, JournalError, MigrationError, UsageError
from blockmig.faults import checkpoint
from blockmig.host import iscsi, multipath
from blockmig.host.devices import map_disks, resolve_host_device
from blockmig.ids import check_id
from blockmig.migration import (
    FENCES,
    SWITCHES,
    EventHandler,
    MigrationRequest,
    plan_migration,
    release_fence,
    rollback_migration,
    run_until,
    switch_members,
)
from blockmig.orchestrator.host_switch import SwitchFacts
from blockmig.orchestrator.online import MODES, PASS_THROUGH
from blockmig.orchestrator.served_destination import BACKSTORES
from blockmig.safefile import read_bounded
from blockmig.sizes import parse_chunk_size, parse_max_rate
from blockmig.state import MigrationJournal, PlanJournal, VolumeLock, migration_exists

MAX_PLAN_FILE_BYTES = 1 << 20  # a plan of thousands of volumes is a few hundred KiB
POLICIES = ("each", "together")
DEFAULT_PARALLEL = 2
# What a plan's `defaults` and each volume may set, and the MigrationRequest field it fills.
VOLUME_OPTIONS = (
    "to_target",
    "to_portal",
    "backing_dir",
    "backing_device",
    "fence",
    "switch",
    "switch_timeout",
    "chunk_size",
    "max_rate",
    "min_rate",
    "worm",
    "mode",
    "max_hold",
    "backstore",
)
PLAN_KEYS = ("id", "parallel", "defaults", "volumes")


@dataclass
class PlanSpec:
    """A checked plan, nothing planned yet: one MigrationRequest per volume."""

    requests: list[MigrationRequest]
    plan_id: str | None = None
    parallel: int = DEFAULT_PARALLEL
    policy: str = "each"
    labels: list[str] = field(default_factory=list)  # how errors name each volume


# ---------------------------------------------------------------------------
# the plan file


def load_plan_file(path: str, overrides: dict | None = None) -> PlanSpec:
    """Read and check a JSON or TOML plan; `overrides` (options given on the command line) beat its
    defaults."""
    try:
        raw = read_bounded(path, MAX_PLAN_FILE_BYTES, "plan", follow_links=True)
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: cannot read the plan: {exc.strerror}") from None
    except JournalError as exc:  # not a regular file, too large, unreadable
        raise UsageError(str(exc)) from None
    kind = "TOML" if path.endswith(".toml") else "JSON"
    try:
        if kind == "TOML":
            document = tomllib.loads(raw.decode("utf-8"))
        else:
            document = json.loads(raw)
    except RecursionError:
        raise UsageError(f"{path}: not a plan: {kind} nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise UsageError(f"{path}: not valid {kind}: {exc}") from None
    return plan_from_document(document, path, overrides)


def plan_from_document(document, where: str, overrides: dict | None = None) -> PlanSpec:
    if not isinstance(document, dict):
        raise UsageError(f"{where}: a plan is a table with 'volumes' (and 'defaults', 'parallel', 'id')")
    _refuse_unknown_keys(document, PLAN_KEYS, where)
    plan_id = document.get("id")
    if plan_id is not None:
        check_id(plan_id, f"{where}: id")
    parallel = document.get("parallel", DEFAULT_PARALLEL)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise UsageError(f"{where}: parallel: must be a whole number of at least 1, not {parallel!r}")
    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UsageError(f"{where}: defaults: must be a table of options")
    _refuse_unknown_keys(defaults, VOLUME_OPTIONS, f"{where}: defaults")
    defaults = {**_checked_options(defaults, f"{where}: defaults"), **(overrides or {})}
    volumes = document.get("volumes")
    if not isinstance(volumes, list) or not volumes:
        raise UsageError(f"{where}: volumes: a list of at least one volume with a 'device' is required")
    entries = []
    for index, volume in enumerate(volumes):
        label = f"{where}: volume {index + 1}"
        if not isinstance(volume, dict):
            raise UsageError(f"{label}: must be a table with a 'device'")
        if isinstance(volume.get("device"), str):
            if _bad_text(volume["device"]):
                raise UsageError(f"{label}: device: {_bad_text(volume['device'])}")
            label += f" ({volume['device']})"
        _refuse_unknown_keys(volume, ("device", "id") + VOLUME_OPTIONS, label)
        if not isinstance(volume.get("device"), str) or not volume["device"]:
            raise UsageError(f"{label}: device: required, the host's device (e.g. /dev/mapper/mpatha)")
        if "id" in volume:
            check_id(volume["id"], f"{label}: id")
        entries.append(
            (
                label,
                volume["device"],
                volume.get("id"),
                _checked_options({k: v for k, v in volume.items() if k not in ("device", "id")}, label),
            )
        )
    return build_plan(entries, defaults, plan_id, parallel)


def build_plan(
    entries: list[tuple[str, str, str | None, dict]], defaults: dict, plan_id: str | None, parallel: int
) -> PlanSpec:
    """Requests from (label, device, id, options) per volume over the plan's defaults; checks what spans
    volumes."""
    policy = "together" if defaults.get("switch") == "together" else "each"
    if policy == "together" and len(entries) < 2:
        raise UsageError(
            f"{entries[0][0]}: switch: 'together' groups several volumes; one volume switches alone "
            "(use multipath)"
        )
    seen: dict[str, str] = {}
    requests = []
    for label, device, migration_id, options in entries:
        merged = dict(defaults)
        if (
            "backing_dir" in options or "backing_device" in options
        ):  # the volume's own choice replaces the default's
            merged.pop("backing_dir", None)
            merged.pop("backing_device", None)
        merged.update(options)
        if policy == "together":
            if merged.get("switch", "together") not in ("together", "multipath"):
                raise UsageError(
                    f"{label}: switch: {merged['switch']!r} in a plan that switches together "
                    "(a group switch moves multipath paths)"
                )
            merged["switch"] = "multipath"
        elif merged.get("switch") == "together":
            raise UsageError(f"{label}: switch: 'together' is a plan's policy: set it in the plan's defaults")
        for required in ("to_target", "to_portal"):
            if not merged.get(required):
                raise UsageError(
                    f"{label}: {required}: required (in the volume, the plan's defaults, "
                    f"or --{required.replace('_', '-')})"
                )
        if merged.get("backing_dir") and merged.get("backing_device"):
            raise UsageError(f"{label}: backing_dir and backing_device: give one, not both")
        real = os.path.realpath(device)
        if real in seen:
            raise UsageError(f"{label}: device: {device} is named twice (also as {seen[real]})")
        seen[real] = device
        requests.append(MigrationRequest(device=device, migration_id=migration_id, **merged))
    return PlanSpec(requests, plan_id, parallel, policy, [entry[0] for entry in entries])


def _refuse_unknown_keys(table: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: {unknown[0]}: unknown key (known: {', '.join(allowed)})")


def _bad_text(value: str) -> str | None:
    """What is wrong with a path or name from a plan file, if anything: a NUL would be a traceback in os
    calls,
    a newline would break the one-line error that names it."""
    if any(ord(character) < 0x20 or character == "\x7f" for character in value):
        return "contains a control character (NUL, newline, ...)"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8 text (a lone surrogate)"
    if len(value) > 4096:
        return f"{len(value)} characters long (at most 4096)"
    return None


def _checked_options(options: dict, where: str) -> dict:
    """Each option's type and value; sizes in bytes."""
    checked = {}
    for key, value in options.items():
        problem = None
        if key in ("to_target", "backing_dir", "backing_device"):
            if not isinstance(value, str) or not value:
                problem = "must be a non-empty string"
            else:
                problem = _bad_text(value)
        elif key == "to_portal":
            try:
                if not isinstance(value, str) or ":" not in value:
                    raise MigrationError(value)
                iscsi.parse_portal(value)
            except MigrationError:
                problem = f"{value!r} is not IP:PORT"
        elif key == "fence" and value not in FENCES:
            problem = f"{value!r}: must be one of {', '.join(FENCES)}"
        elif key == "switch" and value not in SWITCHES + ("together",):
            problem = f"{value!r}: must be one of {', '.join(SWITCHES + ('together',))}"
        elif key == "switch_timeout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 600:
                problem = f"{value!r}: must be a number of seconds between 1 and 600"
            else:
                value = float(value)
        elif key in ("chunk_size", "max_rate", "min_rate"):
            try:
                value = parse_chunk_size(value) if key == "chunk_size" else parse_max_rate(value)
            except ValueError as exc:
                problem = str(exc)
        elif key == "backstore" and value not in BACKSTORES:
            problem = f"{value!r}: must be one of {', '.join(BACKSTORES)}"
        elif key == "mode" and value not in MODES:
            problem = f"{value!r}: must be one of {', '.join(MODES)}"
        elif key == "max_hold":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                problem = f"{value!r}: must be a positive number of seconds"
            else:
                value = float(value)
        elif key == "worm" and not isinstance(value, bool):
            problem = f"{value!r}: must be true or false"
        if problem:
            raise UsageError(f"{where}: {key}: {problem}")
        checked[key] = value
    return checked


# ---------------------------------------------------------------------------
# the host's volumes of one source target


def devices_of_target(target_iqn: str, include_bare_disks: bool) -> list[str]:
    """Every volume the host uses from `target_iqn`: maps with a path on a host session to it, and (for a
    relogin switch) its disks that no map holds. The migrator's own sessions (iface blockmig-*) do not
    count."""
    disks = set()
    for session in iscsi.sessions():
        if session.target_iqn == target_iqn and not session.iface.startswith("blockmig-"):
            disks.update(iscsi.session_disks(session).values())
    devices, in_maps = [], set()
    for found in multipath.maps():
        members = set(map_disks(found.name))
        in_maps |= members
        if members & disks:
            devices.append(f"/dev/mapper/{found.name}")
    if include_bare_disks:
        devices += [f"/dev/{disk}" for disk in sorted(disks - in_maps)]
    if not devices:
        raise UsageError(f"--from-target {target_iqn}: the host uses no volume of that target")
    return devices


# ---------------------------------------------------------------------------
# planning: all or nothing


def plan_volumes(spec: PlanSpec) -> PlanJournal:
    """Plan every volume (nothing changes on arrays or host) and write the plan journal; one refusal plans
    none."""
    plan_id = check_id(spec.plan_id or f"plan-{time.strftime('%Y%m%d-%H%M%S')}", "plan id")
    if PlanJournal.exists(plan_id) or migration_exists(plan_id):
        raise UsageError(f"plan id {plan_id} is taken (by a plan or a migration): choose another with --id")
    requests = [
        replace(request, migration_id=request.migration_id or f"{plan_id}-{number + 1}")
        for number, request in enumerate(spec.requests)
    ]
    for label, request in zip(spec.labels, requests):
        if request.migration_id == plan_id or PlanJournal.exists(request.migration_id):
            raise UsageError(f"{label}: id: {request.migration_id} is a plan's id")
    _refuse_one_volume_twice(spec.labels, requests)
    journals: list[MigrationJournal] = []
    try:
        for label, request in zip(spec.labels, requests):
            try:
                journals.append(plan_migration(request))
            except BlockmigError as exc:
                raise type(exc)(f"{label}: {exc}") from None
        _check_room_for_all(spec.labels, journals)
        for journal in journals:
            journal.data["plan"] = plan_id
            if spec.policy == "together":
                journal.data["switch_group"] = plan_id
            journal.save()
        return PlanJournal.create(
            plan_id,
            members=[j.id for j in journals],
            policy=spec.policy,
            parallel=spec.parallel,
            state="planned",
        )
    except BaseException:
        for journal in journals:
            shutil.rmtree(journal.directory, ignore_errors=True)
        raise


def _refuse_one_volume_twice(labels: list[str], requests: list[MigrationRequest]) -> None:
    """Two names of one volume (a map and one of its disks, say) would be migrated twice."""
    seen: dict[str, str] = {}
    for label, request in zip(labels, requests):
        try:
            wwid = resolve_host_device(request.device).wwid
        except BlockmigError as exc:
            raise type(exc)(f"{label}: {exc}") from None
        if wwid in seen:
            raise UsageError(
                f"{label}: device: {request.device} is the same volume as {seen[wwid]} (WWID {wwid})"
            )
        seen[wwid] = request.device


def _check_room_for_all(labels: list[str], journals: list[MigrationJournal]) -> None:
    """Each member checked its own room; members sharing a backing directory need room for all of them."""
    wanted: dict[str, int] = {}
    for journal in journals:
        if journal.data["destination"]["backing_created"]:
            directory = os.path.dirname(journal.data["destination"]["backing"])
            wanted[directory] = wanted.get(directory, 0) + journal.data["source"]["size"]
    for directory, size in wanted.items():
        try:
            lio.check_free_space(directory, size)
        except BlockmigError as exc:
            raise type(exc)(f"{labels[-1]}: the plan's volumes together: {exc}") from None


# ---------------------------------------------------------------------------
# running, resuming, rolling back


def run_plan(plan_id: str, on_event: EventHandler | None = None, after_chunk=None) -> dict:
    """Run (or resume) every member not done, `parallel` at once; return the plan's report.

    A member that fails does not stop the others; its outcome says why.
    """
    plan = PlanJournal.load(plan_id)
    began = time.monotonic()
    journals = [MigrationJournal.load(member) for member in plan.members]
    with timeline.recording_plan(journals, on_event) as recorded:
        return _run_plan(plan, journals, _serialised(recorded), after_chunk, began)


def _run_plan(plan: PlanJournal, journals: list[MigrationJournal], emit: EventHandler, after_chunk,
              began: float) -> dict:
    plan_id = plan.id
    if any(journal.data["state"] == "rolled_back" for journal in journals):
        raise MigrationError(f"plan {plan_id} was rolled back; start a new one")
    together = plan.data["policy"] == "together"
    emit(
        {
            "event": "plan",
            "id": plan_id,
            "policy": plan.data["policy"],
            "parallel": plan.data["parallel"],
            "members": [
                {
                    "id": j.id,
                    "host_volume": j.data["source"].get("map") or j.data["source"]["device"],
                    "size": j.data["source"]["size"],
                }
                for j in journals
            ],
        }
    )
    outcomes: dict[str, dict] = {}
    with contextlib.ExitStack() as locks:
        for journal in journals:
            locks.enter_context(VolumeLock(journal.data["source"]["wwid"], journal.id))
        plan.data["state"] = "running"
        plan.save()
        locks.push(_stopped_on_error(plan))  # before the locks are released

        def run_member(journal: MigrationJournal, until: str | None) -> None:
            if outcomes.get(journal.id, {}).get("outcome") == "failed":
                return
            member_emit = _tagged(emit, journal)
            try:
                run_until(journal, _member_step(journal, until), member_emit, after_chunk)
                outcomes[journal.id] = {"outcome": "done" if journal.data["state"] == "done" else "verified"}
            except BlockmigError as exc:
                outcomes[journal.id] = {"outcome": "failed", "error": str(exc)}
                member_emit({"event": "member_failed", "error": str(exc)})

        # Every destination first, one after another: each blacklists its migrator's WWID with a
        # `multipathd reconfigure`, which reloads (and so resumes) every map, and would break another
        # member's suspend fence if that member were already fenced.
        for journal in journals:
            run_member(journal, "fence")
        checkpoint("plan:destinations-created")
        # Threads cannot be interrupted: a signal asks each member to stop at its next safe point
        # (signals.check), and no volume lock is released (the ExitStack) while a member still runs.
        with signals.deferred("waiting for every member to stop at its next safe point; no volume lock is "
                              "released before", f"plan {plan_id} stopped, every member at a safe point "
                              f"(blockmig resume {plan_id} or blockmig rollback {plan_id})"):
            with ThreadPoolExecutor(max_workers=plan.data["parallel"], thread_name_prefix="member",
                                    initializer=signals.only_the_main_thread_receives) as pool:
                list(pool.map(lambda journal: run_member(journal, "switch" if together else None), journals))
            if together:
                _switch_and_finish_group(plan, journals, outcomes, emit, after_chunk)
    report = _plan_report(plan, journals, outcomes, time.monotonic() - began)
    plan.data["state"] = "done" if report["failed"] == 0 else "failed"
    plan.data.pop("error", None)
    plan.data["report"] = report
    plan.save()
    return report


# Where the plan's phases stop a member, in its own table: a pass-through move has no fence (its
# destination is made, the host not yet moved, before its join) and no switch (it leaves the source at
# its commit).
_PHASE_STEPS = {"fence": {PASS_THROUGH: "join"}, "switch": {PASS_THROUGH: "commit"}}


def _member_step(journal: MigrationJournal, phase: str | None) -> str | None:
    return _PHASE_STEPS[phase].get(journal.data.get("mode"), phase) if phase else None


def _passed_the_switch(journal: MigrationJournal) -> bool:
    """On the destination for good: switched (joined), or a pass-through committed."""
    if journal.data.get("mode") == PASS_THROUGH:
        return journal.is_done("commit")
    return journal.data["state"] == "done" or SwitchFacts.load(journal).destination_joined


def _stopped_on_error(plan: PlanJournal):
    """An exit callback: a plan left by a signal or an error no member caught is "stopped", not "running"."""
    def leave(exc_type, exc, tb) -> bool:
        if exc_type is not None:
            plan.data["state"] = "stopped"
            plan.data["error"] = str(exc) or exc_type.__name__
            plan.save()
        return False
    return leave


def _switch_and_finish_group(
    plan: PlanJournal, journals: list[MigrationJournal], outcomes: dict, emit, after_chunk
) -> None:
    waiting = [journal for journal in journals if not journal.is_done(_member_step(journal, "switch"))]
    if signals.stop_requested() or any(outcomes[journal.id]["outcome"] == "failed" for journal in journals):
        # The group cannot switch now: no member keeps the host's IO held (or writes refused) meanwhile.
        for journal in waiting:
            if outcomes[journal.id]["outcome"] == "failed":
                continue
            if journal.data.get("mode") == PASS_THROUGH:  # nothing held: the source stays current
                why = "a member failed, so the group did not commit; the host passes through to the source"
                outcomes[journal.id] = {"outcome": "waiting", "error": f"{why} (blockmig resume {plan.id})"}
                continue
            try:
                release_fence(journal, _tagged(emit, journal))
                why = "a member failed, so the group did not switch; fence lifted, copies again on resume"
            except BlockmigError as exc:
                why = f"a member failed, so the group did not switch; lifting the fence failed too: {exc}"
            outcomes[journal.id] = {"outcome": "waiting", "error": f"{why} (blockmig resume {plan.id})"}
        return
    held = [journal for journal in waiting if journal.data.get("mode") != PASS_THROUGH]
    if held:
        try:
            switch_members([(journal, _tagged(emit, journal)) for journal in held])
        except BlockmigError as exc:
            for journal in waiting:
                outcomes[journal.id] = {"outcome": "failed", "error": f"group switch: {exc}"}
            return
    for journal in waiting:  # pass-through members commit one right after the other, nothing held between
        if journal.data.get("mode") == PASS_THROUGH:
            try:
                run_until(journal, "hand_over", _tagged(emit, journal), after_chunk)
            except BlockmigError as exc:
                outcomes[journal.id] = {"outcome": "failed", "error": f"group commit: {exc}"}
    for journal in journals:
        try:
            run_until(journal, None, _tagged(emit, journal), after_chunk)
            outcomes[journal.id] = {"outcome": "done"}
        except BlockmigError as exc:
            outcomes[journal.id] = {"outcome": "failed", "error": str(exc)}


def rollback_plan(plan_id: str, on_event: EventHandler | None = None) -> dict:
    """Roll back every member not yet on the destination; those already switched stay there (and are
    listed)."""
    plan = PlanJournal.load(plan_id)
    emit = _serialised(on_event)
    result = {"id": plan_id, "rolled_back": [], "on_destination": [], "failed": {}}
    for member in plan.members:
        journal = MigrationJournal.load(member)
        if _passed_the_switch(journal):
            result["on_destination"].append(member)
            continue
        try:
            rollback_migration(member, _tagged(emit, journal))
            result["rolled_back"].append(member)
        except BlockmigError as exc:
            result["failed"][member] = str(exc)
    plan.data["state"] = (
        "rolled_back" if not result["failed"] and not result["on_destination"] else "partly_rolled_back"
    )
    plan.save()
    return result


def plan_status(plan_id: str) -> dict:
    """The plan and, per member, its state, step and bytes copied."""
    plan = PlanJournal.load(plan_id)
    members = []
    for member in plan.members:
        try:
            journal = MigrationJournal.load(member)
        except JournalError as exc:
            members.append({"id": member, "state": "missing", "error": str(exc)})
            continue
        members.append(
            {
                "id": member,
                "state": journal.data["state"],
                "current_step": journal.data.get("current_step"),
                "map": journal.data["source"].get("map") or journal.data["source"].get("device"),
                "size": journal.data["source"]["size"],
                "copied": _copied_bytes(journal),
                "error": journal.data.get("error"),
            }
        )
    return {
        key: plan.data.get(key) for key in ("id", "state", "policy", "parallel", "created", "updated")
    } | {"members": members}


def list_plans() -> list[dict]:
    return [
        {
            "id": plan.id,
            "state": plan.data.get("state"),
            "policy": plan.data["policy"],
            "members": plan.members,
        }
        for plan in PlanJournal.list_all()
    ]


def is_plan(identifier: str) -> bool:
    return PlanJournal.exists(identifier)


def _copied_bytes(journal: MigrationJournal) -> int:
    if journal.is_done("copy"):
        return journal.data["source"]["size"]
    try:
        return int(json.loads(read_bounded(journal.copy_journal_path, MAX_MANIFEST_BYTES, "copy journal"))
                   .get("reserved_address", 0))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError, JournalError):
        return 0  # status shows what it can; resume reads the copy journal with every check


def _plan_report(plan: PlanJournal, journals: list[MigrationJournal], outcomes: dict, wall: float) -> dict:
    volumes = []
    for journal in journals:
        report = journal.data.get("report") or {}
        copy, switch = journal.facts("copy"), journal.facts("switch")
        outcome = outcomes.get(
            journal.id, {"outcome": "done" if journal.data["state"] == "done" else "not run"}
        )
        volumes.append(
            {
                "id": journal.id,
                "map": journal.data["source"].get("map") or journal.data["source"]["device"],
                "size": journal.data["source"]["size"],
                "copy_seconds": copy.get("seconds"),
                "io_held_seconds": switch.get("io_held_seconds"),
                "report": report or None,
                **outcome,
            }
        )
    size = sum(volume["size"] for volume in volumes)
    return {
        "plan": plan.id,
        "policy": plan.data["policy"],
        "parallel": plan.data["parallel"],
        "volumes": volumes,
        "bytes": size,
        "wall_seconds": round(wall, 3),
        "mb_per_s": round(size / wall / 1e6, 1) if wall else None,
        "failed": sum(1 for volume in volumes if volume["outcome"] != "done"),
    }


def _serialised(on_event: EventHandler | None) -> EventHandler:
    """Members' threads emit at once: one event at a time reaches the display."""
    lock = threading.Lock()
    handler = on_event or (lambda event: None)

    def emit(event: dict) -> None:
        with lock:
            handler(event)

    return emit


def _tagged(emit: EventHandler, journal: MigrationJournal) -> EventHandler:
    volume = journal.data["source"].get("map") or journal.data["source"]["device"]
    return lambda event: emit({**event, "id": journal.id, "host_volume": volume})
