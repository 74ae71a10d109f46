"""The sequencer driven with fake steps over a real journal: resume, failure, invalidation, rollback.

The real steps run on the real stack in tests/lab (test_migrate*, test_switch_crash, test_plan, ...).
"""

from __future__ import annotations

import os
import threading

import pytest

from blockmig.errors import HostError, MigrationError
from blockmig.orchestrator.migration import STEPS, Migration
from blockmig.orchestrator.sequencer import BaseStep, Sequencer
from blockmig.state import MigrationJournal

NAMES = ("plan", "create_destination", "fence", "copy", "verify", "switch", "finish")


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))


class Log(list):
    """What the fake steps did, in order: ("run", name), ("after_failure", name, failed), ("undo", name),
    ..."""


class FakeStep(BaseStep):
    def __init__(self, name: str, log: Log, invalidates: tuple[str, ...] = (), control_plane: bool = True):
        self.name = name
        self.log = log
        self.invalidates = invalidates
        self.needs_control_plane = control_plane
        self.failures_left = 0  # run raises this many times
        self.undo_failures_left = 0
        self.cleanup_fails = False
        self.refuse_undo = False

    def run(self, migration) -> dict:
        self.log.append(("run", self.name, migration.lock.held))
        if self.failures_left:
            self.failures_left -= 1
            raise HostError(f"{self.name} failed")
        return {"ran": self.name}

    def after_failure(self, migration, failed: str) -> None:
        self.log.append(("after_failure", self.name, failed))
        if self.cleanup_fails:
            raise HostError(f"{self.name} could not clean up")

    def check_undo(self, migration) -> None:
        if self.refuse_undo:
            raise MigrationError(f"{self.name} cannot be undone")

    def undo(self, migration) -> None:
        self.log.append(("undo", self.name))
        if self.undo_failures_left:
            self.undo_failures_left -= 1
            raise HostError(f"{self.name} undo failed")

    def forget(self, migration) -> None:
        self.log.append(("forget", self.name))


class RecordingLock:
    """A lock that says whether it is held (the control-plane lock of one process)."""

    def __init__(self):
        self.held = False
        self._lock = threading.RLock()

    def __enter__(self):
        self._lock.acquire()
        self.held = True

    def __exit__(self, *exc_info):
        self.held = False
        self._lock.release()


class FakeMigration:
    def __init__(self, sequencer: Sequencer, lock: RecordingLock):
        self.sequencer = sequencer
        self.lock = lock
        self.events: list[dict] = []

    def emit(self, event: dict) -> None:
        self.events.append(event)

    def invalidate(self, name: str) -> None:
        self.sequencer.invalidate(self, name)


def make(invalidates: dict[str, tuple[str, ...]] | None = None, data_steps=("copy", "verify")):
    log = Log()
    steps = [FakeStep(name, log, (invalidates or {}).get(name, ()), name not in data_steps) for name in NAMES]
    journal = MigrationJournal.create("m1", source={"wwid": "w"})
    lock = RecordingLock()
    sequencer = Sequencer(steps, journal, lock)
    return steps, log, journal, FakeMigration(sequencer, lock)


def runs(log: Log) -> list[str]:
    return [entry[1] for entry in log if entry[0] == "run"]


def test_steps_run_in_table_order_and_their_facts_are_journaled():
    steps, log, journal, migration = make()
    assert migration.sequencer.run(migration) is True
    assert runs(log) == list(NAMES)
    reloaded = MigrationJournal.load("m1")
    assert all(reloaded.is_done(name) and reloaded.facts(name) == {"ran": name} for name in NAMES)
    assert [e["step"] for e in migration.events if e["state"] == "done"] == list(NAMES)


def test_control_plane_lock_is_held_only_by_steps_that_need_it():
    steps, log, journal, migration = make()
    migration.sequencer.run(migration)
    held = {entry[1]: entry[2] for entry in log if entry[0] == "run"}
    assert held == {name: name not in ("copy", "verify") for name in NAMES}


