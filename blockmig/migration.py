"""The orchestrator: move a host's LUN to another LIO array and switch the host over.

A migration is a sequence of steps (state.STEPS); each is recorded in the
journal when it starts and when it is done, and each is written so that running
it again after a crash (kill -9) finds what the previous attempt did and
finishes it. `resume` simply runs the remaining steps; `rollback` undoes what
was made as long as the destination has not joined the host's map.

Who does what:
  array/lio.py        storage objects, LUNs, ACLs, write protection, serials, geometry
  host/iscsi.py       iscsiadm logins, targeted LUN scans (host iface, the migrator's iface)
  host/multipath.py   the host's map: paths, suspend/resume, queueing
  host/usage.py       who has the host's volume mounted or open for writing
  datapath/           the guarded copy and the verify against the manifest
  switch.py           the switch step: the hold, the path swap, its revert
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from blockmig import online, signals
from blockmig.array import lio
from blockmig.datapath.copy import DEFAULT_CHUNK_SIZE, copy_volume
from blockmig.datapath.digest import load_manifest
from blockmig.datapath.journal import write_json_atomically
from blockmig.datapath.verify import verify_volume
from blockmig.errors import ArrayError, BlockmigError, DeviceError, HostError, MigrationError, UsageError, VerifyError
from blockmig.host import iscsi, multipath, udev, usage
from blockmig.state import STEPS, MigrationJournal, VolumeLock
from blockmig.switch import (
    DEFAULT_SWITCH_TIMEOUT,
    HostSwitch,
    freeze_filesystems,
    parse_portal,
    resume_map_with_a_path,
    thaw_filesystems,
)
from blockmig.sysfs import read_attribute

FENCES = ("writeprotect", "suspend", "none")
SWITCHES = ("multipath", "relogin")
MIGRATOR_IQN_PREFIX = "iqn.2026-11.io.blockmig:migrator"
MULTIPATH_CONF_DIR = "/etc/multipath/conf.d"
COPY_RETRIES = 5  # a source path that fails during the copy gets this many resumes
COPY_RETRY_WAIT = 3.0  # seconds between them (replacement_timeout in the lab is 5 s)

EventHandler = Callable[[dict], None]

# Several migrations of one plan run in threads of one process. Their copies and verifies run side by
# side; everything else (rtslib configfs writes, iscsiadm's node db, LIO's LUN numbering, multipathd,
# udev) is not safe to race and runs under this one lock.
CONTROL_PLANE = threading.RLock()
DATA_STEPS = ("copy", "verify")
_WHAT_A_SIGNAL_WAITS_FOR = {"switch": "the switch goes on until it has finished or reverted (within --switch-timeout)"}


@dataclass
class MigrationRequest:
    device: str  # /dev/mapper/NAME, /dev/dm-N, or /dev/sdX (relogin only)
    to_target: str
    to_portal: str  # IP:PORT
    backing_dir: str | None = None
    backing_device: str | None = None
    fence: str | None = None  # None: writeprotect in offline mode (a fence given means offline)
    switch: str = "multipath"
    worm: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_rate: float | None = None
    migration_id: str | None = None
    switch_timeout: float = DEFAULT_SWITCH_TIMEOUT
    mode: str | None = None  # online | offline; None: online where the host's writes can be tracked
    max_hold: float = online.DEFAULT_MAX_HOLD


@dataclass
class HostDevice:
    """What the host uses: a multipath map (name + member disks) or a bare SCSI disk."""

    device: str
    wwid: str
    map_name: str | None
    disks: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# public API


def migrate(request: MigrationRequest, on_event: EventHandler | None = None, after_chunk=None) -> dict:
    """Plan and run a migration; return the final report."""
    journal = plan_migration(request)
    return run_migration(journal.id, on_event, after_chunk)


def plan_migration(request: MigrationRequest) -> MigrationJournal:
    """Check everything and write the journal; changes nothing on either array or the host."""
    _check_request(request)
    host_device = resolve_host_device(request.device)
    if host_device.map_name is None and request.switch == "multipath":
        raise UsageError(
            f"{request.device} is not a multipath map: use --switch relogin for a host without multipath"
        )
    if host_device.map_name is None and request.fence == "suspend":
        raise UsageError(f"{request.device} is not a multipath map: --fence suspend needs one to hold IO on")
    if host_device.map_name and not multipath.queues_if_no_path(host_device.map_name):
        # The switch holds IO on the map while it has no path (dm turns this off while suspended).
        raise HostError(
            f"map {host_device.map_name} does not queue IO while it has no path "
            "(set no_path_retry queue, or a number, in multipath.conf)"
        )
    mode = online.choose_mode(request.mode, request.fence is not None, host_device.map_name, request.device)
    if mode == "online" and request.switch != "multipath":
        raise UsageError("--mode online switches the host by its multipath map: use --switch multipath")
    fence = "none" if mode == "online" else request.fence or "writeprotect"  # online: era tracks, nothing fences
    if mode == "offline":
        _refuse_a_fence_that_breaks_writers(host_device, fence)
    source = _describe_source(host_device)
    portal_ip, port = parse_portal(request.to_portal)
    destination_array = lio.find_array(request.to_target)
    if (portal_ip, port) not in destination_array.portals:
        offered = ", ".join(f"{ip}:{p}" for ip, p in destination_array.portals) or "none"
        raise ArrayError(f"target {request.to_target} has no portal {portal_ip}:{port} (it has: {offered})")
    if request.to_target == source["target"]:
        raise UsageError(f"{request.to_target} is the source's own target")
    if request.chunk_size % int(source["geometry"].get("block_size", 512)):
        raise UsageError(
            f"chunk size {request.chunk_size} is not a multiple of the volume's block size "
            f"{source['geometry']['block_size']}"
        )
    migration_id = request.migration_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{source['wwid'][-6:]}"
    volume_name = f"blockmig-{migration_id}"
    if request.backing_device:
        backing = os.path.realpath(request.backing_device)
        _check_backing_device(backing, source["size"])
        lio.check_backing_device_geometry(backing, source["geometry"])
        backing_created = False
    else:
        if not request.backing_dir and source["backing"].startswith("/dev/"):
            raise UsageError("the source is on a block device: give --backing-dir or --backing-device")
        backing_dir = os.path.abspath(request.backing_dir or os.path.dirname(source["backing"]))
        if not os.path.isdir(backing_dir):
            raise UsageError(f"backing directory {backing_dir} does not exist")
        backing = os.path.join(backing_dir, f"{volume_name}.img")
        if os.path.lexists(backing):
            raise UsageError(f"{backing} already exists")
        lio.check_free_space(backing_dir, source["size"])
        backing_created = True
    temporary_serial = str(uuid.uuid4())
    with VolumeLock(source["wwid"], migration_id):
        _refuse_unfinished_migration_of(source["wwid"])
        return MigrationJournal.create(
            migration_id,
            source=source,
            destination={
                "target": request.to_target,
                "portal": f"{portal_ip}:{port}",
                "volume": volume_name,
                "backing": backing,
                "backing_created": backing_created,
                "temporary_serial": temporary_serial,
                "temporary_wwid": lio.wwid_for_serial(temporary_serial),
                "lun": None,
            },
            migrator={
                "iface": f"blockmig-{migration_id}",
                "initiator": f"{MIGRATOR_IQN_PREFIX}-{re.sub(r'[^a-z0-9.-]', '-', migration_id.lower())}",
            },
            fence=fence,
            mode=mode,
            online=online.new_state(host_device.map_name, request.max_hold) if mode == "online" else None,
            switch=request.switch,
            switch_timeout=request.switch_timeout,
            worm=request.worm,
            chunk_size=request.chunk_size,
            max_rate=request.max_rate,
        )


def run_migration(migration_id: str, on_event: EventHandler | None = None, after_chunk=None) -> dict:
    """Run the steps not done yet (this is also `resume`); return the final report."""
    journal = MigrationJournal.load(migration_id)
    if journal.data["state"] == "done":
        return journal.data["report"]
    if journal.data["state"] == "rolled_back":
        raise MigrationError(f"migration {migration_id} was rolled back; start a new one")
    with VolumeLock(journal.data["source"]["wwid"], migration_id):
        return Migration(journal, on_event, after_chunk).run()


resume_migration = run_migration


def rollback_migration(migration_id: str, on_event: EventHandler | None = None) -> dict:
    """Put the host back on the source and remove what blockmig made; refused once the destination is in use."""
    journal = MigrationJournal.load(migration_id)
    if journal.data["state"] == "rolled_back":
        return journal.summary()
    with VolumeLock(journal.data["source"]["wwid"], migration_id), CONTROL_PLANE, \
            signals.deferred("the rollback goes on until the host is on the source", then_stop=False):
        return Migration(journal, on_event).rollback()


def migration_status(migration_id: str | None = None) -> list[dict]:
    if migration_id:
        return [MigrationJournal.load(migration_id).summary()]
    return [journal.summary() for journal in MigrationJournal.list_all()]


# ---------------------------------------------------------------------------
# planning helpers


def _check_request(request: MigrationRequest) -> None:
    if request.fence not in (None, *FENCES):
        raise UsageError(f"--fence must be one of {', '.join(FENCES)}")
    if request.switch not in SWITCHES:
        raise UsageError(f"--switch must be one of {', '.join(SWITCHES)}")
    if request.backing_dir and request.backing_device:
        raise UsageError("give --backing-dir or --backing-device, not both")
    if request.chunk_size <= 0 or request.chunk_size % 4096:
        raise UsageError(f"chunk size {request.chunk_size} must be a positive multiple of 4096")
    if not 1 <= request.switch_timeout <= 600:
        raise UsageError(f"switch timeout {request.switch_timeout:g} s must be between 1 and 600 s")
    if request.migration_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", request.migration_id):
        raise UsageError(f"migration id {request.migration_id!r}: use letters, digits, '.', '_', '-' (max 41)")


def _refuse_a_fence_that_breaks_writers(host_device: HostDevice, fence: str) -> None:
    """A volume being written cannot be write-protected (every write fails) nor copied unfenced."""
    if fence == "suspend":
        return
    users = usage.volume_users(host_device.device)
    if not (users.mounted_rw or users.writers):
        return
    if fence == "writeprotect":
        raise UsageError(
            f"{host_device.device} is in use for writing ({users.describe()}): --fence writeprotect would fail "
            "every write for the whole copy; use --fence suspend (host IO waits during the copy) or stop the writers"
        )
    raise UsageError(
        f"{host_device.device} is in use for writing ({users.describe()}): --fence none would copy a volume "
        "that changes; use --fence suspend (host IO waits during the copy) or stop the writers"
    )


def resolve_host_device(device: str) -> HostDevice:
    """/dev/mapper/NAME, /dev/dm-N or /dev/sdX -> the map (if any), its WWID and member disks."""
    if not os.path.exists(device):
        raise DeviceError(f"no such device {device}")
    name = os.path.basename(os.path.realpath(device))
    if name.startswith("sd"):
        holders = os.listdir(f"/sys/block/{name}/holders") if os.path.isdir(f"/sys/block/{name}/holders") else []
        if not holders:
            return HostDevice(device, udev.disk_wwid(name), None, [name])
        name = holders[0]
    if not name.startswith("dm-"):
        raise DeviceError(f"{device} is neither a multipath map nor a SCSI disk")
    uuid_text = read_attribute(f"/sys/block/{name}/dm/uuid")
    if not uuid_text.startswith("mpath-"):
        raise DeviceError(f"{device} is a device-mapper device but not a multipath map (uuid {uuid_text!r})")
    map_name = read_attribute(f"/sys/block/{name}/dm/name")
    disks = sorted(os.listdir(f"/sys/block/{name}/slaves"))
    return HostDevice(device, uuid_text[len("mpath-"):], map_name, disks)


def _describe_source(host_device: HostDevice) -> dict:
    """The source LUN behind the host device: array volume, the host's mapping and session, geometry."""
    volume = lio.find_volume_by_wwid(host_device.wwid)
    if volume.target_iqn is None:
        raise ArrayError(f"volume {volume.name} (WWID {host_device.wwid}) is not exported by any target")
    session = None
    for disk in host_device.disks:
        found = _session_of_disk(disk)
        if found and found.target_iqn == volume.target_iqn:
            session = found
            break
    if session is None:
        raise HostError(
            f"the host is not logged in to {volume.target_iqn} for {host_device.device}: no iSCSI path to the source"
        )
    mapping = lio.find_mapping(volume, session.initiator_iqn)
    if mapping is None:
        raise ArrayError(f"volume {volume.name} is not mapped to the host's initiator {session.initiator_iqn}")
    others = [m.initiator_iqn for m in lio.list_mappings(volume) if m.initiator_iqn != session.initiator_iqn]
    if others:
        raise UsageError(
            f"volume {volume.name} is also mapped to {', '.join(others)}: another initiator could write the source "
            "during the copy and would be left on it after the switch; unmap it first"
        )
    return {
        "device": host_device.device,
        "map": host_device.map_name,
        "wwid": host_device.wwid,
        "serial": volume.serial,
        "volume": volume.name,
        "size": volume.size,
        "backing": volume.backing,
        "target": volume.target_iqn,
        "lun": volume.lun,
        "host_lun": mapping.mapped_lun,
        "geometry": lio.volume_geometry(volume),
        "portal": f"{session.portal_ip}:{session.port}",
        "host_initiator": session.initiator_iqn,
        "host_iface": session.iface,
    }


