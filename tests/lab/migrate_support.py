"""Helpers for the migrate lab tests: a host that reads its map, the CLI as a subprocess, checks.

The fixtures that build the lab are in conftest.py; these helpers only watch and ask.
"""

from __future__ import annotations

import atexit
import compileall
import contextlib
import functools
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from blockio import read_direct, read_file, write_direct
from workloads import READ_INTERVAL

from blockmig import faults, lab
from blockmig.array import lio
from blockmig.array.tcmu import client
from blockmig.errors import HostError
from blockmig.host import iscsi, multipath

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
READ_BLOCK = 64 * 1024


@functools.cache
def installed_code() -> Path:
    """blockmig's package copied to the guest's own /tmp and compiled, as a host has it installed: the
    processes the tests start import it there, not through the VM's 9p share of the repository (under TCG
    `blockmig status` took 4.5-5.3 s from the share, 2.6-2.8 s from here). Once per test process: the
    tree does not change during a run."""
    code = Path(tempfile.mkdtemp(prefix="blockmig-code-", dir="/tmp"))
    atexit.register(shutil.rmtree, code, True)
    shutil.copytree(REPO / "blockmig", code / "blockmig", ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(code / "blockmig", quiet=1)
    return code


def blockmig_env(**extra: str) -> dict[str, str]:
    """A blockmig process's environment: the installed code, and no cwd (the share) on its sys.path."""
    return {**os.environ, "PYTHONPATH": str(installed_code()), "PYTHONSAFEPATH": "1", **extra}


def fill_volume(device: str, size: int, seed: int) -> bytes:
    """Random data written through the host's map, so a copy of zeros cannot pass."""
    rng = random.Random(seed)
    data = b"".join(rng.randbytes(min(MiB, size - offset)) for offset in range(0, size, MiB))
    for offset in range(0, size, MiB):
        write_direct(device, offset, data[offset:offset + MiB])
    return data


class HostReader:
    """The host application: reads its map with O_DIRECT in a loop and checks every byte."""

    def __init__(self, device: str, expected: bytes):
        self.device = device
        self.expected = expected
        self.reads = 0
        self.errors: list[str] = []
        self.mismatches: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        rng = random.Random(7)
        while not self._stop.is_set():
            offset = rng.randrange(0, len(self.expected) // READ_BLOCK) * READ_BLOCK
            try:
                data = read_direct(self.device, offset, READ_BLOCK)
            except OSError as exc:
                self.errors.append(f"{offset}: {exc}")
                time.sleep(0.05)
                continue
            self.reads += 1
            if data != self.expected[offset:offset + READ_BLOCK]:
                self.mismatches.append(offset)
            self._stop.wait(READ_INTERVAL)

    def __enter__(self) -> "HostReader":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def check(self) -> None:
        assert not self._thread.is_alive() or not self._stop.is_set(), "the host reader is stuck"
        assert self.reads > 0, "the host reader never got a read through"
        assert self.errors == [], f"the host saw IO errors: {self.errors[:3]}"
        assert self.mismatches == [], f"the host read wrong bytes at {self.mismatches[:5]}"


def blockmig(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """`python3 -m blockmig ARGS` as the admin would run it."""
    result = subprocess.run(
        [sys.executable, "-m", "blockmig", *args], capture_output=True, text=True, timeout=timeout,
        env=blockmig_env(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"blockmig {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def start_blockmig(*args: str, stop_at: str | None = None, stdout=subprocess.PIPE) -> subprocess.Popen:
    """blockmig in the background; with `stop_at` it stops itself (SIGSTOP) at that named point (blockmig.faults).

    `stdout`: a file for long --json runs that nobody reads meanwhile (a full pipe would block blockmig).
    """
    env = blockmig_env(**({faults.STOP_AT_ENV: stop_at} if stop_at else {}))
    return subprocess.Popen(
        [sys.executable, "-m", "blockmig", *args], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_until_stopped(process: subprocess.Popen, timeout: float = 300) -> None:
    """Until the process has stopped itself at its named point; fails if it exits instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"blockmig exited {process.returncode} before its stop point: "
                                 f"{process.stderr.read().strip()}")
        if psutil.Process(process.pid).status() == psutil.STATUS_STOPPED:
            return
        time.sleep(0.02)
    raise AssertionError("blockmig never reached its stop point")


# qemu under TCG (the lab's runner where user-mode-linux cannot run) copies a delta at about 1 MB/s
# and takes seconds to join a path: timings tuned for UML get this much room there.
SLOW_LAB = os.environ.get("BLOCKMIG_LAB_RUNNER") == "qemu"
# A switch timeout a test makes short on purpose (a revert comes quickly), long enough for a join (under
# TCG a resumed switch maps, scans and joins the destination inside its hold: 10 s was not always enough).
SHORT_SWITCH_TIMEOUT = "20" if SLOW_LAB else "3"
# A group's hold scans every member's destination disk inside it: under TCG beside a second guest two
# took 12.5 s, past the default 10 s (the test is of one hold and the writers' order, not its length).
GROUP_SWITCH_TIMEOUT = "60" if SLOW_LAB else "10"


# The destination served by the kernel's backstore from the start: the tests of the switch, its fences and
# the host side pin it, because from the end of the copy on a destination is a kernel volume whichever
# served it during the copy (blockmig's handler, the default, costs ~15 s a move under TCG); the tests of
# the copy, its kill points and resume, and every online move, use the handler.
KERNEL_BACKSTORE = ("--backstore", "kernel")


# The copy's floor while the handler holds it back for the host's IO (online moves with a workload): under
# TCG every chunk slows the host's IO, so at blockmig's default floor (1 MiB/s) every such test would copy
# at 1 MiB/s (about a minute a move more). 8M is above an unpaced copy's rate under TCG (~6 MB/s): the
# other online tests copy as fast as they did before the pace. test_pass_through_online's three workload
# cases (the figures, and every check on the paced copy) run at blockmig's default (min_rate=None there).
LAB_MIN_RATE = "8M"


def migrate_args(map_device: str, backing_dir: str, *extra: str, min_rate: str | None = LAB_MIN_RATE) -> list[str]:
    return [
        "migrate", map_device,
        "--to-target", lab.DESTINATION_IQN,
        "--to-portal", "{}:{}".format(*lab.DESTINATION_PORTAL),
        "--backing-dir", backing_dir,
        "--chunk-size", "1M",
        # not beside a test's own --max-rate (blockmig refuses a floor above the cap)
        *(("--min-rate", min_rate) if min_rate and not {"--min-rate", "--max-rate"} & set(extra) else ()),
        "--json",
        *extra,
    ]


def report_of(result: subprocess.CompletedProcess, kind: str = "report") -> dict:
    """The last `kind` event of a --json run ("plan_report" for a plan)."""
    for line in reversed(result.stdout.splitlines()):
        event = json.loads(line)
        if event.get("event") == kind:
            return event
    raise AssertionError(f"no {kind} in the output (exit {result.returncode}); stderr: {result.stderr.strip()}")


def journal(migration_id: str) -> dict:
    path = os.path.join(os.environ["BLOCKMIG_STATE_DIR"], migration_id, "journal.json")
    with open(path) as handle:
        return json.load(handle)


def wait_for_journal(migration_id: str, condition, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = journal(migration_id)
        except (OSError, ValueError):
            data = None
        if data is not None and condition(data):
            return data
        time.sleep(0.02)
    raise AssertionError(f"journal of {migration_id} never reached the awaited state")


def copied_bytes(migration_id: str) -> int:
    path = os.path.join(os.environ["BLOCKMIG_STATE_DIR"], migration_id, "copy.json")
    try:
        with open(path) as handle:
            return json.load(handle)["reserved_address"]
    except (OSError, ValueError, KeyError):
        return 0


def host_disks_by_target(map_name: str) -> dict[str, str]:
    """Each path of the host's map -> the target its session is logged in to."""
    owners = {}
    for session in iscsi.sessions():
        for disk in iscsi.session_disks(session).values():
            owners[disk] = session.target_iqn
    return {path.dev: owners.get(path.dev, "?") for path in multipath.paths_of_map(map_name)}


def assert_host_on_destination(map_name: str, wwid: str, data: bytes, backing_dir: str, source_backing: str,
                                writer_region: tuple[int, int] | None = None, block_size: int | None = None,
                                other_source_volumes: bool = False, destination_backing: str | None = None) -> None:
    """Same map name, WWID and block size; its only path is on the destination; bytes equal; new writes land there.

    `writer_region`: bytes a host writer changed during the migration (its own check covers them);
    `other_source_volumes`: the host keeps sessions to the source for volumes that did not move.
    """
    found = multipath.map_for_wwid(wwid)
    assert found is not None and found.name == map_name, f"map for {wwid} is now {found}"
    paths = multipath.wait_for_map_paths(map_name, set(host_disks_by_target(map_name)))
    targets = host_disks_by_target(map_name)
    assert list(targets.values()) == [lab.DESTINATION_IQN], f"map paths: {targets}"
    assert all(path.usable for path in paths)
    if block_size is not None:
        assert multipath.logical_block_size(found.device) == block_size
    destination_backing = destination_backing or destination_backing_file(backing_dir)
    start, end = writer_region or (len(data), len(data))
    if writer_region is None:
        assert subprocess.run(["cmp", source_backing, destination_backing]).returncode == 0
    for first, last in ((0, start), (end, len(data))):
        assert read_file(destination_backing, first, last - first) == data[first:last], "bytes outside the writer differ"
    # A new write through the map lands on the destination, not on the source.
    marker = os.urandom(4096)
    write_direct(found.device, 8192, marker)
    assert read_file(destination_backing, 8192, 4096) == marker
    assert read_file(source_backing, 8192, 4096) == data[8192:8192 + 4096]
    if not other_source_volumes:
        assert not any(s.target_iqn == lab.SOURCE_IQN for s in iscsi.sessions()), "host still logged in to the source"
    assert_no_served_destination()


def assert_no_served_destination() -> None:
    """After a migration or its rollback: no backstore handler of a migration runs, none of its objects is left
    (the destination is the kernel's, or gone)."""
    handlers = [client.served_name(p.info["cmdline"]) for p in client.handler_processes()]
    assert not [name for name in handlers if name and name.startswith("blockmig-")], f"handlers left: {handlers}"
    served = [v.name for v in lio.list_volumes() if v.plugin == "user"]
    assert served == [], f"storage objects of blockmig's backstore left: {served}"


def destination_backing_file(backing_dir: str) -> str:
    found = glob.glob(os.path.join(backing_dir, "blockmig-*.img"))
    assert len(found) == 1, f"destination backing files: {found}"
    return found[0]




def release_held_io_and_migrator() -> None:
    """After a failed test: no suspended map, no migrator iface, no multipath drop-in left for the next one."""
    for found in multipath.maps():
        with contextlib.suppress(HostError):  # a map multipathd still lists while it goes
            if multipath.is_suspended(found.name):
                multipath.resume_map(found.name)
    for session in iscsi.sessions():
        if session.iface.startswith("blockmig-"):
            iscsi.logout_safely(session)
    for iface in iscsi.list_ifaces():
        if iface.startswith("blockmig-"):
            iscsi.remove_iface(iface)
    removed = False
    for path in glob.glob("/etc/multipath/conf.d/blockmig-*.conf"):
        os.unlink(path)
        removed = True
    if removed:
        multipath.reconfigure()


class MigrationLab:
    """The lab with random data on the source, seen by the host as /dev/mapper/<map>."""

    def __init__(self, backing_dir: str, source_backing: str | None = None, wwid: str = lab.SOURCE_WWID):
        self.backing_dir = backing_dir
        self.source_backing = source_backing or lab.source_backing_file(backing_dir)
        self.wwid = wwid
        found = multipath.wait_for_map(self.wwid)
        self.map_name = found.name
        self.device = found.device
        with open(self.device, "rb") as handle:
            self.size = handle.seek(0, os.SEEK_END)
        self.block_size = multipath.logical_block_size(self.device)
        self.host_initiator = iscsi.read_initiator_name()
        self.data = fill_volume(self.device, self.size, seed=hash(self.source_backing) & 0xFFFF)

    def migrate_args(self, *extra: str, mode: str | None = "offline", min_rate: str | None = LAB_MIN_RATE) -> list[str]:
        """`mode` unless `extra` names one (None: blockmig's own default, online on a map): this lab's tests
        are mostly of the offline move's fences, switch and kill points; the online ones say so."""
        named = ("--mode", mode) if mode is not None and "--mode" not in extra else ()
        return migrate_args(self.device, self.backing_dir, *named, *extra, min_rate=min_rate)

    def read_through_map(self, offset: int, length: int) -> bytes:
        return read_direct(self.device, offset, length)

    def assert_host_on_destination(self, writer_region: tuple[int, int] | None = None, report: dict | None = None,
                                   other_source_volumes: bool = False) -> None:
        destination_backing = report["destination"]["backing"] if report else None
        assert_host_on_destination(self.map_name, self.wwid, self.data, self.backing_dir, self.source_backing,
                                   writer_region, self.block_size, other_source_volumes, destination_backing)

    def assert_host_on_source(self, writer_region: tuple[int, int] | None = None) -> None:
        """The map has only the source path, unfenced and running; writes land on the source."""
        targets = host_disks_by_target(self.map_name)
        assert list(targets.values()) == [lab.SOURCE_IQN], f"map paths: {targets}"
        found = multipath.map_for_wwid(self.wwid)
        assert found is not None and found.name == self.map_name
        assert multipath.logical_block_size(self.device) == self.block_size
        status = lab.lab_status()
        source = next(a for a in status["arrays"] if a["target"] == lab.SOURCE_IQN)
        assert not any(m["write_protect"] for v in source["volumes"] for m in v["mappings"]), "fence left on"
        destination = next(a for a in status["arrays"] if a["target"] == lab.DESTINATION_IQN)
        seen_by_host = [m for v in destination["volumes"] for m in v["mappings"] if m["initiator"] == self.host_initiator]
        assert seen_by_host == [], f"the host still has the destination mapped: {seen_by_host}"
        assert not multipath.is_suspended(self.map_name)
        start = writer_region[0] if writer_region else self.size
        assert read_file(self.source_backing, 16384, start - 16384) == self.data[16384:start]
        marker = os.urandom(4096)
        write_direct(self.device, 4096, marker)
        assert read_file(self.source_backing, 4096, 4096) == marker
        self.data = self.data[:4096] + marker + self.data[8192:]

    def assert_host_on_source_only(self, writer_region: tuple[int, int] | None = None) -> None:
        """After a rollback: map on the source only, nothing of the destination left, writes work."""
        self.assert_host_on_source(writer_region)
        assert glob.glob(os.path.join(self.backing_dir, "blockmig-*")) == []
        status = lab.lab_status()
        destination = next(a for a in status["arrays"] if a["target"] == lab.DESTINATION_IQN)
        assert destination["volumes"] == [], f"destination still has {destination['volumes']}"
        assert not [s for s in status["sessions"] if s["target"] == lab.DESTINATION_IQN]
        assert not [i for i in iscsi.list_ifaces() if i.startswith("blockmig-")]
        assert_no_served_destination()


@pytest.fixture
def migration_lab(lab_env, backing_dir, tmp_path, monkeypatch):
    """lab_env plus random data on the source and a journal folder of the test's own."""
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    try:
        yield MigrationLab(backing_dir)
    finally:
        release_held_io_and_migrator()


def add_host_volume(backing_dir: str, name: str, size: int = 16 * MiB, *, lun: int, mapped_lun: int | None = None,
                    block_size: int = 512, backstore: str = "fileio") -> MigrationLab:
    """Another volume of the source array that the host uses through a map of its own (found by a targeted scan)."""
    volume = lab.add_source_volume(name, size, backing_dir, lun=lun, mapped_lun=mapped_lun, block_size=block_size,
                                   backstore=backstore)
    host_lun = lun if mapped_lun is None else mapped_lun
    session = next(s for s in iscsi.sessions() if s.target_iqn == lab.SOURCE_IQN and s.iface == "default")
    iscsi.scan_session_lun(session, host_lun)
    iscsi.find_session_disk(session, host_lun, volume.wwid, 30)
    return MigrationLab(backing_dir, volume.backing, volume.wwid)