@pytest.mark.parametrize("failing", range(len(NAMES)))
def test_resume_after_a_failure_at_each_step_runs_that_step_and_the_rest_once(failing):
    steps, log, journal, migration = make()
    steps[failing].failures_left = 1
    with pytest.raises(MigrationError, match=rf"stopped in step {NAMES[failing]}: {NAMES[failing]} failed"):
        migration.sequencer.run(migration)
    assert runs(log) == list(NAMES[: failing + 1])
    reloaded = MigrationJournal.load("m1")
    assert reloaded.data["state"] == "failed"
    assert reloaded.data["error"] == f"{NAMES[failing]}: {NAMES[failing]} failed"
    assert [name for name in NAMES if reloaded.is_done(name)] == list(NAMES[:failing])
    # after every failure, every step (last first) is told which one failed
    cleanups = [entry[1:] for entry in log if entry[0] == "after_failure"]
    assert cleanups == [(name, NAMES[failing]) for name in reversed(NAMES)]
    log.clear()
    again = FakeMigration(Sequencer(steps, MigrationJournal.load("m1"), migration.lock), migration.lock)
    assert again.sequencer.run(again) is True
    assert runs(log) == list(NAMES[failing:])
    assert all(MigrationJournal.load("m1").is_done(name) for name in NAMES)


def test_a_cleanup_that_fails_is_reported_with_the_error():
    steps, log, journal, migration = make()
    steps[3].failures_left = 1
    steps[2].cleanup_fails = True
    with pytest.raises(MigrationError, match="copy failed; cleaning up failed too: fence could not clean up"):
        migration.sequencer.run(migration)


def test_an_error_not_ours_is_not_reworded_but_is_journaled():
    steps, log, journal, migration = make()

    def interrupted(_migration):
        raise KeyboardInterrupt

    steps[4].run = interrupted
    with pytest.raises(KeyboardInterrupt):
        migration.sequencer.run(migration)
    assert MigrationJournal.load("m1").data["error"] == "verify: KeyboardInterrupt"


def test_run_until_stops_before_that_step():
    steps, log, journal, migration = make()
    assert migration.sequencer.run(migration, until="switch") is False
    assert runs(log) == list(NAMES[:5])
    assert migration.sequencer.run(migration) is True
    assert runs(log) == list(NAMES)


def test_invalidation_forgets_the_step_and_what_it_invalidates_transitively():
    steps, log, journal, migration = make(
        {"fence": ("copy",), "copy": ("verify", "switch"), "verify": ("switch",)}
    )
    migration.sequencer.run(migration, until="finish")
    log.clear()
    migration.invalidate("fence")
    reloaded = MigrationJournal.load("m1")
    assert [name for name in NAMES if reloaded.is_done(name)] == ["plan", "create_destination"]
    assert [entry[1] for entry in log if entry[0] == "forget"] == ["fence", "copy", "verify", "switch"]
    migration.sequencer.run(migration)
    assert runs(log) == ["fence", "copy", "verify", "switch", "finish"]


def test_a_step_that_invalidates_itself_while_it_fails_runs_again_from_its_invalidation():
    steps, log, journal, migration = make({"fence": ("copy", "verify")})

    def verify_finds_a_broken_fence(_migration):
        migration.invalidate("fence")
        raise HostError("the source changed")

    migration.sequencer.run(migration, until="verify")
    steps[4].run = verify_finds_a_broken_fence
    with pytest.raises(MigrationError, match="stopped in step verify: the source changed"):
        migration.sequencer.run(migration)
    reloaded = MigrationJournal.load("m1")
    assert [name for name in NAMES if reloaded.is_done(name)] == ["plan", "create_destination"]


