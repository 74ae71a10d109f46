"""The host workloads of the migration tests, proven on the lab's source map with no migration.

Each passes on a healthy volume, and each check fails when an acknowledged write is lost,
damaged or misplaced behind the host's back, or when the host's writes fail.
"""

import errno
import os
import subprocess
import threading
import time

import pytest
from blockio import read_direct, write_direct
from migrate_support import fill_volume
from workloads import (
    XFS_MIN_SIZE,
    XFS_SMALL_ENV,
    XFS_SMALL_SIZE,
    FsAppender,
    OrderedPairWriter,
    RawReader,
    RawWriter,
    device_reader,
    file_reader,
    is_mounted,
    lab_of_size,
    run_during,
)

from blockmig import lab
from blockmig.array import lio
from blockmig.host import iscsi, multipath

MiB = 1024 * 1024
SMALL = 16 * MiB
# A write-protected LUN answers DATA PROTECT; the kernel gives the writer EREMOTEIO (BLK_STS_TARGET).
# An ext4 that aborted its journal answers EIO/EROFS.
WRITE_FAILURES = {errno.EREMOTEIO, errno.EIO, errno.EROFS}


def source_map():
    found = multipath.map_for_wwid(lab.SOURCE_WWID)
    assert found is not None, "lab_up made no multipath map"
    return found


def runner():
    return os.environ.get("BLOCKMIG_LAB_RUNNER", "?")


def tmpfs_used_mib(path):
    return os.stat(path).st_blocks * 512 / MiB


class WriteProtected:
    """The source array refuses the host's writes for `seconds`, from `after` s on (a thread)."""

    def __init__(self, after: float, seconds: float):
        self.volume = lio.find_volume(lab.SOURCE_VOLUME)
        self.host = iscsi.read_initiator_name()
        self.thread = threading.Thread(target=self._run, args=(after, seconds), daemon=True)

    def _run(self, after, seconds):
        time.sleep(after)
        lio.set_mapping_write_protect(self.volume, self.host, True)
        time.sleep(seconds)
        lio.set_mapping_write_protect(self.volume, self.host, False)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.thread.join(60)
        lio.set_mapping_write_protect(self.volume, self.host, False)


@pytest.fixture(params=["ext4", "xfs"])
def fs_appender(request, backing_dir, tmp_path):
    """An FsAppender (not started) on a lab of the smallest size its filesystem allows; always unmounted after."""
    size = SMALL if request.param == "ext4" else XFS_MIN_SIZE
    with lab_of_size(size, backing_dir) as device:
        appender = FsAppender(device, request.param, str(tmp_path / "mnt"))
        try:
            yield appender
        finally:
            appender.close()


# -- raw ------------------------------------------------------------------------------------------


