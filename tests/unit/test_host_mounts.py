"""Mounts of a volume as the kernel has them: bind mounts, other mount namespaces, swap (real loop devices).

The same superblock mounted twice (a bind mount, a container's mount) is one filesystem to freeze: a
second FIFREEZE of it fails with EBUSY. A mount made in another mount namespace (`unshare -m`) is a
user as much as one here, and is frozen through /proc/PID/root.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from blockmig.errors import HostError, UsageError
from blockmig.host import multipath
from blockmig.host.usage import refuse_users_of_a_bare_disk, volume_users

SIZE = 32 * 1024 * 1024


def run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def mounted(device: str, mountpoint, *options: str):
    os.makedirs(mountpoint, exist_ok=True)
    run("mount", *options, device, str(mountpoint))
    try:
        yield str(mountpoint)
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)


@pytest.fixture
def ext4(loops):
    device = loops.attach("fs", SIZE)
    run("mkfs.ext4", "-q", device)
    return device


def freeze_and_thaw(paths) -> None:
    for path in paths:
        multipath.freeze_filesystem(path)
    for path in paths:
        multipath.thaw_filesystem(path)


def test_a_bind_mount_is_frozen_once(ext4, tmp_path):
    with mounted(ext4, tmp_path / "a"), mounted(str(tmp_path / "a"), tmp_path / "b", "--bind"):
        users = volume_users(ext4)
        assert sorted(m.mountpoint for m in users.mounts) == [str(tmp_path / "a"), str(tmp_path / "b")]
        assert users.rw_mountpoints == (str(tmp_path / "a"),)
        freeze_and_thaw(users.rw_mountpoints)
        with pytest.raises(HostError, match="Device or resource busy"):  # what freezing every mount did
            freeze_and_thaw([str(tmp_path / "a"), str(tmp_path / "b")])
        multipath.thaw_filesystem(str(tmp_path / "a"))
    run("fsck.ext4", "-n", ext4)


@contextlib.contextmanager
def mounted_in_another_namespace(device: str, mountpoint: str, *options: str):
    """A process in a new mount namespace mounts `device` there alone (as a container would)."""
    os.makedirs(mountpoint, exist_ok=True)
    script = f"mount {' '.join(options)} {device} {mountpoint} && echo ready && read line"
    process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        yield process.pid
    finally:
        process.stdin.close()
        process.wait(timeout=30)


def test_a_mount_in_another_namespace_counts_and_is_frozen_through_proc(ext4, tmp_path):
    mountpoint = str(tmp_path / "container")
    assert not volume_users(ext4).mounts
    with mounted_in_another_namespace(ext4, mountpoint) as pid:
        with open("/proc/self/mountinfo") as f:
            assert mountpoint not in f.read()  # not ours to see: it is in the other namespace only
        users = volume_users(ext4)
        assert [(m.mountpoint, m.namespace_pid, m.read_write) for m in users.mounts] == [(mountpoint, pid, True)]
        assert users.mounted_rw
        assert f"ext4 on {mountpoint} in the mount namespace of pid {pid} mounted read-write" in users.describe()
        assert users.rw_mountpoints == (f"/proc/{pid}/root{mountpoint}",)
        freeze_and_thaw(users.rw_mountpoints)
        # Mounted here as well: one freeze, through our own mount.
        with mounted(ext4, tmp_path / "here"):
            users = volume_users(ext4)
            assert len(users.mounts) == 2 and users.rw_mountpoints == (str(tmp_path / "here"),)
    run("fsck.ext4", "-n", ext4)


def test_a_bare_disk_in_any_use_is_refused_for_relogin(ext4, loops, tmp_path):
    refuse_users_of_a_bare_disk(ext4)  # unused: fine
    with mounted(ext4, tmp_path / "ro", "-o", "ro"):
        with pytest.raises(UsageError) as refused:
            refuse_users_of_a_bare_disk(ext4)
        assert f"ext4 on {tmp_path / 'ro'} mounted read-only" in str(refused.value)
    with mounted_in_another_namespace(ext4, str(tmp_path / "ns"), "-o", "ro") as pid:
        with pytest.raises(UsageError, match=f"in the mount namespace of pid {pid} mounted read-only"):
            refuse_users_of_a_bare_disk(ext4)
    reader = os.open(ext4, os.O_RDONLY)
    try:
        with pytest.raises(UsageError, match=rf"pid {os.getpid()} \(.*\) has it open for reading"):
            refuse_users_of_a_bare_disk(ext4)
    finally:
        os.close(reader)
    swap = loops.attach("swap", SIZE)
    run("mkswap", "-q", swap)
    run("swapon", swap)
    try:
        users = volume_users(swap)
        assert users.swaps == (os.path.basename(swap),) and users.in_use
        with pytest.raises(UsageError, match=f"swap on {swap}"):
            refuse_users_of_a_bare_disk(swap)
    finally:
        run("swapoff", swap)
    refuse_users_of_a_bare_disk(ext4)
    refuse_users_of_a_bare_disk(swap)
