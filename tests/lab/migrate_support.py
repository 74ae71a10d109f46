"""Helpers for the migrate lab tests: a host that reads its map, the CLI as a subprocess, checks.

The fixtures that build the lab are in conftest.py; these helpers only watch and ask.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from blockio import read_direct, read_file, write_direct

from blockmig import lab
from blockmig.host import iscsi, multipath

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
READ_BLOCK = 64 * 1024


def fill_volume(device: str, size: int, seed: int) -> bytes:
    """Random data written through the host's map, so a copy of zeros cannot pass."""
    data = random.Random(seed).randbytes(size)
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
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"blockmig {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def start_blockmig(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "blockmig", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def migrate_args(map_device: str, backing_dir: str, *extra: str) -> list[str]:
    return [
        "migrate", map_device,
        "--to-target", lab.DESTINATION_IQN,
        "--to-portal", "{}:{}".format(*lab.DESTINATION_PORTAL),
        "--backing-dir", backing_dir,
        "--chunk-size", "1M",
        "--json",
        *extra,
    ]


def report_of(result: subprocess.CompletedProcess) -> dict:
    for line in reversed(result.stdout.splitlines()):
        event = json.loads(line)
        if event.get("event") == "report":
            return event
    raise AssertionError(f"no report in the output; stderr: {result.stderr.strip()}")


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


def assert_host_on_destination(map_name: str, wwid: str, data: bytes, backing_dir: str, source_backing: str) -> None:
    """Same map name and WWID; its only path is on the destination; bytes equal; new writes land there."""
    found = multipath.map_for_wwid(wwid)
    assert found is not None and found.name == map_name, f"map for {wwid} is now {found}"
    paths = multipath.wait_for_map_paths(map_name, set(host_disks_by_target(map_name)))
    targets = host_disks_by_target(map_name)
    assert list(targets.values()) == [lab.DESTINATION_IQN], f"map paths: {targets}"
    assert all(path.usable for path in paths)
    destination_backing = destination_backing_file(backing_dir)
    assert subprocess.run(["cmp", source_backing, destination_backing]).returncode == 0
    assert read_file(destination_backing, 0, len(data)) == data
    # A new write through the map lands on the destination, not on the source.
    marker = os.urandom(4096)
    write_direct(found.device, 8192, marker)
    assert read_file(destination_backing, 8192, 4096) == marker
    assert read_file(source_backing, 8192, 4096) == data[8192:8192 + 4096]
    assert not any(s.target_iqn == lab.SOURCE_IQN for s in iscsi.sessions()), "host still logged in to the source"


def destination_backing_file(backing_dir: str) -> str:
    found = glob.glob(os.path.join(backing_dir, "blockmig-*.img"))
    assert len(found) == 1, f"destination backing files: {found}"
    return found[0]


def release_held_io_and_migrator() -> None:
    """After a failed test: no suspended map, no migrator iface, no multipath drop-in left for the next one."""
    for found in multipath.maps():
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

    def __init__(self, backing_dir: str):
        self.backing_dir = backing_dir
        self.source_backing = lab.source_backing_file(backing_dir)
        self.wwid = lab.SOURCE_WWID
        found = multipath.map_for_wwid(self.wwid)
        assert found is not None, "lab_up made no multipath map"
        self.map_name = found.name
        self.device = found.device
        self.size = os.path.getsize(self.source_backing)
        self.data = fill_volume(self.device, self.size, seed=hash(backing_dir) & 0xFFFF)

    def migrate_args(self, *extra: str) -> list[str]:
        return migrate_args(self.device, self.backing_dir, *extra)

    def assert_host_on_destination(self) -> None:
        assert_host_on_destination(self.map_name, self.wwid, self.data, self.backing_dir, self.source_backing)

    def assert_host_on_source_only(self) -> None:
        """After a rollback: map on the source only, nothing of the destination left, writes work."""
        targets = host_disks_by_target(self.map_name)
        assert list(targets.values()) == [lab.SOURCE_IQN], f"map paths: {targets}"
        assert glob.glob(os.path.join(self.backing_dir, "blockmig-*")) == []
        status = lab.lab_status()
        destination = next(a for a in status["arrays"] if a["target"] == lab.DESTINATION_IQN)
        assert destination["volumes"] == [], f"destination still has {destination['volumes']}"
        assert not [s for s in status["sessions"] if s["target"] == lab.DESTINATION_IQN]
        assert not [i for i in iscsi.list_ifaces() if i.startswith("blockmig-")]
        source = next(a for a in status["arrays"] if a["target"] == lab.SOURCE_IQN)
        assert not any(m["write_protect"] for v in source["volumes"] for m in v["mappings"]), "fence left on"
        assert not multipath.is_suspended(self.map_name)
        marker = os.urandom(4096)
        write_direct(self.device, 4096, marker)
        assert read_file(self.source_backing, 4096, 4096) == marker


@pytest.fixture
def migration_lab(lab_env, backing_dir, tmp_path, monkeypatch):
    """lab_env plus random data on the source and a journal folder of the test's own."""
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    try:
        yield MigrationLab(backing_dir)
    finally:
        release_held_io_and_migrator()