def test_rollback_undoes_every_step_last_first():
    steps, log, journal, migration = make()
    migration.sequencer.run(migration, until="switch")
    log.clear()
    migration.sequencer.rollback(migration)
    assert [entry[1] for entry in log if entry[0] == "undo"] == list(reversed(NAMES))
    assert MigrationJournal.load("m1").data["state"] == "rolled_back"
    assert migration.events[-1] == {"event": "rollback", "id": "m1"}


def test_rollback_refused_by_a_step_changes_nothing():
    steps, log, journal, migration = make()
    migration.sequencer.run(migration)
    steps[5].refuse_undo = True
    log.clear()
    with pytest.raises(MigrationError, match="switch cannot be undone"):
        migration.sequencer.rollback(migration)
    assert not log
    assert MigrationJournal.load("m1").data["state"] == "running"


def test_a_step_whose_undo_fails_stops_the_rollback_and_a_second_rollback_finishes_it():
    steps, log, journal, migration = make()
    migration.sequencer.run(migration, until="verify")
    steps[2].undo_failures_left = 1  # the fence cannot be lifted the first time
    log.clear()
    with pytest.raises(HostError, match="fence undo failed"):
        migration.sequencer.rollback(migration)
    assert [entry[1] for entry in log if entry[0] == "undo"] == [
        "finish",
        "switch",
        "verify",
        "copy",
        "fence",
    ]
    assert MigrationJournal.load("m1").data["state"] == "rolling_back"
    log.clear()
    migration.sequencer.rollback(migration)
    assert [entry[1] for entry in log if entry[0] == "undo"] == list(reversed(NAMES))
    assert MigrationJournal.load("m1").data["state"] == "rolled_back"


# ---------------------------------------------------------------------------
# the real table's declarations


def real_migration(done: tuple[str, ...]) -> Migration:
    """An offline migration of the real table with `done` steps done and a copy journal on disk."""
    journal = MigrationJournal.create(
        "real",
        source={"wwid": "w", "map": "mpatha"},
        destination={},
        migrator={},
        mode="offline",
        fence="writeprotect",
    )
    for name in done:
        journal.mark_done(name)
    with open(journal.copy_journal_path, "w") as handle:
        handle.write("{}")
    return Migration(journal)


def test_the_table_is_the_seven_steps_with_data_steps_outside_the_lock():
    assert tuple(step.name for step in STEPS) == NAMES
    assert [step.name for step in STEPS if not step.needs_control_plane] == ["copy", "verify"]


def test_a_lifted_fence_invalidates_copy_verify_and_switch():
    migration = real_migration(NAMES)
    migration.invalidate("fence")
    assert [name for name in NAMES if migration.journal.is_done(name)] == [
        "plan",
        "create_destination",
        "finish",
    ]
    assert not os.path.exists(migration.journal.copy_journal_path)  # the copy starts again from byte 0


def test_a_journal_written_by_the_previous_layout_loads_and_its_switch_facts_read_back():
    """Same format (blockmig-migration/1) and fact names; `source_unmapped`, no longer written, is ignored."""
    from blockmig.orchestrator.host_switch import SwitchFacts

    journal = MigrationJournal.create("old", source={"wwid": "w"}, destination={}, migrator={})
    journal.record("switch", prepared=True, destination_joined=True, io_held_seconds=0.25,
                   source_unmapped=True, source_logged_out=[["iqn.src", "127.0.0.1", 3260, "default"]])
    facts = SwitchFacts.load(MigrationJournal.load("old"))
    assert (facts.prepared, facts.destination_joined, facts.io_held_seconds) == (True, True, 0.25)
    assert facts.source_logged_out == [["iqn.src", "127.0.0.1", 3260, "default"]]
    assert SwitchFacts.load(MigrationJournal.create("new", source={})).source_logged_out == []


def test_a_misspelt_switch_fact_is_refused_before_it_is_written():
    from blockmig.orchestrator.host_switch import SwitchFacts

    with pytest.raises(TypeError, match="not a switch fact: destination_joind"):
        SwitchFacts.check_names({"destination_joind": True})
