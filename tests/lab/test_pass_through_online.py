"""Online moves of a volume used directly on the host's multipath map, on the real stack: the destination
joins the map first, its handler passing the host's IO through to the source over the array's own session,
until the copy has converged and the array commits; then the kernel's backstore takes over. No IO is held
at any path change.

Each case runs a workload through the whole migration and asserts what the host cares about: zero
application errors, zero lost acknowledged writes, fsck clean, the same map, WWID and block size, the map
never without a usable path, the array's own disk of the source never a host path. The longest single IO
the workload saw is printed (the issue's benchmark figure), with blockmig's own intervals beside it.
"""

import contextlib
import glob
import os
import threading
import time

import pytest
from migrate_support import (
    LAB_MIN_RATE,
    SLOW_LAB,
    MigrationLab,
    blockmig,
    release_held_io_and_migrator,
    report_of,
)
from workloads import XFS_MIGRATION_ENV, XFS_MIGRATION_SIZE, FsAppender, RawWriter, device_reader

from blockmig import lab, timeline
from blockmig.errors import HostError
from blockmig.host import iscsi, multipath

MiB = 1024 * 1024
# The default --max-hold (1 s) where the lab copies deltas at UML's speed; under TCG a delta copies at about
# 1 MB/s with the writer running, so the last chunks (whose writes alone the commit holds) take seconds.
HOLD = ("--max-hold", "20") if SLOW_LAB else ()
# A raw writer's region (start, length): away from the first MiB, where MigrationLab's checks write their
# markers (before the commit a pass-through writes the source too, so the source is not what it was there);
# WRITTEN is the same as (start, end), what those checks take.
REGION = (MiB, 16 * MiB)
WRITTEN = (MiB, 17 * MiB)


class MapWatch:
    """Samples the host's map through the migration: the fewest usable paths seen, every disk seen in it, how
    long it had no usable path."""

    SAMPLE = 0.25

    def __init__(self, map_name: str):
        self.map_name = map_name
        self.fewest = self.last = None
        self.pathless_seconds = 0.0
        self.disks: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.SAMPLE):
            with contextlib.suppress(HostError):
                paths = multipath.paths_of_map(self.map_name)
                usable = sum(p.usable for p in paths)
                self.fewest = usable if self.fewest is None else min(self.fewest, usable)
                self.pathless_seconds += self.SAMPLE if usable == 0 else 0
                self.last = usable
                self.disks |= {p.dev for p in paths}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def check(self, pathless_allowed: bool = False) -> None:
        """`pathless_allowed`: the only path's server was killed (its IO queued meanwhile), so the map may
        have been without a usable path for a while; it must have one at the end."""
        assert self.fewest is not None and self.last is not None and self.last >= 1, \
            f"map {self.map_name} ends without a usable path"
        assert pathless_allowed or self.fewest >= 1, f"map {self.map_name} was without a usable path"
        array_disks = {d for d in self.disks if (s := iscsi.session_of_disk(d)) and s.iface.startswith(
            "blockmig-array-")}
        assert not array_disks, f"the array's own disks of the source were host paths: {array_disks}"


@pytest.fixture
def shaped_lab(request, backing_dir, tmp_path, monkeypatch):
    """The lab with a source of `request.param` = (size, block size), random data on it; a MigrationLab."""
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    size, block_size = getattr(request, "param", (32 * MiB, 512))
    lab.lab_down(backing_dir)
    lab.lab_up(size, backing_dir, block_size=block_size)
    try:
        yield MigrationLab(backing_dir)
    finally:
        release_held_io_and_migrator()
        for path in glob.glob("/etc/udev/rules.d/40-blockmig-array-*.rules"):
            os.unlink(path)
        lab.lab_down(backing_dir)


def migrate(host: MigrationLab, *extra: str, timeout: float = 900, mode: str | None = "online",
            min_rate: str | None = LAB_MIN_RATE):
    """`mode` None: no --mode, blockmig's default (online for every map); `min_rate` None: blockmig's
    default floor of the copy (this file's figures are the default's)."""
    result = blockmig(*host.migrate_args(*HOLD, *extra, mode=mode, min_rate=min_rate), timeout=timeout)
    assert result.returncode == 0, result.stderr
    return report_of(result)


# The workload runs alone this long first: its own longest IO and rate without a migration (the issue's
# targets compare the migration's with these).
BASELINE_SECONDS = 8.0


