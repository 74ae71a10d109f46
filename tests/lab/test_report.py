"""The picture and the audit trail of a real migration: an online one (pass-through) with writers.

The test runs blockmig as an admin would (the CLI, `--json`), listens on its own syslog socket
(BLOCKMIG_SYSLOG_SOCKET) and then checks what `blockmig report --plot` draws against what the journal
and the events recorded: rows, steps, delta passes, no hold. Drawn in-process too, to read the figure's
objects. The picture of a plan (rows, holds, control-plane waits) is checked in test_plan.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from lvm_support import RAW_LV, RAW_SIZE, assert_moved, lvm_lab
from migrate_support import REPO, MiB, blockmig, journal, migrate_args
from workloads import RawWriter

from blockmig import lab, report, timeline
from blockmig.orchestrator import pass_through
from blockmig.state import MigrationJournal


@pytest.fixture
def small_lvm_host(backing_dir, tmp_path, monkeypatch):
    """lvm_support's host on a 64 MiB volume with a lighter raw writer (2 MiB hot set), so that the deltas
    converge under qemu's emulated CPU too and the test stays short."""
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    with lvm_lab(64 * MiB, backing_dir, tmp_path, 16 * MiB) as host:
        host.writer = RawWriter(RAW_LV, RAW_SIZE, region=(0, 2 * MiB), interval=0.02)
        yield host


@pytest.fixture
def syslog(tmp_path, monkeypatch):
    """A unix datagram socket standing in for /dev/log; blockmig's children inherit the variable."""
    path = f"/tmp/blockmig-syslog-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    listener.bind(path)
    monkeypatch.setenv(timeline.SYSLOG_SOCKET_ENV, path)
    try:
        yield listener
    finally:
        listener.close()
        os.unlink(path)


def audit_records(listener) -> list[dict]:
    """Every datagram received so far, as {"tag": ..., "priority": ..., field: value}."""
    records = []
    listener.setblocking(False)
    while True:
        try:
            line = listener.recv(65536).decode()
        except BlockingIOError:
            return records
        head, body = line.split(": ", 1)
        priority, tag = head[1:].split(">", 1)
        fields = {}
        for part in body.split(" "):
            key, value = part.split("=", 1)
            fields[key] = value
        records.append({"priority": int(priority), "tag": tag, **fields})


def keep_in_results(migration_id: str, png: str) -> None:
    """The picture and the records it was drawn from, in the shared folder (.lab/results), which outlives the
    guest: README's image is one of these."""
    kept = os.path.join(REPO, ".lab", "results", f"report-{migration_id}")
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(MigrationJournal.load(migration_id).directory, kept,
                    ignore=shutil.ignore_patterns("copy.json", "manifest.json"))
    shutil.copy(png, kept)


def gids(ax, prefix: str) -> list:
    return [a for a in list(ax.patches) + list(ax.texts) if (a.get_gid() or "").startswith(prefix)]


def test_an_online_migration_draws_its_passes_and_audits_each_milestone(small_lvm_host, syslog, tmp_path):
    lvm_host = small_lvm_host
    lvm_host.start()
    try:
        # no --mode: LVM on the map moves online. qemu's emulated CPU copies deltas at a few MB/s: a longer
        # --max-hold than a real host's
        result = blockmig(*migrate_args(lvm_host.map_device, lvm_host.backing_dir, "--id", "pic",
                                        "--max-hold", "15"), timeout=900)
        if result.returncode != 0:  # a failed migration has its picture too: kept for whoever looks into it
            blockmig("report", "pic", "--plot", str(tmp_path / "pic-failed.png"))
            keep_in_results("pic", str(tmp_path / "pic-failed.png"))
        assert result.returncode == 0, result.stderr
    finally:
        lvm_host.stop()
    migration = assert_moved(lvm_host, result)
    records = audit_records(syslog)
    data = journal("pic")

    # the audit trail: one record per milestone, each with every field (a pass-through's "switched" is its
    # commit, with the longest one piece's writes were held)
    assert [r["event"] for r in records] == ["planned", "destination_created", "switched", "finished"]
    assert float(records[2]["io_held_seconds"]) == data["steps"]["commit"]["facts"]["writes_held_seconds"]
    for record in records:
        assert record["priority"] == 14 and record["tag"].startswith("blockmig[")  # user.info
        assert record["id"] == "pic" and record["wwid"] == lab.SOURCE_WWID == data["source"]["wwid"]
        assert record["source"] == f"{lab.SOURCE_IQN}/{data['source']['volume']}"
        assert record["destination"] == f"{lab.DESTINATION_IQN}/blockmig-pic"
    assert records[-1]["digest"] == f"sha256:{migration['volume_digest']}"
    assert "blockmig[" not in result.stderr + result.stdout, "an audit record was printed as well"

    # what the writer measured itself: its longest single IO, for the picture
    stall = lvm_host.writer.stall
    timeline.record_host_io(MigrationJournal.load("pic"), stall.max, time.time() - (time.monotonic()
                                                                                      - stall.worst_ended_at))
    png = tmp_path / "pic.png"
    shown = blockmig("report", "pic", "--plot", str(png))
    assert shown.returncode == 0, shown.stderr
    assert f"volume digest sha256:{migration['volume_digest']}" in shown.stdout and png.stat().st_size > 10_000
    keep_in_results("pic", str(png))
    print(f"\npicture: {png} ({png.stat().st_size} bytes)")

    figure = report.draw(report.load("pic"), str(tmp_path / "pic.svg"))
    steps_ax, rate_ax, delta_ax = figure.axes[:3]
    assert [t.get_text() for t in steps_ax.get_yticklabels()] == [f"{lvm_host.map_name}\ndone"]
    assert sorted(p.get_gid().split(":")[1] for p in gids(steps_ax, "step:")) == sorted(
        step.name for step in pass_through.STEPS)
    # each pass drawn where it was listed (how much was dirty then; a pass copies what is dirty when it starts)
    copied = sorted(int(p.get_gid().split(":")[1]) for p in gids(delta_ax, "delta:"))
    assert copied == [p["pass"] for p in data["online"]["passes"]]
    assert gids(delta_ax, "listed:"), "no listing left to the commit"
    assert not gids(steps_ax, "hold"), "host IO held at a path change"
    assert [t.get_text() for t in gids(steps_ax, "label:host-io")] == [f"longest host IO {stall.max:.1f} s"]
    copy_lines = [line for line in rate_ax.get_lines() if line.get_gid() == "rate:pic:copy"]
    assert copy_lines and max(copy_lines[0].get_ydata()) > 0

