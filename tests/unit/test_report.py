"""The event record (timeline.py), the picture drawn from it (report.py) and `blockmig report`.

The records are made by the real Recorder from the events a migration emits, on a clock the test turns
(no sleeping, nothing timed); the picture is checked through matplotlib's own objects. The lab test
tests/lab/test_report.py draws real migrations.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from blockmig import cli, report, timeline
from blockmig.state import STEPS, MigrationJournal, PlanJournal

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "state" / "migrations"))
    monkeypatch.setenv(timeline.SYSLOG_SOCKET_ENV, str(tmp_path / "no-syslog-here"))
    return tmp_path


class Clock:
    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_journal(migration_id: str, map_name: str = "mpatha", mode: str = "pass-through", plan: str | None = None):
    return MigrationJournal.create(
        migration_id, plan=plan, mode=mode,
        source={"device": f"/dev/mapper/{map_name}", "map": map_name, "wwid": f"36001405{migration_id}",
                "size": SIZE, "target": "iqn.2026-11.lab.blockmig:source", "volume": f"src-{map_name}"},
        destination={"target": "iqn.2026-11.lab.blockmig:destination", "volume": f"blockmig-{migration_id}"},
        migrator={}, fence="none", switch="multipath", worm=False, chunk_size=MiB)


def run_recorded_migration(journal, clock: Clock, emit, wait_seconds: float = 0.0) -> None:
    """The events a migration emits, every step of both tables: a pass-through's delta passes (pass_through.py)
    and an offline switch's hold (host_switch.py), so that one picture has them all."""

    def step(name: str, seconds: float, facts: dict | None = None) -> None:
        journal.mark_started(name)
        emit({"event": "step", "step": name, "state": "started"})
        if name == "copy" and wait_seconds:
            emit({"event": "control_plane_wait", "state": "started"})
            clock.advance(wait_seconds)
            emit({"event": "control_plane_wait", "state": "done", "seconds": wait_seconds})
        body = {"copy": copy_body, "verify": verify_body, "switch": switch_body}.get(name)
        if body:
            body()
        clock.advance(seconds)
        journal.mark_done(name, **(facts or {}))
        emit({"event": "step", "step": name, "state": "done", **(facts or {})})

    def stream(phase: str, start_kind: str, chunk_kind: str, done_kind: str, seconds_per_chunk: float) -> None:
        emit({"event": start_kind, "size": SIZE, "phase": phase})
        for n in range(1, 65):
            clock.advance(seconds_per_chunk)
            emit({"event": chunk_kind, "bytes": n * MiB, "total": SIZE, "rate": MiB / seconds_per_chunk,
                  "phase": phase, "reserved_address": n * MiB, "end": n * MiB})
        emit({"event": done_kind, "size": SIZE, "phase": phase})

    def copy_body() -> None:
        stream("copy", "start", "chunk", "done", 0.25)  # 16 s at 4 MiB/s: 16 samples of 64 chunks
        for number, chunks in ((1, 12), (2, 5)):
            clock.advance(1.0)
            emit({"event": "delta", "pass": number, "chunks": chunks, "bytes": chunks * MiB, "estimated_hold": 1})

    def verify_body() -> None:
        stream("verify", "verify_start", "verified_chunk", "verify_done", 0.125)

    def switch_body() -> None:
        clock.advance(0.5)
        emit({"event": "io_held", "map": journal.data["source"]["map"]})
        emit({"event": "switch_phase", "phase": "held", "seconds_since_hold": 0.0})
        clock.advance(2.5)
        emit({"event": "io_resumed", "map": journal.data["source"]["map"], "io_held_seconds": 2.5})

    for name in STEPS:
        facts = {"switch": {"io_held_seconds": 2.5}, "commit": {"writes_held_seconds": 0.25},
                 "copy": {"volume_digest": "ab" * 32, "seconds": 18.0}}
        step(name, 0.5, facts.get(name))
    journal.set_state("done", report={**_minimal_report(journal.id), "volume_digest": "ab" * 32})


def recorded_migration(migration_id: str = "m1", **kwargs) -> MigrationJournal:
    journal = new_journal(migration_id)
    clock = Clock()
    run_recorded_migration(journal, clock, timeline.Recorder(journal, clock=clock), **kwargs)
    return journal


def artists(ax, prefix: str) -> list:
    return [a for a in list(ax.patches) + list(ax.texts) + list(ax.lines) if (a.get_gid() or "").startswith(prefix)]


# ---------------------------------------------------------------------------
# the record


