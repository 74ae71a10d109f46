"""Change tracking with dm-era on the real lab stack (blockmig/host/era.py).

The host here uses its volume as most do with LVM: through a linear map on
top of the multipath map (`blockmig-test-lv`); that map is what era tracks,
because the kernel refuses to reload a multipath map to another target.
"""

import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from blockio import read_direct, write_direct

from blockmig import lab
from blockmig.errors import HostError
from blockmig.host import era, multipath
from blockmig.host.udev import wait_until

MiB = 1024 * 1024
LV = "blockmig-test-lv"
BLOCK_SECTORS = 128  # 64 KiB, the copy engine's chunk size
BLOCK = BLOCK_SECTORS * 512


def dmsetup(*args: str) -> str:
    return subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def mpath(lab_env):
    found = multipath.map_for_wwid(lab.SOURCE_WWID)
    assert found is not None
    return found


@pytest.fixture
def lv(mpath):
    """A linear map over the whole multipath map, as an LVM volume would be; removed afterwards."""
    size = int(dmsetup("table", mpath.name).split()[1])
    dmsetup("create", LV, "--table", f"0 {size} linear /dev/mapper/{mpath.name} 0")
    try:
        yield f"/dev/mapper/{LV}"
    finally:
        for name in (LV, era.PRIVATE_PREFIX + LV):
            if era.map_exists(name):
                subprocess.run(["dmsetup", "resume", name], capture_output=True)
        subprocess.run(["dmsetup", "remove", "--retry", LV], capture_output=True)
        subprocess.run(["dmsetup", "remove", "--retry", era.PRIVATE_PREFIX + LV], capture_output=True)


@pytest.fixture
def metadata_dir(tmp_path):
    path = tmp_path / "journal"
    path.mkdir()
    return str(path)


def assert_nothing_left(tracking: era.Tracking, original_table: str) -> None:
    assert era.table(LV) == original_table
    assert not era.map_exists(tracking.private_map)
    assert not os.path.exists(tracking.metadata_file)
    assert tracking.metadata_file not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    info = dmsetup("info", LV)
    assert "State:             ACTIVE" in info and "Tables present:    LIVE\n" in info, info


def test_the_kernel_refuses_to_reload_a_multipath_map_as_era(mpath, metadata_dir):
    """Why era tracks a map above multipath: multipath is an immutable target."""
    with pytest.raises(HostError, match="multipath map"):
        era.new_tracking(mpath.name, metadata_dir, BLOCK_SECTORS)
    # The fact itself, straight from dm: a reload of the multipath map to another target fails.
    size = int(dmsetup("table", mpath.name).split()[1])
    result = subprocess.run(["dmsetup", "load", mpath.name, "--table", f"0 {size} zero"],
                            capture_output=True, text=True)
    subprocess.run(["dmsetup", "clear", mpath.name], capture_output=True)
    assert result.returncode != 0
    kernel = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    assert "can't replace immutable target type multipath" in kernel
    assert " multipath " in dmsetup("table", mpath.name)


