"""Migrations under the workloads hosts run, for each fence and switch mode, and on other geometries.

Every case asserts: no acknowledged write lost, application errors only where the fence documents
them, fsck clean, map name, WWID and logical block size unchanged; the IO-held time is printed.
"""

import os

import pytest
from migrate_support import (  # noqa: F401  (migration_lab is a fixture)
    KERNEL_BACKSTORE,
    MiB,
    add_host_volume,
    blockmig,
    migration_lab,
    report_of,
)
from workloads import HOST_IO_INTERVAL, FsAppender, RawWriter

from blockmig import lab
from blockmig.array import lio
from blockmig.host import multipath

XFS_SIZE = 320 * MiB  # mkfs.xfs (xfsprogs 6.1) refuses filesystems under 300 MiB


def _writer(volume, block: int = 4096, interval: float = HOST_IO_INTERVAL) -> RawWriter:
    # The second half of the volume: the first half keeps the known data the checks compare.
    start = volume.size // 2 // MiB * MiB
    return RawWriter(volume.device, volume.size, block=block, region=(start, (volume.size - start) // block * block),
                     interval=interval)


def _region(writer: RawWriter) -> tuple[int, int]:
    return writer.start_offset, writer.start_offset + writer.length


def _held(report: dict, case: str) -> None:
    print(f"{case}: host IO held {report['io_held_seconds'] * 1000:.0f} ms at the switch "
          f"({os.environ.get('BLOCKMIG_LAB_RUNNER', '?')})")


@pytest.mark.parametrize("switch", ["multipath", "relogin"])
def test_raw_writer_with_the_suspend_fence(migration_lab, switch):
    # multipath: the one flooding writer of the lab (no wait between its writes), at the switch a host
    # has most IO in flight through
    with _writer(migration_lab, interval=0 if switch == "multipath" else HOST_IO_INTERVAL) as writer:
        result = blockmig(*migration_lab.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--switch", switch, "--id", "rw"))
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    _held(report, f"raw writer, suspend, {switch}")
    print(writer.summary())
    migration_lab.assert_host_on_destination(writer_region=_region(writer))
    writer.check(migration_lab.read_through_map)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem_with_an_fsync_appender(lab_env, backing_dir, tmp_path, monkeypatch, fstype):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    size = XFS_SIZE if fstype == "xfs" else 64 * MiB
    volume = add_host_volume(backing_dir, f"fs-{fstype}", size, lun=1)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    appender = FsAppender(volume.device, fstype, str(mountpoint))
    try:
        with appender:
            refused = blockmig(*volume.migrate_args(*KERNEL_BACKSTORE, "--id", "wp"))
            assert refused.returncode == 2, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
            assert "--fence writeprotect would fail every write" in refused.stderr and str(mountpoint) in refused.stderr
            result = blockmig(*volume.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--chunk-size", "4M", "--id", fstype))
            assert result.returncode == 0, result.stderr
        report = report_of(result)
        _held(report, f"{fstype} + fsync appender, suspend, multipath")
        print(appender.summary())
        appender.check()  # no IO error, fsck clean, every acknowledged line there
    finally:
        appender.close()
    assert multipath.map_for_wwid(volume.wwid).name == volume.map_name
    assert multipath.logical_block_size(volume.device) == volume.block_size
    assert report["destination"]["target"] == lab.DESTINATION_IQN


def test_raw_writer_refuses_the_writeprotect_and_none_fences(migration_lab):
    with _writer(migration_lab) as writer:
        for fence in ("writeprotect", "none"):
            refused = blockmig(*migration_lab.migrate_args(*KERNEL_BACKSTORE, "--fence", fence, "--id", f"refused-{fence}"))
            assert refused.returncode == 2, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1 and "open for writing" in refused.stderr
            assert not os.path.exists(os.path.join(os.environ["BLOCKMIG_STATE_DIR"], f"refused-{fence}"))
    writer.check(migration_lab.read_through_map)
    assert [v["name"] for a in lab.lab_status()["arrays"] for v in a["volumes"]] == [lab.SOURCE_VOLUME]


@pytest.mark.parametrize("block_size", [4096, 512])
def test_block_size_and_odd_size_are_kept(lab_env, backing_dir, tmp_path, monkeypatch, block_size):
    """A size that is no multiple of the chunk, 4 KiB or 512-byte blocks: the host's map keeps its geometry."""
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    volume = add_host_volume(backing_dir, f"bs{block_size}", 16 * MiB + 3 * 4096, lun=2, block_size=block_size)
    assert volume.block_size == block_size
    source_geometry = lio.volume_geometry(lio.find_volume_by_wwid(volume.wwid))
    with _writer(volume, block=block_size) as writer:
        result = blockmig(*volume.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", f"bs{block_size}"))
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    _held(report, f"{block_size}-byte blocks, odd size")
    assert report["block_size"] == block_size and report["size"] == volume.size
    volume.assert_host_on_destination(writer_region=_region(writer), report=report, other_source_volumes=True)
    writer.check(volume.read_through_map)
    destination = lio.find_volume(report["destination"]["volume"])
    assert lio.volume_geometry(destination) == source_geometry


def test_block_backstore_source(lab_env, backing_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    volume = add_host_volume(backing_dir, "blk", 16 * MiB, lun=3, backstore="block")
    result = blockmig(*volume.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", "blk"))
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert volume.read_through_map(0, volume.size) == volume.data
    assert multipath.map_for_wwid(volume.wwid).name == volume.map_name
    assert report["destination"]["backing"].startswith(backing_dir)