def test_the_record_keeps_the_story_and_samples_progress_once_a_second(state_dir):
    journal = recorded_migration()
    records = timeline.load_records(journal.directory)
    kinds = [record["e"] for record in records]
    assert kinds[0] == "planned"
    assert [r["step"] for r in records if r["e"] == "step" and r["state"] == "done"] == list(STEPS)
    copy_samples = [r for r in records if r["e"] == "progress" and r["phase"] == "copy"]
    verify_samples = [r for r in records if r["e"] == "progress" and r["phase"] == "verify"]
    assert len(copy_samples) == 16  # 64 chunks in 16 s: one a second
    assert len(verify_samples) == 8  # 64 chunks in 8 s
    assert all(b["t"] - a["t"] >= 1.0 for a, b in zip(copy_samples, copy_samples[1:]))
    assert [(r["pass"], r["bytes"]) for r in records if r["e"] == "delta"] == [(1, 12 * MiB), (2, 5 * MiB)]
    assert [r.get("io_held_seconds") for r in records if r["e"] == "io_resumed"] == [2.5]
    audits = [r["event"] for r in records if r["e"] == "audit"]
    assert audits == ["planned", "destination_created", "switched", "finished"]


def test_the_record_is_bounded_progress_samples_go_first(state_dir, monkeypatch):
    monkeypatch.setattr(timeline, "MAX_RECORD_BYTES", 2000)
    journal = recorded_migration()
    records = timeline.load_records(journal.directory)
    assert os.path.getsize(timeline.events_path(journal.directory)) < 2000 + 4000  # the story, no more samples
    assert len([r for r in records if r["e"] == "progress"]) < 16
    assert [r["step"] for r in records if r["e"] == "step" and r["state"] == "done"] == list(STEPS)


def test_a_torn_last_line_is_left_out(state_dir):
    journal = recorded_migration()
    with open(timeline.events_path(journal.directory), "a") as handle:
        handle.write('{"t": 1, "e": "prog')
    assert timeline.load_records(journal.directory)[-1]["e"] == "audit"


def test_a_failure_and_a_rollback_are_recorded_by_the_wrapper(state_dir):
    journal = new_journal("m2", mode="offline")
    events = []
    with pytest.raises(RuntimeError):
        with timeline.recording(journal, events.append) as emit:
            emit({"event": "step", "step": "plan", "state": "started"})
            journal.mark_failed("plan: the map is gone")
            raise RuntimeError("migration m2 stopped in step plan: the map is gone")
    with timeline.recording(journal, events.append, "rollback") as emit:
        emit({"event": "rollback", "id": "m2"})
    records = timeline.load_records(journal.directory)
    failed = [r for r in records if r["e"] == "failed"]
    assert [r["error"] for r in failed] == ["migration m2 stopped in step plan: the map is gone"]
    assert [r["event"] for r in records if r["e"] == "audit"] == ["planned", "failed", "rolled_back"]
    assert [e["event"] for e in events] == ["step", "rollback"]  # the caller's handler sees every event once


def test_control_plane_waits_only_when_another_holds_it(state_dir):
    import threading

    lock = threading.RLock()
    events = []
    with timeline.control_plane(lock, events.append):
        pass
    assert events == []
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    timer = threading.Timer(0.2, release.set)
    timer.start()
    with timeline.control_plane(lock, events.append):
        pass
    thread.join()
    assert [(e["event"], e["state"]) for e in events] == [("control_plane_wait", "started"),
                                                          ("control_plane_wait", "done")]


# ---------------------------------------------------------------------------
# the picture


