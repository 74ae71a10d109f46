"""The switch step: the host moves from the source LUN to the destination LUN (host_switch.HostSwitch).
Once the destination has joined the host's map, the migration can no longer be rolled back, only
finished."""

from __future__ import annotations

import contextlib

from blockmig.errors import MigrationError
from blockmig.host import multipath
from blockmig.orchestrator.fence import (
    STEPS_BEFORE_THE_SWITCH,
    FenceStep,
    lift_fence,
    resume_and_thaw,
)
from blockmig.orchestrator.host_switch import HostSwitch, SwitchFacts
from blockmig.orchestrator.sequencer import BaseStep


class SwitchStep(BaseStep):
    name = "switch"
    when_signalled = "the switch goes on until it has finished or reverted (within --switch-timeout)"

    def run(self, migration) -> dict:
        switch = HostSwitch(migration.journal, migration.emit)
        try:
            return switch.run()
        except BaseException:  # reverted for any reason: the host writes the source again, copy anew
            if switch.facts.reverted:
                switch.record_revert()
            raise

    def after_failure(self, migration, failed: str) -> None:
        """Leave no host IO held past our exit (the hold ends by itself; this is for what an error skips)."""
        if failed in STEPS_BEFORE_THE_SWITCH:
            return  # the fence's after_failure deals with those
        map_name = migration.source["map"]
        if map_name and (multipath.is_suspended(map_name) or migration.journal.data.get("frozen")):
            joined = migration.journal.is_done(self.name) or SwitchFacts.load(
                migration.journal
            ).destination_joined
            if migration.journal.data["fence"] == "suspend" and not joined:  # the host writes the source
                lift_fence(migration)  # again: the copy starts over
                migration.invalidate(FenceStep.name)
            else:
                resume_and_thaw(migration)
            migration.emit({"event": "io_resumed", "map": map_name, "after_failure_in": failed})

    def check_undo(self, migration) -> None:
        if (
            SwitchFacts.load(migration.journal).destination_joined
            or migration.journal.data["state"] == "done"
        ):
            raise MigrationError(
                f"migration {migration.journal.id} has already moved the host to the destination; "
                f"finish it with blockmig resume {migration.journal.id}"
            )

    def undo(self, migration) -> None:
        """Killed inside the hold: the source path comes back first; then the host's destination session
        goes."""
        switch = HostSwitch(migration.journal, migration.emit)
        if switch.facts.source_removed or switch.facts.source_fencing:
            with switch.host_io_held():
                switch.revert_in_hold()
        if migration.journal.is_done("create_destination") or switch.facts.prepared:
            with contextlib.suppress(MigrationError):
                switch.release_host_destination_session()
