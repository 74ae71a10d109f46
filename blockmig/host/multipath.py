"""dm-multipath on the host: multipathd for maps and paths, dmsetup to hold IO.

multipathd groups SCSI disks with the same WWID into one map; that is what
lets blockmig add the destination's path and drop the source's under a host
that keeps using /dev/mapper/NAME. Listings use multipathd's `raw format`
mode (no padding, no header), fields separated by a space; the only field
that can hold a space (the checker state, "i/o pending") comes last.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from blockmig.errors import HostError
from blockmig.host.control_plane import HostControlPlane
from blockmig.host.runner import run_command
from blockmig.host.udev import DEFAULT_TIMEOUT, settle, wait_for_path, wait_for_udev, wait_until
from blockmig.sysfs import read_attribute

MAP_FORMAT = "%n %w %d"  # name, WWID, dm-N
PATH_FORMAT = "%d %w %m %t %o %T"  # dev, WWID, map, dm state, dev state, checker state


@dataclass(frozen=True)
class MapInfo:
    name: str
    wwid: str
    dm: str  # dm-N

    @property
    def device(self) -> str:
        return f"/dev/mapper/{self.name}"


@dataclass(frozen=True)
class PathInfo:
    dev: str  # sdX
    wwid: str
    map_name: str  # "" when the path belongs to no map
    dm_state: str  # active / failed / undef
    dev_state: str  # running / offline / …
    checker_state: str  # ready / faulty / ghost / i/o pending / …

    @property
    def usable(self) -> bool:
        return self.dm_state == "active" and self.checker_state in ("ready", "ghost")


def _run(args: list[str], what: str) -> str:
    result = run_command(args, what, missing="multipath-tools / dmsetup")
    output = (result.stdout + result.stderr).strip()
    # multipathd's client exits 0 even when the daemon answers "fail".
    if result.returncode != 0 or output.splitlines()[-1:] == ["fail"]:
        # dmsetup ends with a bare "Command failed."; the reason is on the line before.
        lines = [line.strip() for line in output.splitlines() if line.strip() not in ("", "Command failed.")]
        message = lines[-1] if lines else f"exit {result.returncode}"
        raise HostError(f"{what}: {' '.join(args)}: {message}")
    return result.stdout


def multipathd(*command: str) -> str:
    return _run(["multipathd", *command], f"multipathd {command[0]} failed")


def parse_maps(text: str) -> list[MapInfo]:
    maps = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            maps.append(MapInfo(*fields))
    return maps


def parse_paths(text: str) -> list[PathInfo]:
    paths = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            if fields[2] in ("[orphan]", "orphan"):
                fields[2] = ""
            paths.append(PathInfo(*fields))
    return paths


def maps() -> list[MapInfo]:
    return parse_maps(multipathd("show", "maps", "raw", "format", MAP_FORMAT))


def paths() -> list[PathInfo]:
    return parse_paths(multipathd("show", "paths", "raw", "format", PATH_FORMAT))


def map_for_wwid(wwid: str) -> MapInfo | None:
    return next((m for m in maps() if m.wwid == wwid), None)


def paths_of_map(name: str) -> list[PathInfo]:
    return [p for p in paths() if p.map_name == name]


def wait_for_map(wwid: str, usable_paths: int = 1, timeout: float = DEFAULT_TIMEOUT) -> MapInfo:
    """Wait until the map for `wwid` exists with at least `usable_paths` active, ready paths."""

    def ready() -> MapInfo | None:
        found = map_for_wwid(wwid)
        if found and sum(p.usable for p in paths_of_map(found.name)) >= usable_paths:
            return found
        return None

    found = wait_until(ready, f"a multipath map for {wwid} with {usable_paths} usable path(s)", timeout)
    wait_for_path(found.device, timeout)
    return found


def wait_for_map_paths(name: str, devs: set[str], timeout: float = DEFAULT_TIMEOUT) -> list[PathInfo]:
    """Wait until the map's paths are exactly `devs` and all usable (after adding or removing one)."""

    def settled() -> list[PathInfo] | None:
        current = paths_of_map(name)
        if {p.dev for p in current} == devs and all(p.usable for p in current):
            return current
        return None

    return wait_until(settled, f"map {name} to have exactly the paths {sorted(devs)}", timeout)


