"""The copy step: the claim's guarded sequential copy, source disk -> destination (datapath.copy_volume).

Where a byte goes: read from the host's own path to the source (plan.host_source_disk, O_DIRECT),
digested, written through the guard (datapath/guard.py) to the migrator's disk of the destination
(create_destination.migrator_disk), and by the destination array's own guard where blockmig's backstore
serves it (served_destination.py; handed to the kernel's backstore at the end). An online move copies
in its own step (pass_through.py).
"""

from __future__ import annotations

import contextlib
import os
import time

from blockmig.datapath.copy import copy_volume
from blockmig.datapath.journal import write_json_atomically
from blockmig.errors import DeviceError
from blockmig.orchestrator import served_destination
from blockmig.orchestrator.create_destination import check_destination_is_the_migrators_alone, migrator_disk
from blockmig.orchestrator.fence import check_suspend_fence_held
from blockmig.orchestrator.plan import host_source_disk
from blockmig.orchestrator.progress import Progress
from blockmig.orchestrator.sequencer import BaseStep

COPY_RETRIES = 5  # a source path that fails during the copy gets this many resumes
COPY_RETRY_WAIT = 3.0  # seconds between them (replacement_timeout in the lab is 5 s)


class CopyStep(BaseStep):
    name = "copy"
    needs_control_plane = (
        False  # copies of a plan's members run side by side; control-plane parts take the lock
    )
    invalidates = ("verify", "switch")

    def run(self, migration) -> dict:
        journal = migration.journal
        with migration.control_plane:
            if served_destination.hand_over_unfinished(migration):  # killed in it: finish it first
                served_destination.hand_to_kernel(migration)
            check_destination_is_the_migrators_alone(migration)
            destination = f"/dev/{migrator_disk(migration)}"
        progress = Progress(migration.emit, "copy")
        for attempt in range(COPY_RETRIES + 1):
            with migration.control_plane:
                source = f"/dev/{host_source_disk(migration)}"
                if attempt and served_destination.is_served(migration):
                    served_destination.serve(migration)  # a handler killed meanwhile starts again
            try:
                manifest = copy_volume(
                    source,
                    destination,
                    journal.copy_journal_path,
                    chunk_size=journal.data["chunk_size"],
                    resume=True,
                    max_rate=journal.data["max_rate"],
                    on_event=progress,
                    after_chunk=migration.after_chunk,
                    arm_destination=lambda reserved, window: served_destination.arm_sequential(
                        migration, reserved, window),
                )
                break
            except DeviceError as exc:
                if attempt == COPY_RETRIES:
                    raise
                migration.emit({"event": "copy_retry", "attempt": attempt + 1, "error": str(exc)})
                time.sleep(COPY_RETRY_WAIT)
        check_suspend_fence_held(migration)
        write_json_atomically(journal.manifest_path, manifest.to_dict())
        if served_destination.is_served(migration):
            with migration.control_plane:
                served_destination.hand_to_kernel(migration)
                destination = f"/dev/{migrator_disk(migration)}"  # the kernel volume's disk now
        return {
            "source_disk": source,
            "destination_disk": destination,
            "volume_digest": manifest.volume_digest,
            "chunks": manifest.chunk_count,
            "seconds": progress.seconds,
        }

    def forget(self, migration) -> None:
        """The copy starts again from byte 0."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(migration.journal.copy_journal_path)
