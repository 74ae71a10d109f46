"""The lab: two LIO arrays on one machine and a host using a volume on the first.

`lab_up` builds what `blockmig migrate` needs to have something to migrate:
a source array (127.0.0.1) with one file-backed volume of known serial that
the host is logged in to through a multipath map, and an empty destination
array (127.0.0.2). `lab_down` removes everything the lab and a migration in
it made, in the safe order. Both are plain uses of blockmig.array and
blockmig.host, the same on the lab VM, a Vagrant box or a real lab host.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from collections.abc import Callable, Iterable

from blockmig.array import lio
from blockmig.array.tcmu import client
from blockmig.errors import BlockmigError, LabError
from blockmig.host import iscsi, multipath
from blockmig.host.runner import run_command
from blockmig.sysfs import read_attribute

SOURCE_IQN = "iqn.2026-11.lab.blockmig:source"
DESTINATION_IQN = "iqn.2026-11.lab.blockmig:destination"
SOURCE_PORTAL = ("127.0.0.1", 3260)
DESTINATION_PORTAL = ("127.0.0.2", 3260)
LAB_TARGETS = {SOURCE_IQN: SOURCE_PORTAL, DESTINATION_IQN: DESTINATION_PORTAL}

SOURCE_VOLUME = "lab-source"
SOURCE_LUN = 0
# Hex only, so all 25 digits LIO puts in the WWID are the serial's own.
SOURCE_SERIAL = "b10c0000000000000000000000000001"
SOURCE_WWID = lio.wwid_for_serial(SOURCE_SERIAL)
DEFAULT_SIZE = 64 * 1024 * 1024
DEFAULT_BACKING_DIR = "/var/lib/blockmig-lab"
LOSETUP_TIMEOUT = 30.0


def _quiet(step: str) -> None:
    del step


def source_backing_file(backing_dir: str = DEFAULT_BACKING_DIR) -> str:
    return os.path.join(backing_dir, SOURCE_VOLUME + ".img")


def lab_up(size: int = DEFAULT_SIZE, backing_dir: str = DEFAULT_BACKING_DIR,
           on_step: Callable[[str], None] = _quiet, timeout: float = 60,
           block_size: int = 512, backstore: str = "fileio") -> dict:
    """Build the lab; on any failure tear down what was built and re-raise."""
    if size <= 0 or size % 512:
        raise LabError(f"lab volume size {size} must be a positive multiple of 512 bytes")
    present = [a.target_iqn for a in lio.list_arrays() if a.target_iqn in LAB_TARGETS]
    if present:
        raise LabError(f"the lab is already up ({', '.join(present)}); run 'blockmig lab down' first")
    initiator = iscsi.read_initiator_name()
    try:
        os.makedirs(backing_dir, exist_ok=True)
        for iqn, (ip, port) in LAB_TARGETS.items():
            on_step(f"creating array {iqn} on {ip}:{port}")
            lio.create_array(iqn, ip, port)
        on_step(f"creating volume {SOURCE_VOLUME} ({size} bytes, WWID {SOURCE_WWID})")
        volume = add_source_volume(
            SOURCE_VOLUME, size, backing_dir, lun=SOURCE_LUN, block_size=block_size, backstore=backstore,
            serial=SOURCE_SERIAL, initiators=(initiator,),
        )
        on_step(f"logging in to {SOURCE_IQN} as {initiator}")
        session = iscsi.login(SOURCE_IQN, *SOURCE_PORTAL, timeout=timeout)
        disk = iscsi.wait_for_session_disk(session, SOURCE_LUN, timeout)
        on_step(f"waiting for the multipath map on /dev/{disk}")
        multipath.wait_for_map(volume.wwid, 1, timeout)
    except BlockmigError as exc:
        try:
            lab_down(backing_dir)
        except BlockmigError as cleanup:
            raise LabError(f"{exc}; removing the half-built lab failed too: {cleanup}") from exc
        raise
    except BaseException:
        lab_down(backing_dir)
        raise
    return lab_status()


def lab_serial(name: str) -> str:
    """A hex-only serial of the volume name: distinct names give distinct WWIDs (25 hex digits)."""
    return "b10c" + hashlib.sha256(name.encode()).hexdigest()[:28]


def add_source_volume(name: str, size: int, backing_dir: str = DEFAULT_BACKING_DIR, *, lun: int,
                      mapped_lun: int | None = None, block_size: int = 512, backstore: str = "fileio",
                      serial: str | None = None, initiators: Iterable[str] | None = None,
                      geometry: dict | None = None, target_iqn: str = SOURCE_IQN) -> lio.Volume:
    """A volume of the shape real hosts have, exported to `initiators` (default: this host).

    The backing is `backing_dir/NAME.img`: the file itself (fileio) or a loop
    device over it with `block_size`-byte sectors (block); lab_down removes
    both. The host is not rescanned: a new LUN on a session shows up only
    after iscsi.rescan_session().
    """
    if backstore not in ("fileio", "block"):
        raise LabError(f"unknown backstore {backstore!r}: fileio or block")
    initiators = (iscsi.read_initiator_name(),) if initiators is None else tuple(initiators)
    backing = os.path.join(backing_dir, name + ".img")
    geometry = {**(geometry or {}), "block_size": str(block_size)}
    with contextlib.ExitStack() as undo:
        device = backing
        if backstore == "block":
            if os.path.lexists(backing):
                raise LabError(f"backing file {backing} already exists; refusing to reuse it")
            with open(backing, "xb") as f:
                undo.callback(_unlink_quietly, backing)
                f.truncate(size)
            device = _attach_loop(backing, block_size)
            undo.callback(_detach_loops_of, {backing})
        volume = lio.create_volume(target_iqn, name, size, device, serial=serial or lab_serial(name),
                                   lun=lun, geometry=geometry)
        undo.callback(lio.remove_volume, volume, remove_backing=True)
        for initiator in initiators:
            lio.export_volume(volume, initiator, mapped_lun=mapped_lun)
        undo.pop_all()
    return volume


def _attach_loop(path: str, sector_size: int) -> str:
    result = run_command(["losetup", "--find", "--show", f"--sector-size={sector_size}", path],
                         f"cannot attach {path} to a loop device", LOSETUP_TIMEOUT)
    if result.returncode != 0:
        raise LabError(f"losetup {path} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _loops_backed_by(paths: set[str]) -> list[str]:
    """Loop devices (/dev/loopN) whose backing file is one of `paths`."""
    wanted = {os.path.abspath(p) for p in paths}
    return [
        "/dev/" + os.path.basename(os.path.dirname(os.path.dirname(f)))
        for f in glob.glob("/sys/block/loop*/loop/backing_file")
        if read_attribute(f) in wanted
    ]


def _detach_loops_of(paths: set[str]) -> list[str]:
    detached = []
    for loop in _loops_backed_by(paths):
        result = run_command(["losetup", "--detach", loop], f"cannot detach {loop}", LOSETUP_TIMEOUT)
        if result.returncode != 0:
            raise LabError(f"losetup --detach {loop} failed: {result.stderr.strip()}")
        detached.append(loop)
    return detached


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def lab_down(backing_dir: str = DEFAULT_BACKING_DIR, on_step: Callable[[str], None] = _quiet) -> list[str]:
    """Remove maps, sessions, node records, arrays and backing files of the lab, in os-brick's order."""
    removed = []
    arrays = [a for a in lio.list_arrays() if a.target_iqn in LAB_TARGETS]
    volumes = [v for a in arrays for v in lio.list_volumes(a.target_iqn)]
    lab_sessions = [s for s in iscsi.sessions() if s.target_iqn in LAB_TARGETS]
    disks = [d for s in lab_sessions for d in iscsi.session_disks(s).values()]

    on_step("flushing the lab's multipath maps")
    flushed = multipath.flush_maps_on(disks)
    lab_wwids = {v.wwid for v in volumes} | {SOURCE_WWID}
    for stale in multipath.maps():  # a map whose paths are already gone
        if stale.wwid in lab_wwids:
            multipath.flush_map(stale.name)
            flushed.append(stale.name)
    removed += [f"multipath map {name}" for name in flushed]
    for session in lab_sessions:
        on_step(f"logging out of {session.target_iqn} (iface {session.iface})")
        iscsi.logout_safely(session)
        removed.append(f"iSCSI session {session.sid} to {session.target_iqn} via {session.iface}")
    for iqn in LAB_TARGETS:
        iscsi.run_iscsiadm(["-m", "node", "-T", iqn, "-o", "delete"], ok=(0, iscsi.ISCSI_ERR_NO_OBJS_FOUND))
    for process in client.handler_processes():  # migrations' destinations served by blockmig's backstore
        name = client.served_name(process.info["cmdline"])
        if name and name.startswith("blockmig-"):
            on_step(f"stopping the backstore handler of {name}")
            client.stop_handler(name)
            removed.append(f"backstore handler of {name}")
    for volume in lio.list_volumes():  # what a killed handler left (its host view is on no LUN)
        if volume.plugin == "user" and volume.name.startswith("blockmig-") and volume.target_iqn in (None, *LAB_TARGETS):
            lio.remove_volume(volume)
            removed.append(f"storage object {volume.name}")
    for array in arrays:
        on_step(f"removing array {array.target_iqn}")
        for volume in lio.remove_array(array.target_iqn):
            removed.append(f"volume {volume.name}")
        removed.append(f"array {array.target_iqn}")
    images = set(glob.glob(os.path.join(glob.escape(backing_dir), "*.img")))
    for loop in _detach_loops_of(images):
        removed.append(f"loop device {loop}")
    backing_files = {v.backing for v in volumes if v.plugin == "fileio"} | {source_backing_file(backing_dir)} | images
    for path in sorted(backing_files):
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(backing_dir) and os.path.isfile(path):
            os.unlink(path)
            removed.append(f"backing file {path}")
    return removed


