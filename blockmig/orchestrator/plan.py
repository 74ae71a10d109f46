"""The plan step: check everything and write the journal (plan_migration), and re-check the source on resume.

Planning changes nothing on either array or the host; every refusal is one line.
"""

from __future__ import annotations

import os
import re
import stat
import time
import uuid
from dataclasses import dataclass

from blockmig import sizes
from blockmig.array import lio, source_session
from blockmig.datapath.copy import DEFAULT_CHUNK_SIZE
from blockmig.errors import ArrayError, DeviceError, HostError, MigrationError, UsageError
from blockmig.host import iscsi, multipath, usage
from blockmig.host.devices import HostDevice, resolve_host_device
from blockmig.ids import check_id
from blockmig.orchestrator import online
from blockmig.orchestrator.host_switch import DEFAULT_SWITCH_TIMEOUT
from blockmig.orchestrator.sequencer import BaseStep
from blockmig.orchestrator.served_destination import BACKSTORES, DEFAULT_BACKSTORE
from blockmig.state import MigrationJournal, VolumeLock, refuse_unfinished_migration_of

FENCES = ("writeprotect", "suspend", "none")
SWITCHES = ("multipath", "relogin")
MIGRATOR_IQN_PREFIX = "iqn.2026-11.io.blockmig:migrator"


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
    min_rate: int | None = None  # online: the copy's floor while the array holds it back for the host's IO
    migration_id: str | None = None
    switch_timeout: float = DEFAULT_SWITCH_TIMEOUT
    mode: str | None = None  # online (= pass-through) | offline; None: online.choose_mode's default
    max_hold: float = online.DEFAULT_MAX_HOLD
    backstore: str = DEFAULT_BACKSTORE  # what serves the destination during the copy (served_destination.py)


class PlanStep(BaseStep):
    """Re-check, on resume, that the host still sees the source as planned."""

    name = "plan"

    def run(self, migration) -> dict:
        if migration.journal.is_done("switch"):
            return {}
        source = migration.source
        host_device = resolve_host_device(source["device"])
        if host_device.wwid != source["wwid"]:
            raise MigrationError(f"{source['device']} now has WWID {host_device.wwid}, not {source['wwid']}")
        return {"wwid": host_device.wwid, "disks": host_device.disks}


def host_source_disk(migration) -> str:
    """The host's own path to the source LUN (a member of its map, found by the host's LUN, WWID checked)."""
    source = migration.source
    session = iscsi.find_portal_session(source["target"], source["portal"], source["host_iface"])
    if session is None:
        raise HostError(f"the host has no session to the source {source['target']} at {source['portal']}")
    return iscsi.find_session_disk(session, source["host_lun"], source["wwid"])


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
    mode = online.choose_mode(request.mode, request.fence is not None, host_device.map_name, request.device,
                              request.switch)
    if mode == online.PASS_THROUGH and request.switch != "multipath":
        raise UsageError("an online move (pass-through) switches the host by its multipath map: use --switch "
                         "multipath, or --mode offline")
    # online: the destination passes through to the source, so nothing fences
    fence = "none" if mode == online.PASS_THROUGH else request.fence or "writeprotect"
    if mode == "offline":
        _refuse_a_fence_that_breaks_writers(host_device, fence)
    if host_device.map_name is None:  # relogin of a bare disk: every user of it gets EIO meanwhile
        usage.refuse_users_of_a_bare_disk(host_device.device)
    source = _describe_source(host_device)
    destination_array = lio.find_array(request.to_target)
    # a host name: the array's portal it resolves to
    portal_ip, port = iscsi.parse_portal(request.to_portal, among=destination_array.portals)
    if (portal_ip, port) not in destination_array.portals:
        offered = ", ".join(iscsi.format_portal(ip, p) for ip, p in destination_array.portals) or "none"
        raise ArrayError(
            f"target {request.to_target} has no portal {iscsi.format_portal(portal_ip, port)} "
            f"(it has: {offered})"
        )
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
        refuse_unfinished_migration_of(source["wwid"])
        return MigrationJournal.create(
            migration_id,
            source=source,
            destination={
                "target": request.to_target,
                "portal": iscsi.format_portal(portal_ip, port),
                "volume": volume_name,
                "backing": backing,
                "backing_created": backing_created,
                "temporary_serial": temporary_serial,
                "temporary_wwid": lio.wwid_for_serial(temporary_serial),
                "lun": None,
                # a pass-through's host view is the handler's
                "backstore": "handler" if mode == online.PASS_THROUGH else request.backstore,
            },
            migrator={
                "iface": f"blockmig-{migration_id}",
                "initiator": f"{MIGRATOR_IQN_PREFIX}-{re.sub(r'[^a-z0-9.-]', '-', migration_id.lower())}",
            },
            fence=fence,
            mode=mode,
            online=(online.new_pass_through_state(request.max_hold, request.min_rate)
                    if mode == online.PASS_THROUGH else None),
            array_session=source_session.new_record(migration_id) if mode == online.PASS_THROUGH else None,
            switch=request.switch,
            switch_timeout=request.switch_timeout,
            worm=request.worm,
            chunk_size=request.chunk_size,
            max_rate=request.max_rate,
        )