def add_path(dev: str) -> None:
    multipathd("add", "path", dev)


def add_path_now(map_name: str, dev: str, timeout: float = DEFAULT_TIMEOUT, grace: float = 0.5) -> PathInfo:
    """Put a new disk into `map_name` as soon as udev has processed it; wait until it is a usable path there.

    multipathd answers "fail" to `add path` until udev has processed the
    disk (its blacklist exceptions match udev properties), and the add is
    idempotent once its own uevent handler has the disk; so this waits for
    udev's event (not polling), gives multipathd's uevent handling `grace`
    seconds and then adds the path itself. Measured in the UML lab (figures printed by
    tests/lab/test_host_hold.py): the node appears 10-190 ms after the scan,
    udev's rules need 0.3-2 s more (load-dependent; the wait that matters),
    and multipathd's uevent handling has the path usable 0.2-0.3 s after
    udev (median 0.21 s), an immediate explicit add 0.24-0.66 s (median
    0.36-0.42 s: the client round trip contends with the uevent handler).
    A disk that lands in another map (another WWID) is a HostError.
    """

    def usable() -> PathInfo | None:
        found = next((p for p in paths() if p.dev == dev), None)
        if found and found.map_name and found.map_name != map_name:
            raise HostError(f"{dev} joined map {found.map_name}, not {map_name}: another WWID")
        return found if found and found.map_name == map_name and found.usable else None

    wait_for_udev(dev, timeout)
    try:  # multipathd's own uevent handling, which the lab measured faster than a client round trip
        wait_until(lambda: is_path_in_table(map_name, dev), f"multipathd to add {dev}", min(grace, timeout))
    except HostError:  # a missed or slow uevent: add it ourselves (idempotent)
        wait_until(_accepts_path(dev), f"multipathd to accept {dev} as a path", timeout)
    wait_until(lambda: is_path_in_table(map_name, dev), f"{dev} to be in the table of map {map_name}", timeout)
    return wait_until(usable, f"{dev} to be a usable path of map {map_name}", timeout)


def _accepts_path(dev: str):
    def accepted() -> bool:
        try:
            add_path(dev)
        except HostError:
            return False
        return True

    return accepted


def is_path_in_table(map_name: str, dev: str) -> bool:
    """Whether the kernel's table of the map uses disk `dev` (sysfs holders: no multipathd round trip)."""
    return os.path.exists(f"/sys/block/{dev}/holders/{_dm_name(map_name)}")


def del_path(dev: str) -> None:
    multipathd("del", "path", dev)


def reconfigure(settle_for: float = 5.0) -> None:
    """`multipathd reconfigure`, host-wide one at a time, and never while a multipath map is suspended.

    A reconfigure reloads every map, and a reload resumes a suspended one: another blockmig's hold
    or suspend fence (or an admin's `dmsetup suspend`) would let IO through, onto a map that may have
    no path. Under the control-plane lock no blockmig suspends a map meanwhile; a suspension that
    outlasts multipathd's own reloads (`settle_for` s) is refused by name.
    """
    with HostControlPlane():
        try:
            wait_until(lambda: not suspended_multipath_maps(), "no multipath map to be suspended", settle_for)
        except HostError:
            held = ", ".join(suspended_multipath_maps()) or "?"
            raise HostError(f"not running multipathd reconfigure: map(s) {held} suspended (a switch or a suspend "
                            "fence holds their IO, and a reconfigure would resume them); retry once resumed") from None
        multipathd("reconfigure")