def lab_status() -> dict:
    """What of the lab exists now: arrays with volumes and mappings, host sessions, multipath maps."""
    arrays = []
    wwids = set()
    for array in lio.list_arrays():
        if array.target_iqn not in LAB_TARGETS:
            continue
        volumes = []
        for volume in lio.list_volumes(array.target_iqn):
            wwids.add(volume.wwid)
            volumes.append({
                "name": volume.name, "size": volume.size, "serial": volume.serial, "wwid": volume.wwid,
                "backing": volume.backing, "lun": volume.lun,
                "mappings": [
                    {"initiator": m.initiator_iqn, "lun": m.mapped_lun, "write_protect": m.write_protect}
                    for m in lio.list_mappings(volume)
                ],
            })
        arrays.append({
            "target": array.target_iqn,
            "portals": [iscsi.format_portal(ip, port) for ip, port in array.portals],
            "volumes": volumes,
        })
    sessions = []
    disks = set()
    for session in iscsi.sessions():
        if session.target_iqn not in LAB_TARGETS:
            continue
        session_disks = iscsi.session_disks(session)
        disks |= set(session_disks.values())
        sessions.append({
            "sid": session.sid, "target": session.target_iqn, "portal": iscsi.format_portal(session.portal_ip, session.port),
            "iface": session.iface, "initiator": session.initiator_iqn, "state": session.state,
            "disks": {str(lun): name for lun, name in sorted(session_disks.items())},
        })
    all_paths = multipath.paths()
    maps = []
    for found in multipath.maps():
        map_paths = [p for p in all_paths if p.map_name == found.name]
        if found.wwid in wwids or any(p.dev in disks for p in map_paths):
            maps.append({
                "name": found.name, "wwid": found.wwid, "device": found.device,
                "paths": [{"dev": p.dev, "dm_state": p.dm_state, "checker": p.checker_state} for p in map_paths],
            })
    return {"up": len(arrays) == len(LAB_TARGETS), "arrays": arrays, "sessions": sessions, "maps": maps}