def test_raw_writer_and_reader_on_disjoint_regions_pass(lab_env, backing_dir):
    device = source_map().device
    data = fill_volume(device, SMALL, seed=11)
    half = (0, SMALL // 2), (SMALL // 2, SMALL // 2)
    with RawWriter(device, SMALL, region=half[0]) as writer, RawReader(device, data, region=half[1]) as reader:
        time.sleep(4)
    writer.check(device_reader(device), expected=data)
    writer.check(file_reader(lab.source_backing_file(backing_dir)), expected=data)
    reader.check()
    print(f"\n[{runner()}] {writer.summary()}")
    print(f"[{runner()}] raw reader alongside: {reader.reads} 64 KiB reads; {reader.stall.summary()}")
    assert writer.writes > 50 and len(writer.acked) > 20


def test_raw_check_fails_on_a_lost_corrupt_or_misplaced_block(lab_env):
    device = source_map().device
    data = fill_volume(device, SMALL, seed=12)
    with RawWriter(device, SMALL) as writer:
        time.sleep(2)
    read = device_reader(device)
    writer.check(read, expected=data)
    (offset, (seq, _)), (other, _) = sorted(writer.acked.items(), key=lambda item: -item[1][0])[:2]
    good = read(offset, 4096)

    def assert_check_fails(block, match, at=offset):
        write_direct(device, at, block)  # behind the writer's back, as a lost or wrong write would
        try:
            with pytest.raises(AssertionError, match=match):
                writer.check(read, expected=data)
        finally:
            write_direct(device, at, good if at == offset else data[at:at + 4096])

    assert_check_fails(writer.stamp(offset, seq - 1), f"block at {offset} .*older seq {seq - 1}.*LOST")
    assert_check_fails(data[offset:offset + 4096], f"block at {offset} .*no block of writer")
    assert_check_fails(good[:100] + bytes([good[100] ^ 1]) + good[101:], f"block at {offset} .*corrupt")
    assert_check_fails(read(other, 4096), f"block at {offset} .*written for offset {other}.*misdirected")
    assert_check_fails(writer.stamp(offset, seq + 1000), f"block at {offset} .*never written there")
    untouched = next(o for o in range(0, SMALL, 4096) if o not in writer.acked and o not in writer.failed)
    assert_check_fails(os.urandom(4096), f"block at {untouched}, never written by the host, changed", at=untouched)
    writer.check(read, expected=data)  # restored: it passes again



def test_ordered_pair_check_fails_on_a_lost_write_or_a_volume_ahead(lab_env):
    device = source_map().device
    with OrderedPairWriter(device, device, blocks=64, bases=(0, MiB)) as writer:
        time.sleep(2)
    writer.check()
    print(f"\n[{runner()}] {writer.summary()}")
    last = writer.done[1]
    index = last % 64
    for volume, forged, match in ((1, last - 64, f"volume 1 .*block {index} holds seq {last - 64}, not {last}"),
                                  (0, last + 64, f"volume 0 .*block {index} holds seq {last + 64}, not {last}")):
        at = writer.bases[volume] + index * 4096
        good = read_direct(device, at, 4096)
        write_direct(device, at, writer.stamp(forged, volume))
        try:
            with pytest.raises(AssertionError, match=match):
                writer.check()
        finally:
            write_direct(device, at, good)
    writer.check()
    assert last > 20


def test_raw_workloads_record_errors_when_the_array_refuses_writes(lab_env):
    device = source_map().device
    data = fill_volume(device, SMALL, seed=13)
    half = (0, SMALL // 2), (SMALL // 2, SMALL // 2)
    with RawWriter(device, SMALL, region=half[0]) as writer, RawReader(device, data, region=half[1]) as reader:
        with WriteProtected(after=1, seconds=1.5):
            time.sleep(3.5)
    print(f"\n[{runner()}] write-protected for 1.5 s: {writer.summary()}; errnos {sorted(writer.errnos())}")
    assert writer.error_count > 0 and writer.errnos() <= WRITE_FAILURES, writer.errors[:3]
    with pytest.raises(AssertionError, match="raw writer saw .* IO errors"):
        writer.check(device_reader(device), expected=data)
    writer.check(device_reader(device), expected=data, allow_errors=True)  # refused writes did not land
    reader.check()  # reads go on under write protection


def test_run_during_returns_the_action_and_io_stall_sees_held_io(lab_env):
    found = source_map()
    with RawWriter(found.device, SMALL, interval=0.01) as probe:  # a first, to know normal latencies
        time.sleep(1)
    writer = RawWriter(found.device, SMALL, interval=0.01, writer_id=2)

    def hold_io():
        multipath.suspend_map(found.name)
        try:
            time.sleep(1.5)
        finally:
            multipath.resume_map(found.name)
        return "held"

    assert run_during([writer], hold_io) == "held"
    writer.check(device_reader(found.device))
    print(f"\n[{runner()}] normal: {probe.stall.summary()}; map suspended 1.5 s: {writer.stall.summary()}")
    assert 1.4 < writer.stall.max < 5, writer.stall.summary()
    assert probe.stall.max < 1.0


# -- filesystems ----------------------------------------------------------------------------------


def test_fs_appender_passes(fs_appender, backing_dir):
    with fs_appender:
        time.sleep(4)
    fs_appender.check()
    used = tmpfs_used_mib(lab.source_backing_file(backing_dir))
    size = os.path.getsize(lab.source_backing_file(backing_dir)) / MiB
    print(f"\n[{runner()}] {fs_appender.summary()}; volume {size:.0f} MiB takes {used:.0f} MiB of tmpfs")
    assert len(fs_appender.acked_lines) > 20 and fs_appender.acked_state == fs_appender.acked_lines[-1]
    assert not is_mounted(fs_appender.mountpoint)


def test_xfs_minimum_size_and_the_fstests_escape(backing_dir, tmp_path):
    with lab_of_size(XFS_SMALL_SIZE, backing_dir) as device:
        refused = subprocess.run(["mkfs.xfs", "-f", "-q", device], capture_output=True, text=True)
        assert refused.returncode != 0 and "larger than 300MB" in refused.stderr, refused.stderr
        appender = FsAppender(device, "xfs", str(tmp_path / "mnt"), mkfs_env=XFS_SMALL_ENV)
        try:
            with appender:
                time.sleep(2)
            appender.check()
        finally:
            appender.close()
    print(f"\n[{runner()}] {XFS_SMALL_SIZE // MiB} MiB {appender.summary()}")


def test_a_shut_down_xfs_is_still_seen_mounted_and_unmounted(backing_dir, tmp_path):
    """A shut-down xfs answers stat of its root with EIO (os.path.ismount then says "not mounted"): the
    appender must still see the mount and take it down, or the map stays held for every later test."""
    with lab_of_size(XFS_SMALL_SIZE, backing_dir) as device:
        appender = FsAppender(device, "xfs", str(tmp_path / "mnt"), mkfs_env=XFS_SMALL_ENV)
        try:
            appender.make_filesystem()
            appender.mount()
            shutdown = subprocess.run(["xfs_io", "-x", "-c", "shutdown", appender.mountpoint],
                                      capture_output=True, text=True)
            assert shutdown.returncode == 0, shutdown.stderr
            with pytest.raises(OSError) as stat_error:
                os.stat(appender.mountpoint)
            assert stat_error.value.errno == errno.EIO and not os.path.ismount(appender.mountpoint)
            assert is_mounted(appender.mountpoint)
            appender.unmount()
            assert not appender.mounted and not is_mounted(appender.mountpoint)
        finally:
            appender.close()


def _rewrite(path, text):
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def test_fs_check_fails_on_a_lost_line_a_lost_tail_or_a_damaged_filesystem(fs_appender):
    with fs_appender:
        time.sleep(2)
    log = os.path.join(fs_appender.mountpoint, fs_appender.LOG)
    state = os.path.join(fs_appender.mountpoint, fs_appender.STATE)
    with open(log) as handle:
        good_log = handle.read()
    with open(state) as handle:
        good_state = handle.read()
    lines = good_log.splitlines(keepends=True)
    acked = fs_appender.acked_lines
    tampered = {
        f"1 of {len(acked)} acknowledged lines .* LOST, first \\[{acked[5]}\\]":
            (log, "".join(lines[:5] + lines[6:])),
        "acknowledged lines .* LOST": (log, "".join(lines[:-3])),
        f"line 3 of {fs_appender.LOG} is not a line the host wrote": (log, "".join(lines[:2] + ["x" * 20 + "\n"] + lines[3:])),
        "older than the acknowledged": (state, fs_appender.states[acked[-3]]),
    }
    for match, (path, text) in tampered.items():
        if not fs_appender.mounted:
            fs_appender.mount()
        _rewrite(path, text)
        with pytest.raises(AssertionError, match=match):
            fs_appender.check()
        fs_appender.mount()
        _rewrite(path, good_log if path == log else good_state)
    fs_appender.check()  # restored: it passes again

    # the filesystem itself damaged: its superblock's magic, written through the device after umount
    magic_at = 1024 + 56 if fs_appender.fstype == "ext4" else 0
    first = read_direct(fs_appender.device, 0, 4096)
    write_direct(fs_appender.device, 0, first[:magic_at] + b"\0\0" + first[magic_at + 2:])
    with pytest.raises(AssertionError, match="e2fsck|xfs_repair"):
        fs_appender.check()


def test_fs_appender_records_errors_when_the_array_refuses_writes(fs_appender):
    with fs_appender, WriteProtected(after=1, seconds=1.5):
        time.sleep(3.5)
    print(f"\n[{runner()}] write-protected for 1.5 s: {fs_appender.summary()}; errnos {sorted(fs_appender.errnos())}")
    assert fs_appender.error_count > 0 and fs_appender.errnos() <= WRITE_FAILURES, fs_appender.errors[:3]
    with pytest.raises(AssertionError, match="fs appender saw .* IO errors"):
        fs_appender.check()
