"""Every pre-write refusal: one line on stderr, non-zero exit, destination and journal untouched."""

from __future__ import annotations

import os
import subprocess

import pytest
from datapath_helpers import MiB, attach_loop_device, run_blockmig, volume_sha256, write_random_file

from blockmig.datapath import copy_volume
from blockmig.datapath.blockdev import check_destination_unused
from blockmig.errors import UsageError

NOBODY = 65534


def assert_refused(args: list[str], message: str, destination: str, journal: str, user: int | None = None) -> None:
    before = volume_sha256(destination)
    result = run_blockmig("copy", *args, "--journal", journal, user=user)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"blockmig: error: {message}"]
    assert result.stdout == ""
    assert volume_sha256(destination) == before, "the destination was written"
    assert not os.path.exists(journal), "a journal was left behind"


def test_destination_smaller_than_source(loops, tmp_path):
    source = loops.attach("src", 8 * MiB, seed=1)
    destination = loops.attach("dst", 8 * MiB - 4096, seed=2)
    assert_refused([source, destination],
                   f"destination {destination} ({8 * MiB - 4096} bytes) is smaller than source {source} ({8 * MiB} bytes)",
                   destination, str(tmp_path / "j.json"))


def test_same_device_under_two_paths(loops, tmp_path):
    source = loops.attach("src", 4 * MiB, seed=1)
    alias = str(tmp_path / "alias")
    os.mknod(alias, 0o600 | 0o060000, os.stat(source).st_rdev)  # another node for the same device
    major_minor = f"{os.major(os.stat(source).st_rdev)}:{os.minor(os.stat(source).st_rdev)}"
    assert_refused([source, alias],
                   f"source {source} and destination {alias} are the same device ({major_minor})",
                   source, str(tmp_path / "j.json"))


def test_two_loop_devices_over_one_image(loops, tmp_path):
    source = loops.attach("src", 4 * MiB, seed=1)
    second = attach_loop_device(str(tmp_path / "src.img"))
    loops.adopt(second)
    assert_refused([source, second],
                   f"source {source} and destination {second} are the same device (loop:{tmp_path}/src.img)",
                   source, str(tmp_path / "j.json"))


def test_destination_mounted(loops, tmp_path):
    source = loops.attach("src", 8 * MiB, seed=1)
    destination = loops.attach("dst", 8 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", destination], check=True, capture_output=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "ro", destination, str(mountpoint)], check=True)  # ro: the fs writes nothing itself
    try:
        before = volume_sha256(destination)
        result = run_blockmig("copy", source, destination, "--journal", str(tmp_path / "j.json"))
        assert result.stderr.splitlines() == [f"blockmig: error: destination {destination} is mounted on {mountpoint}"]
        assert result.returncode == 2
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    assert volume_sha256(destination) == before
    assert not (tmp_path / "j.json").exists()


def test_destination_open_exclusively_elsewhere(loops, tmp_path):
    source = loops.attach("src", 4 * MiB, seed=1)
    destination = loops.attach("dst", 4 * MiB, seed=2)
    holder = os.open(destination, os.O_RDONLY | os.O_EXCL)
    try:
        assert_refused([source, destination], f"destination {destination} is open exclusively by another process",
                       destination, str(tmp_path / "j.json"))
    finally:
        os.close(holder)


def test_destination_held_by_another_device(tmp_path):
    """No device-mapper on this machine, so a sysfs tree stands in for a dm map holding the device.

    The same check against a real dm map over a loop device is tests/lab/test_datapath_refusals.py.
    """
    device = tmp_path / "sys/dev/block/7:9"
    (device / "holders" / "dm-3").mkdir(parents=True)
    (tmp_path / "mountinfo").write_text("")
    with pytest.raises(UsageError) as refused:
        check_destination_unused("/dev/loop9", os.makedev(7, 9), str(tmp_path / "sys"), str(tmp_path / "mountinfo"))
    assert str(refused.value) == f"destination /dev/loop9 is held by dm-3 ({device}/holders)"


def test_chunk_size_not_a_multiple_of_the_logical_block_size(loops, tmp_path):
    """The command line refuses any chunk that is not a multiple of 4096; the engine checks the block size too."""
    source = loops.attach("src", 4 * MiB, seed=1, sector_size=4096)
    destination = loops.attach("dst", 4 * MiB, seed=2, sector_size=4096)
    assert_refused([source, destination, "--chunk-size", "6K"],
                   "argument --chunk-size: chunk size 6144 is not a multiple of 4096 (see blockmig copy --help)",
                   destination, str(tmp_path / "j.json"))
    before = volume_sha256(destination)
    with pytest.raises(UsageError, match="chunk size 6144 is not a positive multiple of the logical block size 4096"):
        copy_volume(source, destination, str(tmp_path / "j.json"), chunk_size=6144)
    assert volume_sha256(destination) == before and not os.path.exists(tmp_path / "j.json")


def test_source_size_not_a_multiple_of_the_destination_block_size(loops, tmp_path):
    source = loops.attach("src", 4 * MiB + 512, seed=1)
    destination = loops.attach("dst", 8 * MiB, seed=2, sector_size=4096)
    assert_refused([source, destination],
                   f"source size {4 * MiB + 512} is not a multiple of {destination}'s logical block size 4096",
                   destination, str(tmp_path / "j.json"))


def test_journal_of_another_destination(loops, tmp_path):
    source = loops.attach("src", 4 * MiB, seed=1)
    first = loops.attach("first", 4 * MiB)
    other = loops.attach("other", 4 * MiB, seed=3)
    journal = tmp_path / "j.json"
    assert run_blockmig("copy", source, first, "--journal", str(journal)).returncode == 0
    recorded = journal.read_bytes()
    before = volume_sha256(other)
    result = run_blockmig("copy", source, other, "--journal", str(journal), "--resume")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"blockmig: error: journal {journal} belongs to another destination: it records {first} ")
    assert line.endswith(f"not {other} ({4 * MiB} bytes, loop:{tmp_path}/other.img)")
    assert volume_sha256(other) == before
    assert journal.read_bytes() == recorded


def test_not_root_for_block_devices(loops, tmp_path):
    source = loops.attach("src", 4 * MiB, seed=1)
    destination = loops.attach("dst", 4 * MiB, seed=2)
    assert_refused([source, destination], f"{source} is a block device: blockmig must run as root to copy it",
                   destination, "/nonexistent/j.json", user=NOBODY)


def test_regular_file_without_allow_files(tmp_path):
    write_random_file(tmp_path / "src", MiB, seed=1)
    write_random_file(tmp_path / "dst", MiB, seed=2)
    assert_refused([str(tmp_path / "src"), str(tmp_path / "dst")],
                   f"{tmp_path}/src is a regular file, not a block device (pass --allow-files if you mean a file)",
                   str(tmp_path / "dst"), str(tmp_path / "j.json"))
