"""A host that uses its volume through LVM, as most do: a PV on the multipath map, a VG, an LV with ext4 and
an fsync appender, a second LV written raw with O_DIRECT by a writer that logs every acknowledged write."""

import contextlib
import glob
import os
import subprocess

import pytest
from blockio import same_bytes
from migrate_support import SLOW_LAB, MiB, release_held_io_and_migrator, report_of
from workloads import FsAppender, RawWriter, device_reader, lab_of_size

from blockmig.host import multipath

VG = "blockmigvg"
FS_LV = f"/dev/mapper/{VG}-data"
RAW_LV = f"/dev/mapper/{VG}-raw"
RAW_SIZE = 32 * MiB


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr.strip()}"
    return result.stdout


def dm_maps() -> list[str]:
    return run("dmsetup", "ls").split()[::2]


class LvmHost:
    """The host's view: VG on the map, an LV with a filesystem + appender, an LV with a raw writer."""

    def __init__(self, map_device: str, backing_dir: str, tmp_path, fstype: str, fs_size: int):
        self.map_device = map_device
        self.map_name = os.path.basename(map_device)
        self.backing_dir = backing_dir
        run("pvcreate", "-q", "-y", map_device)
        run("vgcreate", "-q", VG, map_device)
        run("lvcreate", "-q", "-y", "-W", "n", "-L", f"{fs_size // MiB}M", "-n", "data", VG)
        run("lvcreate", "-q", "-y", "-W", "n", "-L", f"{RAW_SIZE // MiB}M", "-n", "raw", VG)
        self.tables = {name: run("dmsetup", "table", name) for name in (f"{VG}-data", f"{VG}-raw")}
        self.appender = FsAppender(FS_LV, fstype, str(tmp_path / "mnt"), interval=0.02)
        # a hot set of 8 MiB, as a database's: each delta pass finds at most 8 of its chunks changed
        self.writer = RawWriter(RAW_LV, RAW_SIZE, region=(0, 8 * MiB), interval=0.005)

    def start(self) -> None:
        self.appender.start()
        self.writer.start()

    def stop(self) -> None:
        self.writer.stop()
        self.appender.stop()

    def check(self) -> None:
        """Zero application errors, zero lost acknowledged writes, fsck clean."""
        self.stop()
        print(f"\n{self.writer.summary()}\n{self.appender.summary()}")
        self.writer.check(device_reader(RAW_LV))
        self.appender.check()

    def assert_plain_tables(self) -> None:
        """Every LV has the table LVM gave it (a pass-through reloads none of them); no map suspended."""
        for name, table in self.tables.items():
            assert run("dmsetup", "table", name) == table
        assert not any(multipath.is_suspended(name) for name in dm_maps())

    def close(self) -> None:
        self.writer.stop()
        self.appender.close()
        subprocess.run(["vgchange", "-q", "-an", VG], capture_output=True)
        subprocess.run(["vgremove", "-q", "-f", VG], capture_output=True)
        subprocess.run(["pvremove", "-q", "-ff", "-y", self.map_device], capture_output=True)


@contextlib.contextmanager
def lvm_lab(size: int, backing_dir: str, tmp_path, fs_size: int):
    """The lab with an LvmHost (ext4 of `fs_size`) on its map of `size` bytes; all of it taken down after
    (should a pass-through fail, the udev rule of the array's own session to the source too)."""
    with lab_of_size(size, backing_dir) as map_device:
        host = LvmHost(map_device, backing_dir, tmp_path, "ext4", fs_size)
        try:
            yield host
        finally:
            host.close()
            release_held_io_and_migrator()
            for path in glob.glob("/etc/udev/rules.d/40-blockmig-array-*.rules"):
                os.unlink(path)


@pytest.fixture
def lvm_host(backing_dir, tmp_path, monkeypatch):
    """A lab volume with LVM on its map (256 MiB; 112 under TCG: copied at a few MB/s there, the bigger one
    only made every pass longer)."""
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    fs_size = (48 if SLOW_LAB else 128) * MiB
    with lvm_lab(fs_size + RAW_SIZE + (32 if SLOW_LAB else 96) * MiB, backing_dir, tmp_path, fs_size) as host:
        yield host


def assert_moved(host: LvmHost, result) -> dict:
    """The report of a pass-through move of the host: writers checked (0 errors, 0 lost writes, fsck clean),
    the LVs' tables untouched, the destination's backing what the host's map reads."""
    report = report_of(result)
    assert report["mode"] == "pass-through", report["mode"]
    online = report["online"]
    print(f"\n{host.map_name} by pass-through: {len(online['passes'])} delta passes, intervals "
          f"{online['intervals']}, copy {report['copy_seconds']} s, total {report['total_seconds']} s")
    host.check()
    host.assert_plain_tables()
    assert same_bytes(host.map_device, report["destination"]["backing"])  # O_DIRECT: past a stale page cache
    return report
