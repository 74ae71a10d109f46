"""Who uses a host block device: devices stacked on it, mounts, processes writing it.

A migration that write-protects or holds a map under a mounted read-write
filesystem or a writing process breaks them (writes fail, a freeze cannot
write); the planner asks here first. The kernel's view is read directly:
holders and partitions from sysfs, mounts from mountinfo (by device number,
whatever name was mounted), open descriptors from /proc/PID/fd and their
access mode from /proc/PID/fdinfo (psutil's open_files lists regular files
only).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

import psutil

from blockmig.errors import HostError, UsageError
from blockmig.sysfs import read_attribute

O_ACCMODE = 0o3


@dataclass(frozen=True)
class Mount:
    device: str  # kernel name of the mounted device (dm-1, sdb1): one superblock per device
    mountpoint: str  # as the mount's own namespace sees it
    fstype: str
    read_write: bool
    namespace_pid: int = 0  # 0: this process's mount namespace; else a process of the namespace it is in

    @property
    def path(self) -> str:
        """The mountpoint as this process reaches it (another namespace's through /proc/PID/root)."""
        return self.mountpoint if not self.namespace_pid else f"/proc/{self.namespace_pid}/root{self.mountpoint}"

    @property
    def where(self) -> str:
        own = "" if not self.namespace_pid else f" in the mount namespace of pid {self.namespace_pid}"
        return f"{self.mountpoint}{own}"


@dataclass(frozen=True)
class Opener:
    pid: int
    name: str  # the process's name
    device: str  # kernel name of the device it has open
    writing: bool  # opened O_WRONLY or O_RDWR


@dataclass(frozen=True)
class VolumeUsers:
    device: str  # kernel name of the device asked about (dm-0)
    tree: tuple[str, ...]  # it and everything stacked on it: partitions, holders, recursively
    mounts: tuple[Mount, ...]
    openers: tuple[Opener, ...]
    swaps: tuple[str, ...] = ()  # kernel names of devices of the tree in use as swap (no process holds those)

    @property
    def mounted_rw(self) -> bool:
        return any(m.read_write for m in self.mounts)

    @property
    def rw_mountpoints(self) -> tuple[str, ...]:
        """What a switch freezes (multipath.freeze_filesystem) while the path still accepts writes: one path per
        filesystem (a bind mount or another namespace's mount is the same superblock, and a second FIFREEZE of
        it fails with EBUSY), this namespace's mount where there is one, else another's via /proc/PID/root."""
        chosen: dict[str, Mount] = {}
        for mount in sorted(self.mounts, key=lambda m: m.namespace_pid != 0):  # stable: ours first
            if mount.read_write and mount.device not in chosen:
                chosen[mount.device] = mount
        return tuple(mount.path for mount in chosen.values())

    @property
    def writers(self) -> tuple[Opener, ...]:
        return tuple(o for o in self.openers if o.writing)

    @property
    def in_use(self) -> bool:
        return bool(self.mounts or self.openers or self.swaps or len(self.tree) > 1)

    def describe(self) -> str:
        """One line for a refusal or a plan: 'ext4 on /mnt/data mounted read-write; pid 123 (appender) has it open for writing'."""
        parts = []
        for mount in self.mounts:
            mode = "read-write" if mount.read_write else "read-only"
            parts.append(f"{mount.fstype} on {mount.where} mounted {mode}{self._via(mount.device)}")
        for opener in self.openers:
            mode = "for writing" if opener.writing else "for reading"
            parts.append(f"pid {opener.pid} ({opener.name}) has it open {mode}{self._via(opener.device)}")
        parts += [f"swap on /dev/{name}" for name in self.swaps]
        stacked = [name for name in self.tree[1:] if not any(name == m.device for m in self.mounts)]
        if stacked:
            parts.append(f"{', '.join(stacked)} stacked on it")
        return "; ".join(parts) if parts else f"{self.device} is not in use"

    def _via(self, name: str) -> str:
        return "" if name == self.device else f" (via {name})"


def volume_users(device: str, sys_root: str = "/sys", proc_root: str = "/proc") -> VolumeUsers:
    """Everything that uses `device` (/dev/mapper/NAME, /dev/dm-N, /dev/sdX) or a device stacked on it."""
    name = os.path.basename(os.path.realpath(device))
    if not os.path.isdir(f"{sys_root}/class/block/{name}"):
        raise HostError(f"{device} is not a block device the kernel knows ({sys_root}/class/block/{name} missing)")
    tree = device_tree(name, sys_root)
    numbers = {device_number(n, sys_root): n for n in tree}
    mounts = tuple(mount for pid, text in mount_tables(proc_root) for mount in parse_mountinfo(text, numbers, pid))
    swaps = tuple(swap_devices(read_attribute(f"{proc_root}/swaps"), numbers))
    return VolumeUsers(name, tuple(tree), mounts, tuple(find_openers(numbers, proc_root)), swaps)


def refuse_users_of_a_bare_disk(device: str) -> None:
    """A relogin switch of a disk no multipath map holds takes the disk away and brings a new one: whatever
    uses it (a mount even read-only, a reader, swap, a partition's user, a dm map on it) gets EIO meanwhile.
    Refused at plan, naming them."""
    users = volume_users(device)
    if users.in_use:
        raise UsageError(
            f"{device} is in use ({users.describe()}): --switch relogin of a disk without a multipath map "
            "logs it out and in, and every user gets I/O errors meanwhile; stop them first"
        )


def swap_devices(text: str, numbers: dict[tuple[int, int], str]) -> list[str]:
    """Kernel names of the devices of `numbers` that /proc/swaps (`text`) lists."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 2 or fields[1] != "partition":
            continue
        try:
            st = os.stat(_unescape(fields[0]))
        except OSError:
            continue
        number = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if stat.S_ISBLK(st.st_mode) and number in numbers:
            found.append(numbers[number])
    return found


def mount_tables(proc_root: str = "/proc") -> list[tuple[int, str]]:
    """Each mount namespace's mountinfo once: (0, this process's), then (PID, another's) for one process in it.

    A container's mount of the volume is as much a user as one here: its writes fail under a fence
    and its filesystem must be frozen for a switch (through /proc/PID/root/MOUNTPOINT).
    """
    with open(f"{proc_root}/self/mountinfo") as f:
        tables = [(0, f.read())]
    seen = {_namespace(f"{proc_root}/self")}
    for entry in sorted((e for e in _listdir(proc_root) if e.isdigit()), key=int):
        namespace = _namespace(f"{proc_root}/{entry}")
        if namespace is None or namespace in seen:
            continue
        try:
            with open(f"{proc_root}/{entry}/mountinfo") as f:
                tables.append((int(entry), f.read()))
        except OSError:
            continue  # gone meanwhile: another process of that namespace is read instead
        seen.add(namespace)
    return tables


def _namespace(process_dir: str) -> tuple[int, int] | None:
    """The identity of a process's mount namespace (the nsfs inode of /proc/PID/ns/mnt)."""
    try:
        st = os.stat(f"{process_dir}/ns/mnt")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def device_tree(name: str, sys_root: str = "/sys") -> list[str]:
    """`name`, then its partitions and holders (dm devices, LVs, md), depth first, each once."""
    found: list[str] = []
    pending = [name]
    while pending:
        current = pending.pop(0)
        if current in found:
            continue
        found.append(current)
        base = f"{sys_root}/class/block/{current}"
        pending += sorted(
            entry for entry in _listdir(base)
            if entry.startswith(current) and os.path.exists(f"{base}/{entry}/partition")
        )
        pending += sorted(_listdir(f"{base}/holders"))
    return found


def device_number(name: str, sys_root: str = "/sys") -> tuple[int, int]:
    """(major, minor) of a block device from sysfs."""
    text = read_attribute(f"{sys_root}/class/block/{name}/dev")
    major, _, minor = text.partition(":")
    if not (major.isdigit() and minor.isdigit()):
        raise HostError(f"block device {name} has no device number in sysfs (gone?)")
    return int(major), int(minor)


def parse_mountinfo(text: str, numbers: dict[tuple[int, int], str], namespace_pid: int = 0) -> list[Mount]:
    """Mounts (proc(5) mountinfo lines) of the devices whose numbers are keys of `numbers`.

    `namespace_pid`: the process whose mountinfo this is (0: this process's).
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 6:
            continue
        separator = fields.index("-")
        major, _, minor = fields[2].partition(":")
        number = (int(major), int(minor))
        if number not in numbers or len(fields) < separator + 2:
            continue
        read_write = "rw" in fields[5].split(",")
        mounts.append(Mount(numbers[number], _unescape(fields[4]), fields[separator + 1], read_write,
                            namespace_pid))
    return mounts


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\040 style octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def find_openers(numbers: dict[tuple[int, int], str], proc_root: str = "/proc") -> list[Opener]:
    """Processes with one of these block devices open, with whether each opened it for writing."""
    openers = []
    for process in psutil.process_iter(["name"]):
        pid = process.pid
        fd_dir = f"{proc_root}/{pid}/fd"
        for fd in _listdir(fd_dir):
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue  # closed meanwhile, or not ours to see
            if not stat.S_ISBLK(st.st_mode):
                continue
            number = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if number in numbers:
                writing = _fd_flags(f"{proc_root}/{pid}/fdinfo/{fd}") & O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
                opener = Opener(pid, process.info["name"] or "?", numbers[number], writing)
                if opener not in openers:
                    openers.append(opener)
    return openers


def _fd_flags(fdinfo: str) -> int:
    for line in read_attribute(fdinfo).splitlines():
        key, _, value = line.partition(":")
        if key == "flags":
            return int(value.strip(), 8)
    return 0


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
