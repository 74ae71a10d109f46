"""The finish step: WORM protection if asked, the migrator's leftovers removed, the report written."""

from __future__ import annotations

from datetime import datetime, timezone

from blockmig.array import lio
from blockmig.host import iscsi
from blockmig.orchestrator import online
from blockmig.orchestrator.create_destination import destination_volume, remove_blacklist
from blockmig.orchestrator.sequencer import BaseStep


class FinishStep(BaseStep):
    name = "finish"

    def run(self, migration) -> dict:
        journal = migration.journal
        volume = destination_volume(migration)
        if journal.data["worm"]:
            lio.set_mapping_write_protect(volume, migration.source["host_initiator"], True)
        remove_blacklist(migration)
        if migration.migrator["iface"] in iscsi.list_ifaces():
            iscsi.remove_iface(migration.migrator["iface"])
        journal.set_state("done", report=report(migration))
        return {}


def report(migration) -> dict:
    journal, source, destination = migration.journal, migration.source, migration.destination
    copy, verify, switch = (journal.facts(name) for name in ("copy", "verify", "switch"))
    if journal.data.get("mode") == "pass-through":  # the host's last path change is the hand-over's
        switch = {**journal.facts("commit"), **journal.facts("hand_over")}
    total = (datetime.now(timezone.utc) - datetime.fromisoformat(journal.data["created"])).total_seconds()
    return {
        "id": journal.id,
        "map": source["map"],
        "wwid": source["wwid"],
        "size": source["size"],
        "block_size": int(source.get("geometry", {}).get("block_size", 512)),
        "chunk_size": journal.data["chunk_size"],
        "chunks": copy.get("chunks"),
        "source": {key: source[key] for key in ("target", "portal", "volume", "backing", "host_lun")},
        "destination": {
            **{key: destination[key] for key in ("target", "portal", "volume", "backing")},
            "host_lun": switch.get("destination_host_lun"),
            "copy_backstore": destination.get("backstore", "kernel"),
            "array_guard": journal.facts("create_destination").get("array_guard"),
        },
        "volume_digest": switch.get("volume_digest") or verify.get("volume_digest"),
        "copy_seconds": copy.get("seconds"),
        "verify_seconds": verify.get("seconds"),
        "io_held_seconds": switch.get("io_held_seconds"),
        "switch_reverts": journal.data.get("switch_reverts", 0),
        "host_disk": switch.get("host_disk"),
        "fence": journal.data["fence"],
        "mode": journal.data.get("mode", "offline"),
        "online": online.pass_through_summary(journal),
        "switch": journal.data["switch"],
        "worm": journal.data["worm"],
        "total_seconds": round(total, 3),
    }