def _check_request(request: MigrationRequest) -> None:
    if request.fence not in (None, *FENCES):
        raise UsageError(f"--fence must be one of {', '.join(FENCES)}")
    if request.switch not in SWITCHES:
        raise UsageError(f"--switch must be one of {', '.join(SWITCHES)}")
    if request.backstore not in BACKSTORES:
        raise UsageError(f"--backstore must be one of {', '.join(BACKSTORES)}")
    if request.backing_dir and request.backing_device:
        raise UsageError("give --backing-dir or --backing-device, not both")
    try:  # the CLI and plan files parse these already; an API caller's values meet the same bounds
        sizes.parse_chunk_size(request.chunk_size)
        if request.max_rate is not None:
            sizes.parse_max_rate(request.max_rate)
        if request.min_rate is not None:
            sizes.parse_max_rate(request.min_rate)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if request.min_rate is not None and request.max_rate is not None and request.min_rate > request.max_rate:
        raise UsageError(f"--min-rate {request.min_rate} is above --max-rate {request.max_rate} bytes/s")
    if not 1 <= request.switch_timeout <= 600:
        raise UsageError(f"switch timeout {request.switch_timeout:g} s must be between 1 and 600 s")
    if request.migration_id is not None:
        check_id(request.migration_id, "migration id")


def _refuse_a_fence_that_breaks_writers(host_device: HostDevice, fence: str) -> None:
    """A volume being written cannot be write-protected (every write fails) nor copied unfenced."""
    if fence == "suspend":
        return
    users = usage.volume_users(host_device.device)
    if not (users.mounted_rw or users.writers):
        return
    if fence == "writeprotect":
        raise UsageError(
            f"{host_device.device} is in use for writing ({users.describe()}): --fence writeprotect would "
            "fail "
            "every write for the whole copy; use --fence suspend (host IO waits during the copy) or stop "
            "the writers"
        )
    raise UsageError(
        f"{host_device.device} is in use for writing ({users.describe()}): --fence none would copy a volume "
        "that changes; use --fence suspend (host IO waits during the copy) or stop the writers"
    )


def _describe_source(host_device: HostDevice) -> dict:
    """The source LUN behind the host device: array volume, the host's mapping and session, geometry."""
    volume = lio.find_volume_by_wwid(host_device.wwid)
    if volume.target_iqn is None:
        raise ArrayError(f"volume {volume.name} (WWID {host_device.wwid}) is not exported by any target")
    session = None
    for disk in host_device.disks:
        found = iscsi.session_of_disk(disk)
        if found and found.target_iqn == volume.target_iqn:
            session = found
            break
    if session is None:
        raise HostError(
            f"the host is not logged in to {volume.target_iqn} for {host_device.device}: no iSCSI path to "
            "the source"
        )
    mapping = lio.find_mapping(volume, session.initiator_iqn)
    if mapping is None:
        raise ArrayError(
            f"volume {volume.name} is not mapped to the host's initiator {session.initiator_iqn}"
        )
    others = [m.initiator_iqn for m in lio.list_mappings(volume) if m.initiator_iqn != session.initiator_iqn]
    if others:
        raise UsageError(
            f"volume {volume.name} is also mapped to {', '.join(others)}: another initiator could write "
            "the source "
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
        "portal": iscsi.format_portal(session.portal_ip, session.port),
        "host_initiator": session.initiator_iqn,
        "host_iface": session.iface,
    }


def _check_backing_device(path: str, size: int) -> None:
    if not os.path.exists(path):
        raise DeviceError(f"no such device {path}")
    if not (stat.S_ISBLK(os.stat(path).st_mode) or stat.S_ISREG(os.stat(path).st_mode)):  # a FIFO never opens
        raise UsageError(f"--backing-device {path} is not a block device")
    with open(path, "rb") as device:
        device_size = device.seek(0, os.SEEK_END)
    if device_size < size:
        raise ArrayError(f"{path} holds {device_size} bytes: no room for the {size}-byte volume")
    if device_size != size:
        raise ArrayError(f"{path} holds {device_size} bytes; the destination must be exactly {size} bytes")