def test_the_picture_shows_steps_rates_passes_and_the_hold(state_dir, tmp_path):
    journal = recorded_migration(wait_seconds=3.0)
    timeline.record_host_io(journal, 2.7, timeline.load_records(journal.directory)[-1]["t"] - 2.0)
    picture = report.load("m1")
    figure = report.draw(picture, str(tmp_path / "m1.png"))
    assert (tmp_path / "m1.png").stat().st_size > 10_000
    steps_ax, rate_ax, delta_ax = figure.axes[:3]
    assert [label.get_text() for label in steps_ax.get_yticklabels()] == ["mpatha\ndone"]
    drawn = sorted(gid.split(":")[1] for gid in (p.get_gid() for p in artists(steps_ax, "step:")))
    assert drawn == sorted(STEPS)
    copy_bar = next(p for p in artists(steps_ax, "step:copy"))
    assert copy_bar.get_width() == pytest.approx(3.0 + 16.0 + 2.0 + 0.5)  # wait, pass 1, two delta passes, done
    wait = artists(steps_ax, "wait")
    assert len(wait) == 1 and wait[0].get_width() == pytest.approx(3.0) and wait[0].get_x() == copy_bar.get_x()
    hold = artists(steps_ax, "hold")
    assert len(hold) == 1 and hold[0].get_width() == pytest.approx(2.5)
    assert [t.get_text() for t in artists(steps_ax, "label:hold")] == ["host IO held 2.5 s"]
    assert [t.get_text() for t in artists(steps_ax, "label:host-io")] == ["longest host IO 2.7 s"]
    passes = {p.get_gid(): p.get_height() for p in artists(delta_ax, "delta:") + artists(delta_ax, "listed:")}
    # pass 1 copied; the listing of pass 2 found it small enough to leave (to the commit)
    assert passes == {"delta:1": pytest.approx(12), "listed:2": pytest.approx(5)}
    copy_rate = next(line for line in rate_ax.get_lines() if line.get_gid() == "rate:m1:copy")
    assert max(copy_rate.get_ydata()) == pytest.approx(MiB / 0.25 / 1e6)
    verify_rate = next(line for line in rate_ax.get_lines() if line.get_gid() == "rate:m1:verify")
    assert max(verify_rate.get_ydata()) == pytest.approx(MiB / 0.125 / 1e6)


def test_a_failed_migration_has_its_picture_with_the_failure_marked(state_dir, tmp_path):
    journal = new_journal("m3", mode="offline")
    with pytest.raises(RuntimeError):
        with timeline.recording(journal, None) as emit:
            for name in ("plan", "create_destination", "fence", "copy"):
                journal.mark_started(name)
                emit({"event": "step", "step": name, "state": "started"})
                if name != "copy":
                    journal.mark_done(name)
                    emit({"event": "step", "step": name, "state": "done"})
            journal.mark_failed("copy: /dev/sdc: EIO")
            raise RuntimeError("migration m3 stopped in step copy: /dev/sdc: EIO")
    figure = report.draw(report.load("m3"), str(tmp_path / "m3.svg"))
    steps_ax, _, delta_ax = figure.axes[:3]
    assert [p.get_gid() for p in artists(steps_ax, "step:copy")] == ["step:copy:failed"]
    assert [t.get_text() for t in artists(steps_ax, "label:failed")] == [
        "failed: migration m3 stopped in step copy: /dev/sdc: EIO"]
    assert artists(delta_ax, "no-deltas") and not artists(delta_ax, "delta:")
    assert (tmp_path / "m3.svg").read_text().startswith("<?xml")


def test_a_plan_has_a_row_per_volume(state_dir, tmp_path):
    journals = [new_journal(f"p1-{n}", map_name=f"mpath{c}", plan="p1") for n, c in enumerate("abc")]
    PlanJournal.create("p1", members=[j.id for j in journals], policy="each", parallel=2, state="done")
    clock = Clock()
    with timeline.recording_plan(journals, None) as emit:
        for number, journal in enumerate(journals):
            clock.now = Clock().now + number  # each member starts a second after the previous one
            recorder = timeline.Recorder(journal, clock=clock)
            run_recorded_migration(journal, clock, lambda e, r=recorder: r(e), wait_seconds=number * 2.0)
        emit({"event": "plan", "id": "p1", "members": []})
    figure = report.draw(report.load("p1"), str(tmp_path / "p1.png"))
    steps_ax = figure.axes[0]
    assert [label.get_text().split("\n")[0] for label in steps_ax.get_yticklabels()] == ["mpatha", "mpathb", "mpathc"]
    assert len(artists(steps_ax, "hold")) == 3
    assert sorted(round(p.get_width(), 3) for p in artists(steps_ax, "wait")) == [2.0, 4.0]


# ---------------------------------------------------------------------------
# the command and the audit trail


