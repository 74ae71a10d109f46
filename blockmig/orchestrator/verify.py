"""The verify step: the destination read back against the manifest, then the source again, so a broken
fence is caught, not trusted (an online move verifies in its own step, pass_through.py)."""

from __future__ import annotations

import os

from blockmig.datapath.digest import load_manifest
from blockmig.datapath.verify import verify_volume
from blockmig.errors import MigrationError, VerifyError
from blockmig.host import multipath
from blockmig.orchestrator.create_destination import migrator_disk
from blockmig.orchestrator.fence import FenceStep, check_suspend_fence_held
from blockmig.orchestrator.plan import host_source_disk
from blockmig.orchestrator.progress import Progress
from blockmig.orchestrator.sequencer import BaseStep


class VerifyStep(BaseStep):
    name = "verify"
    needs_control_plane = False
    invalidates = ("switch",)

    def run(self, migration) -> dict:
        manifest = load_manifest(migration.journal.manifest_path, state_file=True)
        with migration.control_plane:
            destination_disk = migrator_disk(migration)
            check_geometry(migration, destination_disk)
            source_disk = host_source_disk(migration)
        progress = Progress(migration.emit, "verify")
        digest = verify_volume(f"/dev/{destination_disk}", manifest, on_event=progress)
        source_progress = Progress(migration.emit, "verify-source")
        try:
            verify_volume(f"/dev/{source_disk}", manifest, on_event=source_progress)
        except VerifyError as exc:
            migration.invalidate(FenceStep.name)
            raise MigrationError(
                f"the source changed after it was copied ({exc}); the fence did not hold, "
                "the copy starts again on resume"
            ) from None
        check_suspend_fence_held(migration)
        return {
            "volume_digest": digest,
            "seconds": progress.seconds,
            "source_seconds": source_progress.seconds,
        }


def check_geometry(migration, destination_disk: str) -> None:
    """What the host will see after the switch must be what it sees now: size and logical block size."""
    source = migration.source
    host_device = source["map"] and f"/dev/mapper/{source['map']}" or source["device"]
    wanted = (multipath.logical_block_size(host_device), _device_size(host_device))
    found = (
        multipath.logical_block_size(f"/dev/{destination_disk}"),
        _device_size(f"/dev/{destination_disk}"),
    )
    if wanted != found:
        raise MigrationError(
            f"destination disk {destination_disk} has {found[1]} bytes in {found[0]}-byte blocks, "
            f"the host's volume {wanted[1]} bytes in {wanted[0]}-byte blocks: refusing to switch"
        )


def _device_size(path: str) -> int:
    with open(path, "rb") as device:
        return device.seek(0, os.SEEK_END)
