"""One migration: the table of its steps, and the public API (plan, run = resume, rollback, status).

  step                module                 what it does
  plan                plan.py                check everything, write the journal; on resume, the source
  create_destination  create_destination.py  the destination volume, exported to the migrator alone
  fence               fence.py               the source cannot change while it is copied
  copy                copy.py                source -> guard -> destination, chunk by chunk (datapath/)
  verify              verify.py              the destination (and the source again) against the manifest
  switch              switch.py              the host's path moves in one hold (host_switch.py)
  finish              finish.py              WORM, leftovers removed, the report

That is an offline move's table; an online move (pass-through) has its own, pass_through.STEPS.
The sequencer (sequencer.py) runs, resumes, cleans up after a failure, invalidates and rolls
back from what each step declares; host and array work is in host/ and array/.
"""

from __future__ import annotations

from blockmig import signals, timeline
from blockmig.errors import MigrationError
from blockmig.host.control_plane import HostControlPlane
from blockmig.orchestrator import fence, pass_through
from blockmig.orchestrator.copy import CopyStep
from blockmig.orchestrator.create_destination import CreateDestinationStep
from blockmig.orchestrator.fence import FenceStep
from blockmig.orchestrator.finish import FinishStep
from blockmig.orchestrator.host_switch import HostSwitch, switch_group
from blockmig.orchestrator.online import PASS_THROUGH
from blockmig.orchestrator.plan import MigrationRequest, PlanStep, plan_migration
from blockmig.orchestrator.progress import EventHandler
from blockmig.orchestrator.sequencer import Sequencer
from blockmig.orchestrator.switch import SwitchStep
from blockmig.orchestrator.verify import VerifyStep
from blockmig.state import MigrationJournal, VolumeLock

STEPS = [
    PlanStep(),
    CreateDestinationStep(),
    FenceStep(),
    CopyStep(),
    VerifyStep(),
    SwitchStep(),
    FinishStep(),
]

# The journal mode of the dm-era online mechanism, removed (an online move's journal says "pass-through").
ERA_MODE = "online"


def refuse_an_era_journal(journal: MigrationJournal) -> None:
    if journal.data.get("mode") == ERA_MODE:
        raise MigrationError(
            f"migration {journal.id} was started by the dm-era online mode, which this blockmig no longer "
            "has: resume it, roll it back or see its status with the blockmig version that started it")


def steps_of(journal: MigrationJournal) -> list:
    """The table for the journal's mode: a pass-through move has its own (pass_through.py)."""
    if journal.data.get("mode") == PASS_THROUGH:
        return pass_through.STEPS
    return STEPS


# Several migrations of one plan run in threads of one process. Their copies and verifies run side by
# side; everything else (rtslib configfs writes, iscsiadm's node db, LIO's LUN numbering, multipathd,
# udev) is not safe to race and runs under this one lock.
CONTROL_PLANE = HostControlPlane()  # host-wide: threads and other blockmig processes


class Migration:
    """What every step gets: the journal and the parts of it each step reads, the event sink, the lock."""

    def __init__(
        self, journal: MigrationJournal, on_event: EventHandler | None = None, after_chunk=None, steps=None
    ):
        self.journal = journal
        self.emit = on_event or (lambda event: None)
        self.after_chunk = after_chunk
        self.source = journal.data["source"]
        self.destination = journal.data["destination"]
        self.migrator = journal.data["migrator"]
        self.sequencer = Sequencer(steps or steps_of(journal), journal, CONTROL_PLANE)

    @property
    def control_plane(self):
        """The control-plane lock, a wait for it recorded (a plan's members queue for it)."""
        return timeline.control_plane(CONTROL_PLANE, self.emit)

    def run(self, until: str | None = None) -> dict | None:
        """Run the steps not done yet; with `until`, stop before that step (and return None)."""
        self.emit({"event": "migration", "id": self.journal.id, "state": self.journal.data["state"]})
        if self.sequencer.run(self, until, refuse=self._refuse_alone):
            return self.journal.data["report"]
        return None

    def _refuse_alone(self, step: str) -> None:
        group = self.journal.data.get("switch_group")
        if step == SwitchStep.name and group:  # one of a consistency group: never switched alone
            raise MigrationError(
                f"migration {self.journal.id} is verified and switches with its group: "
                f"blockmig resume {group}"
            )

    def rollback(self) -> dict:
        self.sequencer.rollback(self)
        return self.journal.summary()

    def invalidate(self, step: str) -> None:
        self.sequencer.invalidate(self, step)


# ---------------------------------------------------------------------------
# public API


def migrate(request: MigrationRequest, on_event: EventHandler | None = None, after_chunk=None) -> dict:
    """Plan and run a migration; return the final report."""
    journal = plan_migration(request)
    return run_migration(journal.id, on_event, after_chunk)


def run_migration(migration_id: str, on_event: EventHandler | None = None, after_chunk=None) -> dict:
    """Run the steps not done yet (this is also `resume`); return the final report."""
    journal = MigrationJournal.load(migration_id)
    if journal.data["state"] == "done":
        return journal.data["report"]
    if journal.data["state"] == "rolled_back":
        raise MigrationError(f"migration {migration_id} was rolled back; start a new one")
    refuse_an_era_journal(journal)
    with VolumeLock(journal.data["source"]["wwid"], migration_id), \
            timeline.recording(journal, on_event) as emit:
        return Migration(journal, emit, after_chunk).run()


resume_migration = run_migration


def rollback_migration(migration_id: str, on_event: EventHandler | None = None) -> dict:
    """Put the host back on the source and remove what blockmig made; refused once the destination is in
    use."""
    journal = MigrationJournal.load(migration_id)
    if journal.data["state"] == "rolled_back":
        return journal.summary()
    refuse_an_era_journal(journal)
    with VolumeLock(journal.data["source"]["wwid"], migration_id), CONTROL_PLANE, \
            signals.deferred("the rollback goes on until the host is on the source", then_stop=False), \
            timeline.recording(journal, on_event, "rollback") as emit:
        return Migration(journal, emit).rollback()


def migration_status(migration_id: str | None = None) -> list[dict]:
    if migration_id:
        journal = MigrationJournal.load(migration_id)
        refuse_an_era_journal(journal)
        return [journal.summary()]
    return [journal.summary() for journal in MigrationJournal.list_all()]


# ---------------------------------------------------------------------------
# what plans use: run up to a step, a group's switch, a fence lifted


def run_until(
    journal: MigrationJournal, step: str | None, on_event: EventHandler | None = None, after_chunk=None
) -> dict | None:
    """Run the member's steps before `step` (all of them with None); the caller holds its VolumeLock."""
    refuse_an_era_journal(journal)
    return Migration(journal, on_event, after_chunk).run(until=step)


def release_fence(journal: MigrationJournal, on_event: EventHandler | None = None) -> None:
    """A verified member whose group cannot switch now: host IO flows on the source again (copies again)."""
    with CONTROL_PLANE:
        fence.release_fence(Migration(journal, on_event))


def switch_members(members: list[tuple[MigrationJournal, EventHandler]]) -> list[dict]:
    """Switch verified migrations as one consistency group (host_switch.switch_group)."""
    with CONTROL_PLANE:
        return switch_group([HostSwitch(journal, emit) for journal, emit in members])