def test_written_since_lists_exactly_the_blocks_written(lv, mpath, metadata_dir):
    original = era.table(LV)
    tracking = era.new_tracking(LV, metadata_dir, BLOCK_SECTORS)
    dev_before = os.stat(lv).st_rdev
    fd = os.open(lv, os.O_RDONLY)  # the host's open handle stays usable
    try:
        start = time.monotonic()
        era.start_tracking(tracking)
        print(f"\nstart_tracking {time.monotonic() - start:.2f} s")
        assert os.stat(lv).st_rdev == dev_before
        assert era.table(LV).split()[2] == "era"
        assert era.table(tracking.private_map) == original
        blocks = int(original.split()[1]) * 512 // BLOCK
        rng = random.Random(8)
        model: dict[int, set[int]] = {}
        eras = []
        for round_ in range(4):
            eras.append(era.checkpoint(tracking))
            for _ in range(rng.randrange(1, 12)):
                offset = rng.randrange(0, blocks * BLOCK // 4096) * 4096
                write_direct(lv, offset, rng.randbytes(4096))
                model.setdefault(round_, set()).add(offset // BLOCK)
        for i, since in enumerate(eras):
            expected = sorted(set().union(*(model.get(r, set()) for r in range(i, len(eras)))))
            assert era.written_since(tracking, since) == expected, f"round {i}"
        # nothing written since the last call: an empty delta
        assert era.written_since(tracking, era.checkpoint(tracking)) == []
        os.pread(fd, 4096, 0)
        # multipathd keeps its map and path while tracking, also across a reconfigure, and
        # adopts neither the era map nor the private map (they are not multipath)
        assert [p.dev for p in multipath.paths_of_map(mpath.name) if p.usable]
        assert [m.name for m in multipath.maps()] == [mpath.name]
        multipath.reconfigure()
        time.sleep(3)
        assert era.is_tracking(tracking)
        assert [p.dev for p in multipath.paths_of_map(mpath.name) if p.usable]
        assert [m.name for m in multipath.maps()] == [mpath.name]
        assert " multipath " in era.table(mpath.name)
        used, total = era.metadata_usage(tracking)
        print(f"\nmetadata: {used}/{total} blocks of 4 KiB used for {blocks} era blocks; "
              f"file {os.path.getsize(tracking.metadata_file)} bytes, "
              f"{os.stat(tracking.metadata_file).st_blocks * 512} on disk")
        start = time.monotonic()
        era.stop_tracking(tracking)
        print(f"stop_tracking {time.monotonic() - start:.2f} s")
        era.stop_tracking(tracking)  # idempotent
        assert os.stat(lv).st_rdev == dev_before
        os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
        era.stop_tracking(tracking)
    assert_nothing_left(tracking, original)


def test_written_since_cost_with_every_block_written(lv, metadata_dir):
    """era_invalidate lists a fully written volume as ranges: all 4096 4 KiB blocks of 16 MiB."""
    tracking = era.start_tracking(era.new_tracking(LV, metadata_dir, 8))
    try:
        since = era.checkpoint(tracking)
        size = int(era.table(tracking.private_map).split()[1]) * 512
        for offset in range(0, size, MiB):
            write_direct(lv, offset, b"\x5a" * MiB)
        start = time.monotonic()
        listed = era.written_since(tracking, since)
        print(f"\nwritten_since: {len(listed)} contiguous blocks in {time.monotonic() - start:.3f} s")
        assert listed == list(range(size // 4096))
        now = era.checkpoint(tracking)
        start = time.monotonic()
        assert era.written_since(tracking, now) == []
        print(f"written_since: empty delta in {time.monotonic() - start:.3f} s")
    finally:
        era.stop_tracking(tracking)


def test_written_since_cost_with_scattered_blocks(metadata_dir, tmp_path):
    """The worst case for the listing: every 8th 4 KiB block of 1 GiB written (32768 single blocks).

    On a linear map over a loop device: era does not care what is below, and the
    lab's iSCSI volume is too slow to write this much in a test.
    """
    backing = tmp_path / "big.img"
    with open(backing, "wb") as f:
        f.truncate(1024 * MiB)
    loop = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                          check=True).stdout.strip()
    name = "blockmig-test-big"
    dmsetup("create", name, "--table", f"0 {1024 * MiB // 512} linear {loop} 0")
    tracking = era.new_tracking(name, metadata_dir, 8)
    try:
        era.start_tracking(tracking)
        since = era.checkpoint(tracking)
        buffer = mmap.mmap(-1, 4096)
        fd = os.open(f"/dev/mapper/{name}", os.O_WRONLY | os.O_DIRECT)
        written = list(range(0, 1024 * MiB // 4096, 8))
        start = time.monotonic()
        for block in written:
            os.pwritev(fd, [buffer], block * 4096)
        os.fsync(fd)
        os.close(fd)
        write_seconds = time.monotonic() - start
        figures = []
        for _ in range(3):
            start = time.monotonic()
            listed = era.written_since(tracking, since)
            figures.append(time.monotonic() - start)
        used, total = era.metadata_usage(tracking)
        print(f"\n{len(written)} scattered 4 KiB writes in {write_seconds:.1f} s; written_since of "
              f"262144 era blocks lists {len(listed)} in {', '.join(f'{s:.2f}' for s in figures)} s; "
              f"metadata {used}/{total} blocks used, {os.stat(tracking.metadata_file).st_blocks * 512} bytes on disk")
        assert listed == written
    finally:
        era.stop_tracking(tracking)
        subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


class Appender:
    """An application appending to a file with fsync, recording every error."""

    def __init__(self, path: str):
        self.path = path
        self.records = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with open(self.path, "ab") as f:
            while not self._stop.is_set():
                try:
                    f.write(b"%08d\n" % self.records)
                    f.flush()
                    os.fsync(f.fileno())
                    self.records += 1
                except OSError as exc:
                    self.errors.append(str(exc))
                    time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=60)


def test_ext4_with_an_fsync_appender_survives_tracking(lv, metadata_dir, tmp_path):
    subprocess.run(["mkfs.ext4", "-q", "-F", lv], check=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", lv, str(mountpoint)], check=True)
    original = era.table(LV)
    tracking = era.new_tracking(LV, metadata_dir, BLOCK_SECTORS)
    try:
        with Appender(str(mountpoint / "log")) as appender:
            time.sleep(0.5)
            era.start_tracking(tracking)
            first = era.checkpoint(tracking)
            time.sleep(1)
            delta = era.written_since(tracking, first)
            era.stop_tracking(tracking)
            time.sleep(0.5)
        assert appender.errors == []
        assert appender.records > 10
        assert delta, "the appender's writes were not tracked"
        with open(mountpoint / "log", "rb") as f:
            assert f.read() == b"".join(b"%08d\n" % i for i in range(appender.records))
    finally:
        era.stop_tracking(tracking)
        subprocess.run(["umount", str(mountpoint)], check=True)
    assert_nothing_left(tracking, original)
    fsck = subprocess.run(["fsck.ext4", "-fn", lv], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


TRACKER = """
import json, sys, time
from blockmig.host import era
tracking = era.new_tracking(sys.argv[1], sys.argv[2], 128)
journal = sys.argv[3]
def save(t):
    with open(journal, "w") as f:
        json.dump(t.to_dict(), f)
save(tracking)
era.start_tracking(tracking, on_change=save)
save(tracking)
era.checkpoint(tracking)
print("tracking", flush=True)
time.sleep(600)
"""


def test_stop_after_kill_9_from_the_journal_restores_everything(lv, metadata_dir):
    original = era.table(LV)
    journal = os.path.join(metadata_dir, "tracking.json")
    process = subprocess.Popen([sys.executable, "-c", TRACKER, LV, metadata_dir, journal],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "tracking"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        data = b"\xa5" * 4096
        write_direct(lv, 3 * BLOCK, data)  # the host goes on writing, nobody tracks
        with open(journal) as f:
            tracking = era.Tracking.from_dict(json.load(f))
        assert era.is_tracking(tracking)
        era.stop_tracking(tracking)
        assert_nothing_left(tracking, original)
        assert read_direct(lv, 3 * BLOCK, 4096) == data
    finally:
        if process.poll() is None:
            process.kill()


def test_stop_finishes_every_half_done_start(lv, metadata_dir):
    """The states a kill -9 inside start_tracking can leave, each undone from the plan alone."""
    original = era.table(LV)

    def plan():
        return era.new_tracking(LV, metadata_dir, BLOCK_SECTORS)

    # metadata file made, loop attached, its name never journaled
    tracking = plan()
    open(tracking.metadata_file, "wb").truncate(era.metadata_size(1024))
    subprocess.run(["losetup", "--find", tracking.metadata_file], check=True)
    era.stop_tracking(plan())
    assert_nothing_left(tracking, original)
    # private map made, host map not reloaded yet
    tracking = plan()
    dmsetup("create", tracking.private_map, "--table", original)
    era.stop_tracking(tracking)
    assert_nothing_left(tracking, original)
    # host map suspended by the dead process, table still the original one
    dmsetup("suspend", LV)
    era.stop_tracking(plan())
    assert_nothing_left(tracking, original)
    # host map suspended with the era table loaded but not active yet
    tracking = era.start_tracking(plan())
    era.stop_tracking(tracking)
    tracking = plan()
    era.start_tracking(tracking)
    dmsetup("suspend", LV)
    dmsetup("load", LV, "--table", original)
    era.stop_tracking(tracking)
    assert_nothing_left(tracking, original)


def test_switch_table_gives_the_host_map_a_new_table_and_ends_tracking(lv, mpath, metadata_dir, lab_env):
    """At the cut-over the host's map gets the destination's table (here: a linear map of a copy)."""
    original = era.table(LV)
    data = os.urandom(MiB)
    write_direct(lv, 0, data)
    tracking = era.start_tracking(era.new_tracking(LV, metadata_dir, BLOCK_SECTORS))
    copy_file = os.path.join(metadata_dir, "destination.img")
    loop = ""
    try:
        with open(copy_file, "wb") as f:
            f.write(read_direct(lv, 0, MiB))
            f.truncate(int(original.split()[1]) * 512)
        loop = subprocess.run(["losetup", "--find", "--show", copy_file], capture_output=True, text=True,
                              check=True).stdout.strip()
        era.switch_table(tracking, f"0 {original.split()[1]} linear {loop} 0")
        major_minor = "%d:%d" % divmod(os.stat(loop).st_rdev, 256)
        assert era.table(LV) == f"0 {original.split()[1]} linear {major_minor} 0"
        assert not era.map_exists(tracking.private_map)
        assert not os.path.exists(tracking.metadata_file)
        assert read_direct(lv, 0, MiB) == data
        # multipathd still has its map and path, untouched by all of this
        assert [p.dev for p in multipath.paths_of_map(mpath.name) if p.usable]
    finally:
        era.stop_tracking(tracking)
        if era.table(LV) != original:
            dmsetup("suspend", LV)
            dmsetup("load", LV, "--table", original)
            dmsetup("resume", LV)
        if loop:
            subprocess.run(["losetup", "-d", loop])


def set_source_portal(enabled: bool) -> None:
    """Take the source array's portal away (or back): the host's only path fails after its 5 s replacement timeout."""
    from rtslib_fb import RTSRoot

    target = next(t for t in RTSRoot().targets if t.wwn == lab.SOURCE_IQN)
    for tpg in target.tpgs:
        tpg.enable = enabled


def test_a_path_failure_during_tracking_is_handled_by_multipathd(lv, mpath, metadata_dir):
    """The multipath map under the tracked map keeps its failover: IO queues, the path comes back."""
    tracking = era.start_tracking(era.new_tracking(LV, metadata_dir, BLOCK_SECTORS))
    disk = [p.dev for p in multipath.paths_of_map(mpath.name)][0]
    try:
        since = era.checkpoint(tracking)
        set_source_portal(False)
        result = {}

        def write():
            start = time.monotonic()
            try:
                write_direct(lv, 7 * BLOCK, b"\x77" * 4096)
            except OSError as exc:
                result["error"] = str(exc)
            result["seconds"] = time.monotonic() - start

        writer = threading.Thread(target=write)
        writer.start()
        failed = wait_until(
            lambda: [p for p in multipath.paths_of_map(mpath.name) if not p.usable], "the path to fail", 30)
        time.sleep(2)
        assert writer.is_alive(), "the write did not queue while the only path was down"
        set_source_portal(True)
        writer.join(timeout=60)
        assert not writer.is_alive(), "the queued write never completed after the path came back"
        print(f"\nportal down: write held {result['seconds']:.1f} s; failed path seen: {failed}")
        assert "error" not in result, result
        multipath.wait_for_map_paths(mpath.name, {disk}, timeout=60)
        assert era.is_tracking(tracking)
        assert era.written_since(tracking, since) == [7]
        assert read_direct(lv, 7 * BLOCK, 4096) == b"\x77" * 4096
    finally:
        set_source_portal(True)
        era.stop_tracking(tracking)