def _refuse_unfinished_migration_of(wwid: str) -> None:
    for journal in MigrationJournal.list_all():
        if journal.data["source"]["wwid"] == wwid and journal.data["state"] not in ("done", "rolled_back"):
            raise MigrationError(
                f"migration {journal.id} of this volume is unfinished ({journal.data['state']}): "
                f"blockmig resume {journal.id} or blockmig rollback {journal.id}"
            )


def _check_backing_device(path: str, size: int) -> None:
    if not os.path.exists(path):
        raise DeviceError(f"no such device {path}")
    with open(path, "rb") as device:
        device_size = device.seek(0, os.SEEK_END)
    if device_size < size:
        raise ArrayError(f"{path} holds {device_size} bytes: no room for the {size}-byte volume")
    if device_size != size:
        raise ArrayError(f"{path} holds {device_size} bytes; the destination must be exactly {size} bytes")


def _session_of_disk(disk: str) -> iscsi.Session | None:
    for session in iscsi.sessions():
        if disk in iscsi.session_disks(session).values():
            return session
    return None


# ---------------------------------------------------------------------------
# the steps


class Migration:
    def __init__(self, journal: MigrationJournal, on_event: EventHandler | None = None, after_chunk=None):
        self.journal = journal
        self.emit = on_event or (lambda event: None)
        self.after_chunk = after_chunk
        self.source = journal.data["source"]
        self.destination = journal.data["destination"]
        self.migrator = journal.data["migrator"]
        self.online = journal.data.get("mode") == "online"

    # -- running -----------------------------------------------------------------
    def run(self, until: str | None = None) -> dict | None:
        """Run the steps not done yet; with `until`, stop before that step or any after it (and return None)."""
        self.emit({"event": "migration", "id": self.journal.id, "state": self.journal.data["state"]})
        for name in STEPS:
            if self.journal.is_done(name):
                continue
            if until and STEPS.index(name) >= STEPS.index(until):
                return None
            group = self.journal.data.get("switch_group")
            if name == "switch" and group:  # one of a consistency group: never switched alone
                raise MigrationError(f"migration {self.journal.id} is verified and switches with its group: "
                                     f"blockmig resume {group}")
            self.emit({"event": "step", "step": name, "state": "started"})
            self.journal.mark_started(name)
            try:
                # A signal stops us here, between steps (the cleanup below lifts a suspend fence), or in a data
                # step at a chunk boundary; a control-plane step (the switch: finished or reverted within
                # --switch-timeout) runs to its end first.
                signals.check("before the step began")
                with contextlib.nullcontext() if name in DATA_STEPS else CONTROL_PLANE, \
                        contextlib.nullcontext() if name in DATA_STEPS else signals.deferred(
                            _WHAT_A_SIGNAL_WAITS_FOR.get(name, f"step {name} goes on to its end"), then_stop=False):
                    facts = getattr(self, f"_step_{name}")() or {}
            except BaseException as exc:  # cleanup on anything; only our own errors are reworded
                # A signal (a first one, or a second after the one that stopped the step) waits for the cleanup.
                with CONTROL_PLANE, signals.deferred("lifting the fence and journaling", then_stop=False):
                    cleanup_error = self._after_failure(name)
                message = str(exc) or type(exc).__name__
                if cleanup_error:
                    message += f"; cleaning up failed too: {cleanup_error}"
                self.journal.mark_failed(f"{name}: {message}")
                if not isinstance(exc, BlockmigError):
                    raise
                raise MigrationError(
                    f"migration {self.journal.id} stopped in step {name}: {message} "
                    f"(blockmig resume {self.journal.id} or blockmig rollback {self.journal.id})"
                ) from exc
            self.journal.mark_done(name, **facts)
            self.emit({"event": "step", "step": name, "state": "done", **facts})
        return self.journal.data["report"]

    def _after_failure(self, step: str) -> str | None:
        """Leave no host IO held past our exit; a suspend fence is lifted, so the copy restarts on resume.

        A destination that could not be made or reached is removed again, so a
        refused login or a full array leaves both arrays as they were. Returns
        what went wrong while cleaning up (reported with the error, not swallowed).
        """
        try:
            if step == "create_destination":
                self._remove_destination()
            self._release_held_io(step)
        except BlockmigError as exc:
            return str(exc)
        return None

    def _release_held_io(self, step: str) -> None:
        map_name = self.source["map"]
        if self.online:
            online.resume_private_maps(self.journal)  # before the thaw below, which writes through them
            online.resume_era_maps(self.journal)
        if map_name and (multipath.is_suspended(map_name) or self.journal.data.get("frozen")):
            joined = self.journal.is_done("switch") or self.journal.facts("switch").get("destination_joined")
            if self.journal.data["fence"] == "suspend" and not joined:  # the host writes the source again
                self._lift_fence()
                self._forget_copy()
            else:
                if multipath.is_suspended(map_name):
                    resume_map_with_a_path(map_name)
                thaw_filesystems(self.journal, map_name)
            self.emit({"event": "io_resumed", "map": map_name, "after_failure_in": step})

    def release_fence(self) -> None:
        """Host IO flows on the source again before the switch (a consistency group that cannot switch now):
        the source may change from here on, so resume fences and copies again. Online, nothing holds
        the host and era goes on tracking: resume simply runs the delta passes again."""
        if self.online:
            return
        with CONTROL_PLANE:
            self._lift_fence()
            self._forget_copy()

    def _forget_copy(self) -> None:
        self.journal.forget_copy()

    # -- plan --------------------------------------------------------------------
    def _step_plan(self) -> dict:
        """Re-check, on resume, that the host still sees the source as planned."""
        if self.journal.is_done("switch"):
            return {}
        host_device = resolve_host_device(self.source["device"])
        if host_device.wwid != self.source["wwid"]:
            raise MigrationError(f"{self.source['device']} now has WWID {host_device.wwid}, not {self.source['wwid']}")
        return {"wwid": host_device.wwid, "disks": host_device.disks}

    # -- create destination -------------------------------------------------------
    def _step_create_destination(self) -> dict:
        """Make the destination volume (the source's size and geometry, a serial of its own), the migrator's only."""
        volume = self._destination_volume(create=True)
        disk = self._migrator_disk()
        return {"volume": volume.name, "lun": volume.lun, "serial": volume.serial, "migrator_disk": disk}

    def _destination_volume(self, create: bool = False) -> lio.Volume:
        with contextlib.suppress(ArrayError):
            return lio.find_volume(self.destination["volume"])
        if not create:
            raise MigrationError(f"destination volume {self.destination['volume']} is gone")
        volume = lio.create_volume(
            self.destination["target"],
            self.destination["volume"],
            self.source["size"],
            self.destination["backing"],
            serial=self.destination["temporary_serial"],
            geometry=self.source.get("geometry"),
        )
        self.destination["lun"] = volume.lun
        self.journal.record("create_destination", backing_made=self.destination["backing_created"])
        return volume

    def _blacklist_temporary_wwid(self) -> None:
        """Keep multipathd off the migrator's disk: a map on it would hold it (no O_EXCL open)."""
        path = self._multipath_drop_in()
        text = f'# blockmig migration {self.journal.id}: the migrator\'s destination disk\nblacklist {{\n    wwid "{self.destination["temporary_wwid"]}"\n}}\n'
        if read_attribute(path) != text.strip():
            os.makedirs(MULTIPATH_CONF_DIR, exist_ok=True)
            with open(path + ".tmp", "w") as handle:
                handle.write(text)
            os.replace(path + ".tmp", path)
            multipath.reconfigure()

    def _remove_blacklist(self) -> None:
        """No `multipathd reconfigure` here: the temporary WWID exists no more (the destination has the source's
        serial, or is gone), and a reconfigure reloads every map, resuming any map another migration holds suspended."""
        path = self._multipath_drop_in()
        if os.path.exists(path):
            os.unlink(path)

    def _multipath_drop_in(self) -> str:
        return os.path.join(MULTIPATH_CONF_DIR, f"blockmig-{self.journal.id}.conf")

    def _migrator_disk(self) -> str:
        """The migrator's disk of the destination (its own mapped LUN, WWID checked); logs in if needed."""
        volume = self._destination_volume()
        mapping = lio.find_mapping(volume, self.migrator["initiator"])
        if mapping is None:
            if volume.serial != self.destination["temporary_serial"]:
                volume = lio.change_volume_serial(volume, self.destination["temporary_serial"])
            mapping = lio.export_volume(volume, self.migrator["initiator"])
        self._blacklist_temporary_wwid()
        ip, port = parse_portal(self.destination["portal"])
        iscsi.create_iface(self.migrator["iface"], self.migrator["initiator"])
        session = iscsi.login(self.destination["target"], ip, port, iface=self.migrator["iface"])
        if mapping.mapped_lun not in iscsi.session_disks(session):
            iscsi.scan_session_lun(session, mapping.mapped_lun)
        disk = iscsi.find_session_disk(session, mapping.mapped_lun, self.destination["temporary_wwid"])
        udev.settle()
        return disk

    def _check_destination_is_the_migrators_alone(self) -> None:
        """Exclusive receiving: before a byte is copied, only the migrator may see the destination."""
        others = [m.initiator_iqn for m in lio.list_mappings(self._destination_volume())
                  if m.initiator_iqn != self.migrator["initiator"]]
        if others:
            raise MigrationError(
                f"destination {self.destination['volume']} is also mapped to {', '.join(others)}: "
                "only the migrator may write it during the copy"
            )

    # -- fence -------------------------------------------------------------------
    def _step_fence(self) -> dict:
        fence = self.journal.data["fence"]
        map_name = self.source["map"]
        if self.online:  # no fence: the host writes all along, era records where
            return online.start_tracking(self.journal)
        if fence == "none":
            return {"fence": "none"}
        if fence == "writeprotect":
            if map_name:
                multipath.flush_buffers(map_name)  # the host's dirty pages land before the fence
            lio.set_mapping_write_protect(self._source_volume(), self.source["host_initiator"], True)
        elif fence == "suspend":
            # Filesystems frozen (FIFREEZE survives multipathd's reloads), IO drained, while the source takes writes.
            freeze_filesystems(self.journal, map_name)
            if not multipath.is_suspended(map_name):
                multipath.suspend_map(map_name, lockfs=False)
        return {"fence": fence}

    def _lift_fence(self) -> None:
        """Host writes to the source again (also when the switch, not the fence, protected it)."""
        with contextlib.suppress(ArrayError):
            lio.set_mapping_write_protect(self._source_volume(), self.source["host_initiator"], False)
        map_name = self.source["map"]
        if map_name and multipath.is_suspended(map_name):
            resume_map_with_a_path(map_name)
        if map_name:
            thaw_filesystems(self.journal, map_name)

    def _source_volume(self) -> lio.Volume:
        return lio.find_volume(self.source["volume"])

    # -- copy and verify ---------------------------------------------------------
    def _source_disk(self) -> str:
        """The host's own path to the source LUN (a member of its map, found by the host's LUN, WWID checked)."""
        ip, port = parse_portal(self.source["portal"])
        session = iscsi.find_session(self.source["target"], ip, port, self.source["host_iface"])
        if session is None:
            raise HostError(f"the host has no session to the source {self.source['target']} at {self.source['portal']}")
        return iscsi.find_session_disk(session, self.source["host_lun"], self.source["wwid"])

    def _step_copy(self) -> dict:
        with CONTROL_PLANE:
            self._check_destination_is_the_migrators_alone()
            destination = f"/dev/{self._migrator_disk()}"
        progress = _Progress(self.emit, "copy")
        if self.online:
            online.begin_pass_one(self.journal)
        for attempt in range(COPY_RETRIES + 1):
            with CONTROL_PLANE:
                source = f"/dev/{self._source_disk()}"
            try:
                manifest = copy_volume(
                    source,
                    destination,
                    self.journal.copy_journal_path,
                    chunk_size=self.journal.data["chunk_size"],
                    resume=True,
                    max_rate=self.journal.data["max_rate"],
                    on_event=progress,
                    after_chunk=self.after_chunk,
                )
                break
            except DeviceError as exc:
                if attempt == COPY_RETRIES:
                    raise
                self.emit({"event": "copy_retry", "attempt": attempt + 1, "error": str(exc)})
                time.sleep(COPY_RETRY_WAIT)
        self._check_suspend_fence_held()
        if self.online:
            manifest = online.converge(self.journal, manifest, self._source_device, destination, self.emit,
                                       progress.seconds)
        write_json_atomically(self.journal.manifest_path, manifest.to_dict())
        return {
            "source_disk": source,
            "destination_disk": destination,
            "volume_digest": manifest.volume_digest,
            "chunks": manifest.chunk_count,
            "seconds": progress.seconds,
        }

    def _check_suspend_fence_held(self) -> None:
        map_name = self.source["map"]
        if self.journal.data["fence"] == "suspend" and not multipath.is_suspended(map_name):
            # multipathd resumes a map whenever it reloads it (a path event): the fence broke.
            self._forget_copy()
            raise MigrationError(
                f"host IO on {map_name} was released during the copy (multipathd reloaded the map), "
                "so the source may have changed; the copy starts again on resume"
            )

    def _step_verify(self) -> dict:
        """The destination against the manifest; then the source again, so a broken fence is caught, not trusted.

        Online, the source changes: the deltas written meanwhile are copied and read back instead.
        """
        manifest = load_manifest(self.journal.manifest_path)
        with CONTROL_PLANE:
            migrator_disk = self._migrator_disk()
            self._check_geometry(migrator_disk)
            source_disk = self._source_disk()
        progress = _Progress(self.emit, "verify")
        digest = verify_volume(f"/dev/{migrator_disk}", manifest, on_event=progress)
        if self.online:
            manifest = online.converge(self.journal, None, self._source_device, f"/dev/{migrator_disk}", self.emit)
            return {"volume_digest": manifest.volume_digest, "seconds": progress.seconds}
        source_progress = _Progress(self.emit, "verify-source")
        try:
            verify_volume(f"/dev/{source_disk}", manifest, on_event=source_progress)
        except VerifyError as exc:
            self._forget_copy()
            raise MigrationError(
                f"the source changed after it was copied ({exc}); the fence did not hold, the copy starts again on resume"
            ) from None
        self._check_suspend_fence_held()
        return {"volume_digest": digest, "seconds": progress.seconds, "source_seconds": source_progress.seconds}

    def _check_geometry(self, migrator_disk: str) -> None:
        """What the host will see after the switch must be what it sees now: size and logical block size."""
        host_device = self.source["map"] and f"/dev/mapper/{self.source['map']}" or self.source["device"]
        wanted = (multipath.logical_block_size(host_device), _device_size(host_device))
        found = (multipath.logical_block_size(f"/dev/{migrator_disk}"), _device_size(f"/dev/{migrator_disk}"))
        if wanted != found:
            raise MigrationError(
                f"destination disk {migrator_disk} has {found[1]} bytes in {found[0]}-byte blocks, "
                f"the host's volume {wanted[1]} bytes in {wanted[0]}-byte blocks: refusing to switch"
            )

    # -- switch ------------------------------------------------------------------
    def _step_switch(self) -> dict:
        switch = self.host_switch()
        try:
            return switch.run()
        except BaseException:  # reverted for any reason: the host writes the source again, copy anew
            if switch.facts.get("reverted"):
                switch.record_revert()
            raise

    def host_switch(self) -> HostSwitch:
        if self.online:
            return online.OnlineSwitch(self.journal, self.emit, self._source_device,
                                       lambda: f"/dev/{self._migrator_disk()}")
        return HostSwitch(self.journal, self.emit)

    def _source_device(self) -> str:
        return f"/dev/{self._source_disk()}"

    # -- finish ------------------------------------------------------------------
    def _step_finish(self) -> dict:
        volume = self._destination_volume()
        if self.journal.data["worm"]:
            lio.set_mapping_write_protect(volume, self.source["host_initiator"], True)
        self._remove_blacklist()
        if self.migrator["iface"] in iscsi.list_ifaces():
            iscsi.remove_iface(self.migrator["iface"])
        report = self._report()
        self.journal.set_state("done", report=report)
        return {}

    def _report(self) -> dict:
        copy, verify, switch = (self.journal.facts(name) for name in ("copy", "verify", "switch"))
        created = self.journal.data["created"]
        total = (datetime.now(timezone.utc) - datetime.fromisoformat(created)).total_seconds()
        return {
            "id": self.journal.id,
            "map": self.source["map"],
            "wwid": self.source["wwid"],
            "size": self.source["size"],
            "block_size": int(self.source.get("geometry", {}).get("block_size", 512)),
            "chunk_size": self.journal.data["chunk_size"],
            "chunks": copy.get("chunks"),
            "source": {key: self.source[key] for key in ("target", "portal", "volume", "backing", "host_lun")},
            "destination": {**{key: self.destination[key] for key in ("target", "portal", "volume", "backing")},
                            "host_lun": switch.get("destination_host_lun")},
            "volume_digest": switch.get("volume_digest") or verify.get("volume_digest"),
            "copy_seconds": copy.get("seconds"),
            "verify_seconds": verify.get("seconds"),
            "io_held_seconds": switch.get("io_held_seconds"),
            "switch_reverts": self.journal.data.get("switch_reverts", 0),
            "host_disk": switch.get("host_disk"),
            "fence": self.journal.data["fence"],
            "mode": self.journal.data.get("mode", "offline"),
            "online": online.summary(self.journal),
            "final_delta": switch.get("final_delta"),
            "switch": self.journal.data["switch"],
            "worm": self.journal.data["worm"],
            "total_seconds": round(total, 3),
        }

    # -- rollback ----------------------------------------------------------------
    def rollback(self) -> dict:
        switch = self.host_switch()
        if switch.facts.get("destination_joined") or self.journal.data["state"] == "done":
            raise MigrationError(
                f"migration {self.journal.id} has already moved the host to the destination; "
                f"finish it with blockmig resume {self.journal.id}"
            )
        self.emit({"event": "rollback", "id": self.journal.id})
        self.journal.set_state("rolling_back")
        if switch.facts.get("source_removed") or switch.facts.get("source_fencing"):
            with switch.host_io_held():  # killed inside the hold: the source path comes back first
                switch.revert_in_hold()
        if self.journal.is_done("create_destination") or switch.facts.get("prepared"):
            with contextlib.suppress(MigrationError):
                switch.release_host_destination_session()
        if self.online:
            online.resume_private_maps(self.journal)  # killed in the hold: before the thaw, which writes through them
        self._lift_fence()
        if self.online:
            online.stop_tracking(self.journal)  # after the thaw: era's reload freezes the filesystems itself
        self._remove_destination()
        self.journal.set_state("rolled_back")
        return self.journal.summary()

    def _remove_destination(self) -> None:
        """The migrator's session and iface, the destination volume and its backing file, the blacklist."""
        HostSwitch(self.journal, self.emit).logout_migrator()
        ours = bool(self.journal.facts("create_destination").get("backing_made"))
        with contextlib.suppress(ArrayError):
            lio.remove_volume(lio.find_volume(self.destination["volume"]), remove_backing=ours)
        if ours and os.path.exists(self.destination["backing"]):
            os.unlink(self.destination["backing"])
        self._remove_blacklist()



def _device_size(path: str) -> int:
    with open(path, "rb") as device:
        return device.seek(0, os.SEEK_END)

# ---------------------------------------------------------------------------


class _Progress:
    """Passes the engine's events on, adding phase, bytes done, rate (B/s) and ETA (s) to each chunk."""

    def __init__(self, emit: EventHandler, phase: str):
        self.emit = emit
        self.phase = phase
        self.began = time.monotonic()
        self.start_bytes = 0
        self.total = 0
        self.seconds = 0.0

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind in ("start", "verify_start"):
            self.began = time.monotonic()
            self.total = event["size"]
            self.start_bytes = event.get("resume_from", 0)
        elif kind in ("chunk", "verified_chunk"):
            done = event["reserved_address"] if kind == "chunk" else event["end"]
            elapsed = time.monotonic() - self.began
            rate = (done - self.start_bytes) / elapsed if elapsed > 0 else None
            event = {**event, "bytes": done, "total": self.total, "rate": rate,
                     "eta": (self.total - done) / rate if rate else None}
        elif kind in ("done", "verify_done"):
            self.seconds = round(time.monotonic() - self.began, 3)
        self.emit({**event, "phase": self.phase})