def migrate_watched(host: MigrationLab, workload=None, mode: str | None = "online",
                    min_rate: str | None = LAB_MIN_RATE) -> tuple[dict, MapWatch]:
    """migrate, the map sampled from a second before to a second after; with `workload`, its IOs before the
    migration (BASELINE_SECONDS) and during it are printed side by side."""
    began = time.monotonic()
    time.sleep(BASELINE_SECONDS if workload is not None else 0)
    with MapWatch(host.map_name) as watch:
        time.sleep(1)
        started = time.monotonic()
        report = migrate(host, mode=mode, min_rate=min_rate)
        ended = time.monotonic()
        time.sleep(1)
    if workload is not None:
        print(f"\n{workload.name} alone: {workload.stall.phase(began, started - 1)}; during the migration: "
              f"{workload.stall.phase(started, ended)}")
    return report, watch


def print_figures(report: dict, workload) -> None:
    online = report["online"]
    print(f"\n{workload.name}: {workload.stall.summary()} (longest single IO seen by the workload)")
    print(f"pass-through: {len(online['passes'])} delta passes {online['passes']}; intervals "
          f"{online['intervals']}; copy {report['copy_seconds']} s, total {report['total_seconds']} s")
    for step, figures in workload_per_step(report["id"], workload.stall):
        print(f"  {step}: {figures}")


def workload_per_step(migration_id: str, stall) -> list[tuple[str, str]]:
    """The workload's own IOs during each step of the move (the steps' times from the migration's
    events.jsonl, wall clock; the workload's are monotonic), so its longest IO is put where it happened."""
    offset = time.time() - time.monotonic()
    records = timeline.load_records(os.path.join(os.environ["BLOCKMIG_STATE_DIR"], migration_id))
    began, figures = {}, []
    for record in records:
        if record["e"] != "step":
            continue
        if record["state"] == "started":
            began[record["step"]] = record["t"] - offset
        elif record["state"] == "done" and record["step"] in began:
            start, end = began.pop(record["step"]), record["t"] - offset
            figures.append((f"{record['step']} ({end - start:.1f} s)", stall.phase(start, end)))
    return figures


def assert_moved(host: MigrationLab, report: dict) -> None:
    assert report["mode"] == "pass-through" and report["online"]["mechanism"] == "pass-through"
    phases = {i["phase"]: i for i in report["online"]["intervals"]}
    assert set(phases) == {"join", "copy", "commit", "hand_over"}, phases
    assert not any(phases[p]["held"] for p in ("join", "copy", "hand_over"))
    assert not glob.glob("/etc/udev/rules.d/40-blockmig-array-*.rules"), "the array session's rule is left"
    assert not [s for s in iscsi.sessions() if s.iface.startswith("blockmig-array-")]


@pytest.mark.parametrize("shaped_lab", [(32 * MiB, 512), (XFS_MIGRATION_SIZE, 4096)], indirect=True,
                         ids=["ext4-512", "xfs-4096"])
def test_a_filesystem_directly_on_the_map_moves_online_with_its_writer(shaped_lab, tmp_path):
    """No --mode: online is the default for a map, whatever is on it (assert_moved checks the mode)."""
    host = shaped_lab
    fstype = "ext4" if host.block_size == 512 else "xfs"
    appender = FsAppender(host.device, fstype, str(tmp_path / "mnt"), interval=0.02,
                          mkfs_env=XFS_MIGRATION_ENV if fstype == "xfs" else None)
    appender.start()
    try:
        # ext4 (and the raw writer below) at blockmig's default floor: the pace's figures; xfs's 64 MiB at
        # the lab's floor, a minute less (at the default floor pass 1 takes >= 1 s a MiB)
        floor = None if fstype == "ext4" else LAB_MIN_RATE
        report, watch = migrate_watched(host, appender, mode=None, min_rate=floor)
        appender.stop()
        print_figures(report, appender)
        watch.check()
        assert_moved(host, report)
        assert multipath.logical_block_size(host.device) == host.block_size
        appender.check()  # 0 errors, every acknowledged line there, fsck clean
        found = multipath.map_for_wwid(host.wwid)
        assert found is not None and found.name == host.map_name
        targets = {iscsi.session_of_disk(p.dev).target_iqn for p in multipath.paths_of_map(host.map_name)}
        assert targets == {lab.DESTINATION_IQN}
    finally:
        appender.close()


@pytest.mark.parametrize("shaped_lab", [(24 * MiB + 4096, 4096)], indirect=True, ids=["raw-4096-odd-size"])
def test_a_raw_writer_on_the_map_loses_no_acknowledged_write(shaped_lab):
    host = shaped_lab
    writer = RawWriter(host.device, host.size, block=4096, region=REGION)
    writer.start()
    try:
        report, watch = migrate_watched(host, writer, min_rate=None)
    finally:
        writer.stop()
    print_figures(report, writer)
    watch.check()
    assert_moved(host, report)
    writer.check(device_reader(host.device))
    host.assert_host_on_destination(writer_region=WRITTEN, report=report)

