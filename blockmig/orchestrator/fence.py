"""The fence step (offline moves): nothing changes the source while it is copied.

  writeprotect  the host's mapping of the source is write-protected (its dirty pages flushed first)
  suspend       filesystems frozen and the host's map suspended: host IO waits for the whole copy
  none          nothing (the admin vouches that nobody writes)

A fence that is lifted before the switch invalidates the copy: the source may change from then on.
"""

from __future__ import annotations

import contextlib

from blockmig.array import lio
from blockmig.errors import ArrayError, MigrationError
from blockmig.host import multipath
from blockmig.host.devices import freeze_filesystems, resume_map_with_a_path, thaw_filesystems
from blockmig.orchestrator.sequencer import BaseStep

# Failures in these steps find the source fenced (or about to be) and the host not yet moved.
STEPS_BEFORE_THE_SWITCH = ("plan", "create_destination", "fence", "copy", "verify")


class FenceStep(BaseStep):
    name = "fence"
    invalidates = ("copy", "verify", "switch")

    def run(self, migration) -> dict:
        fence = migration.journal.data["fence"]
        map_name = migration.source["map"]
        if fence == "none":
            return {"fence": "none"}
        if fence == "writeprotect":
            if map_name:
                multipath.flush_buffers(map_name)  # the host's dirty pages land before the fence
            lio.set_mapping_write_protect(_source_volume(migration), migration.source["host_initiator"], True)
        elif fence == "suspend":
            # Filesystems frozen (FIFREEZE survives multipathd's reloads), IO drained, while the source
            # takes writes.
            freeze_filesystems(map_name, migration.journal.frozen, migration.journal.save)
            if not multipath.is_suspended(map_name):
                multipath.suspend_map(map_name, lockfs=False)
        return {"fence": fence}

    def after_failure(self, migration, failed: str) -> None:
        """Leave no host IO held past our exit: a suspend fence is lifted (so the copy restarts on resume)."""
        if failed not in STEPS_BEFORE_THE_SWITCH:
            return  # the switch's own after_failure ends its hold
        map_name = migration.source["map"]
        if map_name and (multipath.is_suspended(map_name) or migration.journal.data.get("frozen")):
            if migration.journal.data["fence"] == "suspend":
                lift_fence(migration)
                migration.invalidate(self.name)
            else:
                resume_and_thaw(migration)
            migration.emit({"event": "io_resumed", "map": map_name, "after_failure_in": failed})

    def undo(self, migration) -> None:
        """Rollback: host writes to the source again."""
        lift_fence(migration)


def release_fence(migration) -> None:
    """Host IO flows on the source again before the switch (a consistency group that cannot switch now):
    the source may change from here on, so resume fences and copies again."""
    lift_fence(migration)
    migration.invalidate(FenceStep.name)


def lift_fence(migration) -> None:
    """Host writes to the source again (also when the switch, not the fence, protected it)."""
    with contextlib.suppress(ArrayError):
        lio.set_mapping_write_protect(_source_volume(migration), migration.source["host_initiator"], False)
    map_name = migration.source["map"]
    if map_name and multipath.is_suspended(map_name):
        resume_map_with_a_path(map_name)
    if map_name:
        thaw_filesystems(map_name, migration.journal.frozen, migration.journal.save)


def check_suspend_fence_held(migration) -> None:
    """multipathd resumes a map whenever it reloads it (a path event): a suspend fence that broke
    invalidates the copy."""
    map_name = migration.source["map"]
    if migration.journal.data["fence"] == "suspend" and not multipath.is_suspended(map_name):
        migration.invalidate(FenceStep.name)
        raise MigrationError(
            f"host IO on {map_name} was released during the copy (multipathd reloaded the map), "
            "so the source may have changed; the copy starts again on resume"
        )


def resume_and_thaw(migration) -> None:
    map_name = migration.source["map"]
    if multipath.is_suspended(map_name):
        resume_map_with_a_path(map_name)
    thaw_filesystems(map_name, migration.journal.frozen, migration.journal.save)


def _source_volume(migration) -> lio.Volume:
    return lio.find_volume(migration.source["volume"])
