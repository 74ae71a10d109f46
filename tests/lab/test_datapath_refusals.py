"""Inside the lab VM: refusals the build machine's kernel cannot show.

A destination held by a real device-mapper map (the unit suite uses a stand-in
sysfs tree: no device-mapper there), and a destination that is a partition of
the source (no partition table support there). Needs root, losetup and dmsetup;
it fails (never skips) when they are missing.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

from migrate_support import blockmig_env

MiB = 1024 * 1024


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_copy_refuses_a_destination_held_by_a_dm_map(tmp_path):
    (tmp_path / "src.img").write_bytes(os.urandom(4 * MiB))
    (tmp_path / "dst.img").write_bytes(b"\x5a" * 4 * MiB)
    source = run("losetup", "--find", "--show", str(tmp_path / "src.img"))
    destination = run("losetup", "--find", "--show", str(tmp_path / "dst.img"))
    map_name = f"blockmig-holder-{os.getpid()}"
    try:
        run("dmsetup", "create", map_name, "--table", f"0 {4 * MiB // 512} linear {destination} 0")
        dm_device = os.path.basename(os.path.realpath(f"/dev/mapper/{map_name}"))
        result = subprocess.run(
            [sys.executable, "-m", "blockmig", "copy", source, destination, "--journal", str(tmp_path / "j.json")],
            capture_output=True, text=True, env=blockmig_env(),
        )
        major_minor = f"{os.major(os.stat(destination).st_rdev)}:{os.minor(os.stat(destination).st_rdev)}"
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"blockmig: error: destination {destination} is held by {dm_device} (/sys/dev/block/{major_minor}/holders)"
        ]
    finally:
        subprocess.run(["dmsetup", "remove", map_name], capture_output=True)
        subprocess.run(["losetup", "--detach", source], capture_output=True)
        subprocess.run(["losetup", "--detach", destination], capture_output=True)
    assert hashlib.sha256((tmp_path / "dst.img").read_bytes()).digest() == hashlib.sha256(b"\x5a" * 4 * MiB).digest()
    assert not (tmp_path / "j.json").exists()


def test_copy_refuses_a_destination_that_is_a_partition_of_the_source(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * 8 * MiB)
    with open(image, "r+b") as disk:  # an MBR with one Linux partition from sector 2048 to the end
        disk.seek(446)
        disk.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 8 * MiB // 512 - 2048))
        disk.write(bytes(48))  # empty slots 2-4: the kernel rejects a table whose boot flags are not 0 or 0x80
        disk.seek(510)
        disk.write(b"\x55\xaa")
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    source = run("losetup", "--partscan", "--find", "--show", str(image))
    try:
        name = os.path.basename(source)
        major, minor = (int(n) for n in Path(f"/sys/block/{name}/{name}p1/dev").read_text().split(":"))
        partition = str(tmp_path / "partition")  # our own node: no waiting for udev
        os.mknod(partition, 0o600 | 0o060000, os.makedev(major, minor))
        disk = os.stat(source).st_rdev
        result = subprocess.run(
            [sys.executable, "-m", "blockmig", "copy", source, partition, "--journal", str(tmp_path / "j.json")],
            capture_output=True, text=True, env=blockmig_env(),
        )
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"blockmig: error: source {source} and destination {partition} are the same device "
            f"({major}:{minor} is a partition of {os.major(disk)}:{os.minor(disk)})"
        ]
    finally:
        subprocess.run(["losetup", "--detach", source], capture_output=True)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
