"""The migration journal and the per-volume lock, on real files and real processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from blockmig.errors import JournalError, MigrationError, UsageError
from blockmig.state import MigrationJournal, VolumeLock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def state_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    monkeypatch.setenv("BLOCKMIG_LOCK_DIR", str(tmp_path / "lock"))


def test_journal_records_steps_and_survives_reload():
    journal = MigrationJournal.create("m1", source={"wwid": "36001405abc"}, fence="writeprotect")
    journal.mark_started("copy")
    journal.record("copy", source_disk="/dev/sdb")
    reloaded = MigrationJournal.load("m1")
    assert reloaded.step("copy")["state"] == "started"
    assert reloaded.facts("copy") == {"source_disk": "/dev/sdb"}
    reloaded.mark_done("copy", chunks=4)
    again = MigrationJournal.load("m1")
    assert again.is_done("copy") and again.facts("copy") == {"source_disk": "/dev/sdb", "chunks": 4}
    assert again.step("copy")["attempts"] == 1
    assert [j.id for j in MigrationJournal.list_all()] == ["m1"]
    with open(again.path) as handle:
        on_disk = json.load(handle)
    assert on_disk["format"] == "blockmig-migration/1" and on_disk["state"] == "running"
    assert not [name for name in os.listdir(again.directory) if name.endswith(".tmp")]


def test_journal_refuses_duplicates_strangers_and_bad_ids(tmp_path):
    MigrationJournal.create("m1", source={})
    with pytest.raises(MigrationError, match="already exists"):
        MigrationJournal.create("m1", source={})
    with pytest.raises(JournalError, match="no migration nosuch"):
        MigrationJournal.load("nosuch")
    with pytest.raises(UsageError, match="migration id: '../escape' is not an id"):
        MigrationJournal.create("../escape", source={})
    stranger = tmp_path / "migrations" / "m2"
    stranger.mkdir()
    (stranger / "journal.json").write_text('{"format": "something else", "id": "m2"}')
    with pytest.raises(JournalError, match="not the journal of migration m2"):
        MigrationJournal.load("m2")
    (stranger / "journal.json").write_text("{torn")
    with pytest.raises(JournalError, match="not valid JSON"):
        MigrationJournal.load("m2")


def test_lock_refuses_a_second_holder_and_names_the_first():
    with VolumeLock("36001405abc", "first"):
        with pytest.raises(MigrationError, match="already running.*migration first"):
            VolumeLock("36001405abc", "second").acquire()
        VolumeLock("36001405def", "other").acquire().release()  # another volume is free
    with VolumeLock("36001405abc", "second"):
        pass


def test_lock_of_a_killed_process_is_free_again():
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from blockmig.state import VolumeLock; VolumeLock('36001405abc', 'killed').acquire();"
         "print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MigrationError, match="killed"):
            VolumeLock("36001405abc", "resume").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            VolumeLock("36001405abc", "resume").acquire().release()
            break
        except MigrationError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_migrate_of_an_unknown_device_is_one_line_and_writes_no_journal(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "blockmig", "migrate", "/dev/mapper/blockmig-no-such-map",
         "--to-target", "iqn.2026-11.lab.blockmig:destination", "--to-portal", "127.0.0.2:3260"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 1
    assert result.stderr == "blockmig: error: no such device /dev/mapper/blockmig-no-such-map\n"
    assert not (tmp_path / "migrations").exists()
