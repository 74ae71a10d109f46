"""The create_destination step: the destination volume (the source's size and geometry, a serial of its own),
exported to the migrator alone, whose disk of it is where the copy writes. With `--backstore handler`,
blockmig's own backstore serves it until the copy is done (served_destination.py)."""

from __future__ import annotations

import contextlib
import os

from blockmig.array import lio
from blockmig.errors import ArrayError, MigrationError
from blockmig.faults import checkpoint
from blockmig.host import iscsi, multipath, udev
from blockmig.orchestrator import served_destination
from blockmig.orchestrator.host_switch import HostSwitch, existing_destination_volume
from blockmig.orchestrator.sequencer import BaseStep
from blockmig.safefile import write_atomically
from blockmig.sysfs import read_attribute

MULTIPATH_CONF_DIR = "/etc/multipath/conf.d"


class CreateDestinationStep(BaseStep):
    name = "create_destination"

    def run(self, migration) -> dict:
        volume = destination_volume(migration, create=True)
        disk = migrator_disk(migration)
        checkpoint("create:migrator-disk-ready")
        return {"volume": volume.name, "lun": volume.lun, "serial": volume.serial, "migrator_disk": disk}

    def after_failure(self, migration, failed: str) -> None:
        """A destination that could not be made or reached goes again: a refused login or a full array
        leaves both arrays as they were."""
        if failed == self.name:
            self.undo(migration)

    def undo(self, migration) -> None:
        """The migrator's session and iface, the handler and its objects, the destination volume and its
        backing file, the blacklist."""
        HostSwitch(migration.journal, migration.emit).logout_migrator()
        served_destination.remove_served_objects(migration)
        ours = bool(migration.journal.facts(self.name).get("backing_made"))
        destination = migration.destination
        lio.remove_volume_leftovers(destination["volume"], destination["backing"] if ours else None,
                                    destination["target"], [migration.migrator["initiator"]])
        remove_blacklist(migration)


def destination_volume(migration, create: bool = False) -> lio.Volume:
    """The destination volume; made (and its backing file) with `create`, else a MigrationError if it is
    gone."""
    if served_destination.is_served(migration):
        return served_destination.serve(migration)  # the migrator's view of the handler's volume
    if not create:
        return existing_destination_volume(migration.journal)
    destination = migration.destination
    with contextlib.suppress(ArrayError):
        found = lio.find_volume(destination["volume"])
        if found.lun is not None:  # no LUN: a creation killed half way, taken over below
            return found
    adopt = "backing_made" in migration.journal.facts(CreateDestinationStep.name)  # a creation was begun
    # intent first: a rollback removes what a killed creation left
    migration.journal.record(CreateDestinationStep.name, backing_made=destination["backing_created"])
    volume = lio.create_volume(
        destination["target"],
        destination["volume"],
        migration.source["size"],
        destination["backing"],
        serial=destination["temporary_serial"],
        geometry=migration.source.get("geometry"),
        adopt=adopt,
    )
    destination["lun"] = volume.lun
    return volume


def migrator_disk(migration) -> str:
    """The migrator's disk of the destination (its own mapped LUN, WWID checked); logs in if needed."""
    destination, migrator = migration.destination, migration.migrator
    volume = destination_volume(migration)
    mapping = lio.find_mapping(volume, migrator["initiator"])
    if mapping is None:
        if volume.serial != destination["temporary_serial"]:
            volume = lio.change_volume_serial(volume, destination["temporary_serial"])
        mapping = lio.export_volume(volume, migrator["initiator"])
    _blacklist_temporary_wwid(migration)
    iscsi.create_iface(migrator["iface"], migrator["initiator"])
    session = iscsi.login_portal(destination["target"], destination["portal"], migrator["iface"])
    if mapping.mapped_lun not in iscsi.session_disks(session):
        iscsi.scan_session_lun(session, mapping.mapped_lun)
    disk = iscsi.find_session_disk(session, mapping.mapped_lun, destination["temporary_wwid"])
    udev.settle()
    return disk


def check_destination_is_the_migrators_alone(migration) -> None:
    """Exclusive receiving: before a byte is copied, only the migrator may see the destination."""
    others = [
        m.initiator_iqn
        for m in lio.list_mappings(destination_volume(migration))
        if m.initiator_iqn != migration.migrator["initiator"]
    ]
    if others:
        raise MigrationError(
            f"destination {migration.destination['volume']} is also mapped to {', '.join(others)}: "
            "only the migrator may write it during the copy"
        )


def _blacklist_temporary_wwid(migration) -> None:
    """Keep multipathd off the migrator's disk: a map on it would hold it (no O_EXCL open)."""
    path = _multipath_drop_in(migration)
    text = (
        f"# blockmig migration {migration.journal.id}: the migrator's destination disk\n"
        f'blacklist {{\n    wwid "{migration.destination["temporary_wwid"]}"\n}}\n'
    )
    if read_attribute(path) != text.strip():
        os.makedirs(MULTIPATH_CONF_DIR, exist_ok=True)
        write_atomically(path, text.encode(), mode=0o644, private_dir=False)  # multipathd's, not ours
        multipath.reconfigure()


def remove_blacklist(migration) -> None:
    """No `multipathd reconfigure` here: the temporary WWID exists no more (the destination has the source's
    serial, or is gone), and a reconfigure reloads every map, resuming any map another migration holds
    suspended."""
    path = _multipath_drop_in(migration)
    if os.path.exists(path):
        os.unlink(path)


def _multipath_drop_in(migration) -> str:
    return os.path.join(MULTIPATH_CONF_DIR, f"blockmig-{migration.journal.id}.conf")