def suspended_multipath_maps(sys_root: str = "/sys") -> list[str]:
    """Names of the host's multipath maps that are suspended now (sysfs: dm/uuid mpath-*, dm/suspended 1)."""
    found = []
    for dm in sorted(_listdir(f"{sys_root}/block")):
        base = f"{sys_root}/block/{dm}/dm"
        if dm.startswith("dm-") and read_attribute(f"{base}/uuid").startswith("mpath-"):
            if read_attribute(f"{base}/suspended") == "1":
                found.append(read_attribute(f"{base}/name") or dm)
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def flush_map(name: str, timeout: float = 10) -> None:
    """Remove the map (multipath -f); refused while something holds it open.

    Right after a path change, udev's probes and multipathd's reload hold the
    map for a moment ("map in use"), so that answer is retried until `timeout`.
    """
    refusals = []

    def flushed() -> bool:
        try:
            _run(["multipath", "-f", name], f"cannot flush multipath map {name}")
        except HostError as exc:
            if "in use" not in str(exc):
                raise
            refusals.append(exc)
            return False
        return True

    settle(timeout)
    try:
        wait_until(flushed, f"map {name} to be free to flush", timeout)
    except HostError:
        if not refusals:
            raise HostError(f"cannot flush multipath map {name}") from None
        from blockmig.host.usage import volume_users  # usage reads the maps' users; it needs no multipath

        users = volume_users(f"/dev/mapper/{name}")
        held_by = users.describe() if users.in_use else (
            "no mount, opener or stacked map is left: the kernel holds it (a lazily unmounted filesystem?)")
        raise HostError(f"{refusals[-1]}; held by: {held_by}") from None


def suspend_map(name: str, lockfs: bool = True, flush: bool = True) -> None:
    """Hold the host's IO on the map (queued in dm) until resume_map.

    lockfs (the default) freezes a filesystem mounted on the map; the
    freeze writes, so it fails (EIO) when the only path is write-protected,
    and the dm resume that ends it thaws the filesystem: if multipathd does
    that resume while reloading the map with no path (`del path`), the
    thaw's superblock write queues on the path-less map and multipathd
    hangs in the ioctl (measured, ext4). With a mounted filesystem, freeze
    it with freeze_filesystem while the path accepts writes, then suspend
    with lockfs=False. flush=False (--noflush) leaves IO queued in the
    multipath target instead of completing it first.
    """
    args = ["dmsetup", "suspend", *([] if lockfs else ["--nolockfs"]), *([] if flush else ["--noflush"]), name]
    _run(args, f"cannot suspend map {name}")


def resume_map(name: str) -> None:
    _run(["dmsetup", "resume", name], f"cannot resume map {name}")


def freeze_filesystem(mountpoint: str) -> None:
    """Flush and freeze a mounted filesystem (FIFREEZE): writers wait, nothing is left to write.

    A freeze made here is not undone by a dm resume (multipathd's reloads
    resume the map), only by thaw_filesystem; do it while the map's path
    still accepts writes (the freeze writes the journal and superblock).
    """
    _ioctl_mountpoint(mountpoint, FIFREEZE, "freeze")


def thaw_filesystem(mountpoint: str) -> None:
    """Undo freeze_filesystem once the map has a usable path again (the thaw writes)."""
    _ioctl_mountpoint(mountpoint, FITHAW, "thaw")


FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


