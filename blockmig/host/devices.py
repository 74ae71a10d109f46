"""The host's view of one volume: the device it uses, the map's disks, what is stacked on it, its
filesystems."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from blockmig.errors import DeviceError, HostError
from blockmig.host import multipath, udev, usage
from blockmig.sysfs import read_attribute


@dataclass
class HostDevice:
    """What the host uses: a multipath map (name + member disks) or a bare SCSI disk."""

    device: str
    wwid: str
    map_name: str | None
    disks: list[str] = field(default_factory=list)


def resolve_host_device(device: str) -> HostDevice:
    """/dev/mapper/NAME, /dev/dm-N or /dev/sdX -> the map (if any), its WWID and member disks."""
    if not os.path.exists(device):
        raise DeviceError(f"no such device {device}")
    name = os.path.basename(os.path.realpath(device))
    if name.startswith("sd"):
        holders_dir = f"/sys/block/{name}/holders"
        holders = os.listdir(holders_dir) if os.path.isdir(holders_dir) else []
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
    return HostDevice(device, uuid_text[len("mpath-") :], map_name, disks)


def map_disks(map_name: str) -> list[str]:
    """The disks in the map's live table, from sysfs (a multipathd round trip costs 50-180 ms in the hold)."""
    dm = os.path.basename(os.path.realpath(f"/dev/mapper/{map_name}"))
    slaves = f"/sys/block/{dm}/slaves"
    return sorted(os.listdir(slaves)) if os.path.isdir(slaves) else []


def resume_map_with_a_path(map_name: str) -> None:
    """Resume a held map, but never one without a path: its queued IO would fail about 24 s later
    (multipathd's no_path_retry countdown), so it stays suspended and queueing for resume to finish."""
    if not map_disks(map_name):
        raise HostError(f"map {map_name} has no path (the switch could neither finish nor revert): its IO "
                        "stays held, suspended and queueing, until blockmig resume finishes the switch or "
                        "rollback reverts it")
    multipath.resume_map(map_name)


def freeze_filesystems(
    map_name: str, frozen: list[str], save: Callable[[], None], mountpoints: list[str] | None = None
) -> None:
    """FIFREEZE every filesystem mounted read-write on the map (or on what is stacked on it), once.

    Each mountpoint is added to `frozen` and saved before its freeze, so whoever comes
    next (resume, rollback, the cleanup after an error) thaws it. `mountpoints`: as found earlier.
    """
    if mountpoints is None:
        mountpoints = usage.volume_users(f"/dev/mapper/{map_name}").rw_mountpoints
    for mountpoint in mountpoints:
        if mountpoint not in frozen:
            frozen.append(mountpoint)
            save()
            multipath.freeze_filesystem(mountpoint)


def thaw_filesystems(map_name: str, frozen: list[str], save: Callable[[], None]) -> bool:
    """Thaw what freeze_filesystems froze, but only while the map has a usable path (the thaw writes)."""
    if not frozen:
        return False
    if not any(path.usable for path in multipath.paths_of_map(map_name)):
        raise HostError(
            f"map {map_name} has no usable path: its filesystems stay frozen until blockmig resume"
        )
    for mountpoint in list(frozen):
        with contextlib.suppress(HostError):  # EINVAL: not frozen (any more), e.g. thawed by hand
            multipath.thaw_filesystem(mountpoint)
        frozen.remove(mountpoint)
        save()
    return True
