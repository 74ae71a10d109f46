"""dm-multipath on the host: multipathd for maps and paths, dmsetup to hold IO.

multipathd groups SCSI disks with the same WWID into one map; that is what
lets blockmig add the destination's path and drop the source's under a host
that keeps using /dev/mapper/NAME. Listings use multipathd's `raw format`
mode (no padding, no header), fields separated by a space; the only field
that can hold a space (the checker state, "i/o pending") comes last.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from blockmig.errors import HostError
from blockmig.host.udev import DEFAULT_TIMEOUT, settle, wait_for_path, wait_until

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
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise HostError(f"{args[0]} not found: install multipath-tools / dmsetup") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"{what}: {' '.join(args)} did not finish within 120 s") from None
    output = (result.stdout + result.stderr).strip()
    # multipathd's client exits 0 even when the daemon answers "fail".
    if result.returncode != 0 or output.splitlines()[-1:] == ["fail"]:
        message = output.splitlines()[-1] if output else f"exit {result.returncode}"
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


def del_path(dev: str) -> None:
    multipathd("del", "path", dev)


def reconfigure() -> None:
    multipathd("reconfigure")


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
        raise refusals[-1] if refusals else HostError(f"cannot flush multipath map {name}") from None


def suspend_map(name: str) -> None:
    """Hold the host's IO on the map (queued in dm) until resume_map."""
    _run(["dmsetup", "suspend", name], f"cannot suspend map {name}")


def resume_map(name: str) -> None:
    _run(["dmsetup", "resume", name], f"cannot resume map {name}")


def flush_maps_on(devs: list[str]) -> list[str]:
    """Flush every map that has one of these disks as a path (the first step of a safe teardown)."""
    names = sorted({p.map_name for p in paths() if p.dev in devs and p.map_name})
    for name in names:
        flush_map(name)
    return names


# --- added by the migrate branch (orchestrator needs) ---------------------------


def is_suspended(name: str) -> bool:
    """True while the map's IO is held (dmsetup suspend, or a reload in progress)."""
    state = _run(["dmsetup", "info", "-c", "--noheadings", "-o", "suspended", name], f"cannot read state of map {name}")
    return state.strip() == "Suspended"


def flush_buffers(name: str) -> None:
    """Write the host's dirty page cache of the map to its paths (before a fence or a switch)."""
    _run(["blockdev", "--flushbufs", f"/dev/mapper/{name}"], f"cannot flush buffers of map {name}")


def queues_if_no_path(name: str) -> bool:
    """Whether the map holds IO (instead of failing it) while it has no usable path."""
    table = _run(["dmsetup", "table", name], f"cannot read table of map {name}")
    return "queue_if_no_path" in table