def test_blockmig_report_prints_the_report_and_draws(state_dir, tmp_path, capsys):
    recorded_migration()
    assert cli.main(["report", "m1", "--plot", str(tmp_path / "out.png")]) == 0
    out = capsys.readouterr().out
    assert "volume digest sha256:" + "ab" * 32 in out and f"picture: {tmp_path / 'out.png'}" in out
    assert (tmp_path / "out.png").exists()
    assert cli.main(["report", "m1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["e"] for r in document["migrations"][0]["events"]][0] == "planned"


def test_blockmig_report_refuses_a_bad_suffix_and_an_unknown_id(state_dir, tmp_path, capsys):
    recorded_migration()
    assert cli.main(["report", "m1", "--plot", str(tmp_path / "out.pdf")]) == 2
    assert "must end in .svg or .png" in capsys.readouterr().err
    assert not (tmp_path / "out.pdf").exists()
    assert cli.main(["report", "nosuch"]) == 1
    assert "no migration nosuch" in capsys.readouterr().err


def test_without_matplotlib_one_line_says_how_to_get_it(state_dir, tmp_path):
    recorded_migration()
    code = ("import sys; sys.modules['matplotlib'] = None; from blockmig import cli; "
            f"sys.exit(cli.main(['report', 'm1', '--plot', {str(tmp_path / 'x.png')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"blockmig: error: {report.MATPLOTLIB_MISSING}"]


def _minimal_report(migration_id: str) -> dict:
    return {"id": migration_id, "map": "mpatha", "wwid": f"36001405{migration_id}", "size": SIZE, "chunks": 64, "chunk_size": MiB,
            "source": {"target": "s", "backing": "/x"}, "destination": {"target": "d", "backing": "/y"},
            "copy_seconds": 1, "verify_seconds": 1, "io_held_seconds": 2.5, "total_seconds": 30, "fence": "none",
            "switch": "multipath", "worm": False, "host_disk": "sdc"}


@pytest.fixture
def syslog_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "log.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(5)
    monkeypatch.setenv(timeline.SYSLOG_SOCKET_ENV, path)
    yield listener
    listener.close()


def received(listener) -> list[str]:
    lines = []
    listener.setblocking(False)
    while True:
        try:
            lines.append(listener.recv(65536).decode())
        except BlockingIOError:
            return lines


def test_audit_records_go_to_the_syslog_socket_with_every_field(state_dir, syslog_socket):
    recorded_migration()
    lines = received(syslog_socket)
    assert [line.split("event=")[1].split()[0] for line in lines] == [
        "planned", "destination_created", "switched", "finished"]
    for line in lines:
        assert line.startswith(f"<14>blockmig[{os.getpid()}]: event=")  # user.info, RFC 3164 tag
        fields = dict(part.split("=", 1) for part in line.split(": ", 1)[1].split())
        assert fields["id"] == "m1" and fields["wwid"] == "36001405m1"
        assert fields["source"] == "iqn.2026-11.lab.blockmig:source/src-mpatha"
        assert fields["destination"] == "iqn.2026-11.lab.blockmig:destination/blockmig-m1"
    # switched once, at the online move's commit (this fake runs both tables' steps: the commit comes first)
    assert "digest=sha256:" + "ab" * 32 in lines[-1] and "io_held_seconds=0.25" in lines[2]


@pytest.mark.parametrize("mode, step, facts, held", [("offline", "switch", {"io_held_seconds": 2.5}, "2.5"),
                                                      ("pass-through", "commit", {"writes_held_seconds": 0.1}, "0.1")])
def test_switched_is_audited_at_the_offline_switch_and_at_the_online_commit(state_dir, syslog_socket, mode, step,
                                                                             facts, held):
    journal = new_journal("m6", mode=mode)
    recorder = timeline.Recorder(journal)
    journal.mark_started(step)
    journal.mark_done(step, **facts)
    recorder({"event": "step", "step": step, "state": "done", **facts})
    lines = received(syslog_socket)
    assert [line.split("event=")[1].split()[0] for line in lines] == ["planned", "switched"], lines
    assert lines[1].endswith(f"io_held_seconds={held}"), lines


def test_a_failure_is_one_error_record_and_no_syslog_turns_it_off(state_dir, syslog_socket):
    journal = new_journal("m4", mode="offline")
    with pytest.raises(RuntimeError):
        with timeline.recording(journal, None):
            raise RuntimeError('copy: "/dev/sdc" gone')
    lines = received(syslog_socket)
    assert lines[-1].startswith("<11>blockmig[")  # user.err
    assert lines[-1].endswith('error="copy: \\"/dev/sdc\\" gone"')
    timeline.set_syslog(False)
    try:
        journal = new_journal("m5", mode="offline")
        with timeline.recording(journal, None):
            pass
        assert received(syslog_socket) == []
    finally:
        timeline.set_syslog(True)


def test_no_syslog_socket_is_skipped_silently(state_dir, capsys):
    recorded_migration()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("command", [["migrate", "/dev/nosuch"], ["resume", "m1"], ["rollback", "m1"]])
def test_no_syslog_is_taken_by_migrate_resume_and_rollback(state_dir, command, capsys):
    args = cli.build_parser().parse_args([*command, "--no-syslog"])
    try:
        assert cli.run(args) != 0  # no such device / migration: refused, one line
        assert not timeline._syslog_enabled
    finally:
        timeline.set_syslog(True)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