def _ioctl_mountpoint(mountpoint: str, request: int, what: str) -> None:
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise HostError(f"cannot open {mountpoint} to {what} its filesystem: {exc.strerror}") from exc
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        raise HostError(f"cannot {what} the filesystem on {mountpoint}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def flush_maps_on(devs: list[str]) -> list[str]:
    """Flush every map that has one of these disks as a path (the first step of a safe teardown)."""
    names = sorted({p.map_name for p in paths() if p.dev in devs and p.map_name})
    for name in names:
        flush_map(name)
    return names


# --- added by the migrate branch (orchestrator needs) ---------------------------


def is_suspended(name: str) -> bool:
    """True while the map's IO is held (dmsetup suspend, or a reload in progress); from sysfs, no dmsetup round trip."""
    state = read_attribute(f"/sys/block/{_dm_name(name)}/dm/suspended")
    if state not in ("0", "1"):
        raise HostError(f"cannot read state of map {name}: no such device-mapper device")
    return state == "1"


def _dm_name(map_name: str) -> str:
    """dm-N of /dev/mapper/NAME (udev's symlink)."""
    return os.path.basename(os.path.realpath(f"/dev/mapper/{map_name}"))


def flush_buffers(name: str) -> None:
    """Write the host's dirty page cache of the map to its paths (before a fence or a switch)."""
    _run(["blockdev", "--flushbufs", f"/dev/mapper/{name}"], f"cannot flush buffers of map {name}")


def queueing_state(name: str) -> str:
    """multipathd's queueing state of the map: "on", "off", "-" or the countdown left ("24 sec", "12 chk")."""
    for line in multipathd("show", "maps", "raw", "format", "%n %Q").splitlines():
        map_name, _, state = line.partition(" ")
        if map_name == name:
            return state.strip()
    raise HostError(f"multipathd has no map {name}")


@dataclass(frozen=True)
class QueueHold:
    """What hold_queueing changed, for restore_queueing."""

    name: str
    queueing: bool  # the table queued when no path was left before the hold


def hold_queueing(name: str, known_to_queue: bool = False) -> QueueHold:
    """Make IO on the map wait, whatever multipathd's no_path_retry countdown does, until the map has a path again.

    Measured on multipath-tools 0.9.4 in the lab (LIO's built-in entry:
    no_path_retry 12, polling_interval 2): when the map's last path goes,
    multipathd starts a countdown of no_path_retry x polling_interval + 1 s
    (%Q shows "25 sec"), then sends fail_if_no_path and queued IO fails
    with EIO (24.5 s after the path went). Neither `dmsetup message MAP 0
    queue_if_no_path` (EIO at 24.5 s) nor `multipathd restorequeueing`
    (EIO at 23.5 s) extends it. What holds: a suspended map maps no IO at
    all, and multipathd's own reload (the path added back) resumes it. So
    the hold turns queueing on in the table and suspends the map without
    lockfs and without flush (IO queued in the target stays queued); call
    it after the last path is gone (multipathd's `del path` resumes the map).
    `known_to_queue`: the table is known to queue (checked earlier), so it is not asked: a
    suspended map refuses the message and hides the setting.
    """
    hold = QueueHold(name, known_to_queue or queues_if_no_path(name))
    if not hold.queueing:
        _run(["dmsetup", "message", name, "0", "queue_if_no_path"], f"cannot turn on queueing of map {name}")
    if not is_suspended(name):
        suspend_map(name, lockfs=False, flush=False)
    return hold


def restore_queueing(hold: QueueHold) -> None:
    """After the map has a usable path again: resume it if still suspended and give queueing back to multipathd.

    `restorequeueing` re-applies the configured no_path_retry (multipathd
    may have sent fail_if_no_path while the map was held).
    """
    if is_suspended(hold.name):
        resume_map(hold.name)
    if hold.queueing:
        multipathd("restorequeueing", "map", hold.name)
    else:
        _run(["dmsetup", "message", hold.name, "0", "fail_if_no_path"], f"cannot turn off queueing of map {hold.name}")


def logical_block_size(device: str) -> int:
    """The logical block size of a block device (a map's dm-N, or sdX), from sysfs."""
    name = os.path.basename(os.path.realpath(device))
    size = read_attribute(f"/sys/block/{name}/queue/logical_block_size")
    if not size.isdigit():
        raise HostError(f"{device} has no logical block size in sysfs (not a block device?)")
    return int(size)


def queues_if_no_path(name: str) -> bool:
    """Whether the map holds IO (instead of failing it) while it has no usable path."""
    table = _run(["dmsetup", "table", name], f"cannot read table of map {name}")
    return "queue_if_no_path" in table
