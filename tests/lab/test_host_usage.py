"""Who uses the host's map: filesystems (ext4, xfs) mounted on it or on a partition of it, processes writing it."""

import os
import struct
import subprocess
import sys

import pytest
from host_support import fs_volume_map

from blockmig import lab
from blockmig.host import multipath, udev
from blockmig.host.usage import volume_users

HOLDER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
print("open", flush=True)
time.sleep(600)
"""


@pytest.fixture
def source_map(lab_env):
    return multipath.map_for_wwid(lab.SOURCE_WWID)


def test_an_unused_map_is_clean(source_map):
    users = volume_users(source_map.device)
    assert users.device == source_map.dm and users.tree == (source_map.dm,)
    assert not users.mounts and not users.openers and not users.mounted_rw and not users.writers
    assert not users.in_use and users.describe() == f"{source_map.dm} is not in use"


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_mounted_filesystem_read_write_then_read_only(source_map, tmp_path, fstype, backing_dir):
    if fstype == "xfs":  # mkfs.xfs wants 300 MiB: a volume of its own on the source array
        found = fs_volume_map(backing_dir)
    else:
        found = source_map
    subprocess.run([f"mkfs.{fstype}", "-q", "-f" if fstype == "xfs" else "-F", found.device], check=True)
    mountpoint = tmp_path / "data dir"  # a space: mountinfo escapes it
    mountpoint.mkdir()
    subprocess.run(["mount", found.device, str(mountpoint)], check=True)
    try:
        udev.settle()  # a udev worker probing the freshly mounted device would count as an opener
        users = volume_users(found.device)
        assert users.mounted_rw and [m.mountpoint for m in users.mounts] == [str(mountpoint)]
        assert users.mounts[0].fstype == fstype and users.mounts[0].device == found.dm
        assert users.describe() == f"{fstype} on {mountpoint} mounted read-write"
        subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)
        udev.settle()
        users = volume_users(f"/dev/{found.dm}")
        assert not users.mounted_rw and users.in_use
        assert users.describe() == f"{fstype} on {mountpoint} mounted read-only"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    udev.settle()
    assert not volume_users(found.device).in_use


def write_mbr_with_one_partition(device, start_sector=2048, sectors=8192):
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start_sector, sectors)
    with open(device, "r+b") as f:
        f.seek(446)
        f.write(entry + b"\0" * 48 + b"\x55\xaa")
        f.flush()
        os.fsync(f.fileno())


def test_a_partition_with_a_filesystem_on_the_map(source_map, tmp_path):
    write_mbr_with_one_partition(source_map.device)
    subprocess.run(["kpartx", "-a", "-s", source_map.device], check=True, capture_output=True)
    try:
        holders = udev.wait_until(lambda: os.listdir(f"/sys/block/{source_map.dm}/holders"), "the partition map")
        partition = holders[0]
        subprocess.run(["mkfs.ext4", "-q", "-F", f"/dev/{partition}"], check=True)
        mountpoint = tmp_path / "part"
        mountpoint.mkdir()
        subprocess.run(["mount", f"/dev/{partition}", str(mountpoint)], check=True)
        try:
            users = volume_users(source_map.device)
            assert users.tree == (source_map.dm, partition)
            assert users.mounted_rw and users.mounts[0].device == partition
            assert users.describe() == f"ext4 on {mountpoint} mounted read-write (via {partition})"
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
        # the umount's change event has a udev worker probe (open) the partition for a moment
        udev.wait_until(lambda: not volume_users(source_map.device).openers, "udev's probe to end", 10)
        users = volume_users(source_map.device)
        assert users.in_use and not users.mounts and users.describe() == f"{partition} stacked on it"
    finally:
        subprocess.run(["kpartx", "-d", source_map.device], check=True, capture_output=True)


def test_a_process_holding_the_map_open_for_writing(source_map):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, source_map.device], stdout=subprocess.PIPE, text=True)
    reader_fd = os.open(source_map.device, os.O_RDONLY)
    try:
        assert holder.stdout.readline() == "open\n"
        users = volume_users(source_map.device)
        writers = users.writers
        assert [(w.pid, w.device) for w in writers] == [(holder.pid, source_map.dm)]
        assert any(o.pid == os.getpid() and not o.writing for o in users.openers)
        assert not users.mounted_rw
        assert f"pid {holder.pid} ({writers[0].name}) has it open for writing" in users.describe()
    finally:
        os.close(reader_fd)
        holder.kill()
        holder.wait()
    assert not volume_users(source_map.device).writers
