"""The destination while it receives the copy: served by blockmig's own backstore (array/tcmu), whose guard
is the claim's second storage device; then handed to the kernel's backstore (fileio/iblock).

  create_destination  the backing, then the handler: NAME (the host's view, refusing writes until handed
                      over; on no LUN) and NAME-migrator (guarded; on a LUN of the destination mapped to the
                      migrator alone), both with the temporary serial
  copy                arm_sequential(the address the copy resumes from); arm_delta(the chunks) before each
                      delta pass of an online move; a write anywhere else is refused by the array and
                      nothing is written
  end of the copy     the migrator logs out, the handler stops (its objects go), NAME becomes a kernel
                      volume on the same backing with the same serial: verify, the switch and the host
                      see that from then on (an online move hands over in its own step, pass_through.py)

The handler runs in a session of its own and outlives blockmig; its state file (the guard's reserved
address) is in the migration's folder. A resume finds it gone (kill -9, a reboot of the array host) and
starts it again: it takes over its storage objects and rings, and the copy arms it at its own journaled
address. `--backstore kernel` skips all this: the kernel's backstore from the start, guarded by the
migrator alone (what blockmig did before).
"""

from __future__ import annotations

import contextlib
import os

from blockmig.array import lio
from blockmig.array.source_session import SourceSession
from blockmig.array.tcmu import client, service
from blockmig.errors import ArrayError, MigrationError
from blockmig.faults import checkpoint
from blockmig.orchestrator.host_switch import HostSwitch

BACKSTORES = ("handler", "kernel")
PASS_THROUGH = "pass-through"  # the journal's mode of a move whose host view passes through (pass_through.py)
PASS_THROUGH_SUFFIX = "-pt"
DEFAULT_BACKSTORE = "handler"  # the claim's guard in the destination array; "kernel": the migrator's alone
CREATE = "create_destination"  # whose facts say how far the hand-over went


def is_served(migration) -> bool:
    """The destination is (still) the handler's: its hand-over to the kernel has not begun."""
    return (migration.destination.get("backstore") == "handler"
            and not migration.journal.facts(CREATE).get("handing_to_kernel"))


def hand_over_unfinished(migration) -> bool:
    """A hand-over to the kernel's backstore was killed half way (finish it before using the volume)."""
    facts = migration.journal.facts(CREATE)
    return bool(facts.get("handing_to_kernel")) and not facts.get("handed_to_kernel")


def is_pass_through(journal) -> bool:
    return journal.data.get("mode") == PASS_THROUGH


def served_name(journal) -> str:
    """The handler's volume: the destination's own name, or in a pass-through move NAME-pt (NAME is the
    kernel volume it is handed to, both exported at once for a moment)."""
    name = journal.data["destination"]["volume"]
    return name + PASS_THROUGH_SUFFIX if is_pass_through(journal) else name


def migrator_view_name(migration) -> str:
    return served_name(migration.journal) + service.MIGRATOR_SUFFIX


def client_of(migration) -> client.BackstoreClient:
    return client.BackstoreClient(served_name(migration.journal))



def state_dir(migration) -> str:
    return os.path.join(migration.journal.directory, "backstore")


def serve(migration) -> lio.Volume:
    """The migrator's view, on a LUN of the destination, its handler running (started again if it is not)."""
    destination, source = migration.destination, migration.source
    if destination["backing_created"] and not os.path.exists(destination["backing"]):
        migration.journal.record(CREATE, backing_made=True)  # intent first: a rollback removes it
        service.prepare_backing_file(destination["backing"], source["size"])
    try:
        state = client_of(migration).state()
    except ArrayError:
        state = None
    if state is None:
        _refuse_if_removed(migration)
        client.stop_handler(served_name(migration.journal))  # one that hangs, not answering its socket
        os.makedirs(state_dir(migration), mode=0o700, exist_ok=True)
        passing = {}
        if is_pass_through(migration.journal):  # the host's view: the source's identity, through to it
            passing = {"serial": source["serial"], "migrator_serial": destination["temporary_serial"],
                       "pass_through_source": "/dev/" + SourceSession(migration.journal).disk(),
                       "chunk_size": migration.journal.data["chunk_size"],
                       "min_rate": migration.journal.data["online"].get("min_rate")}
        state = client.serve_detached(
            served_name(migration.journal),
            backing=destination["backing"],
            size=source["size"],
            geometry=source.get("geometry") or {},
            guard_initiator=migration.migrator["initiator"],
            state_dir=state_dir(migration),
            log_path=os.path.join(state_dir(migration), "handler.log"),
            **{"serial": destination["temporary_serial"], **passing},
        )
        migration.emit({"event": "backstore", "state": "serving", "pid": state["pid"],
                        "volume": served_name(migration.journal)})
        checkpoint("create:handler-serving")
    volume = lio.export_storage_object(destination["target"], migrator_view_name(migration))
    destination["lun"] = volume.lun
    return volume


def saved_state(migration):
    """The guard's journaled state (GuardState), readable with the handler gone."""
    return client.saved_state(served_name(migration.journal), state_dir(migration))


def _refuse_if_removed(migration) -> None:
    """A handler that stopped because an admin removed one of its storage objects is not started again
    (that would make the object anew): the destination is gone, as a kernel volume removed would be."""
    with contextlib.suppress(ArrayError):  # no state file yet: the first start
        removed = saved_state(migration).removed
        if removed:
            raise MigrationError(f"destination volume {migration.destination['volume']} is gone: its storage "
                                 f"object {removed} was removed while blockmig's handler served it")


def arm_sequential(migration, reserved: int, window: int = 0) -> None:
    """The array executes the migrator's next write only at `reserved` (the copy's resume address);
    `window`: how far past it the copy reads ahead."""
    if is_served(migration):
        state = client_of(migration).arm_sequential(reserved, window)
        migration.emit({"event": "backstore", "state": "armed", "mode": state["mode"],
                        "reserved_address": state["reserved"]})


def arm_delta(migration, extents: list[tuple[int, int]]) -> None:
    """The array executes only these (offset, length) extents, ascending, each whole, in turn."""
    if is_served(migration):
        client_of(migration).arm_delta(extents)


def hand_to_kernel(migration) -> None:
    """The copy is done: the same backing becomes a kernel volume NAME (the temporary serial still)."""
    destination = migration.destination
    if not (is_served(migration) or hand_over_unfinished(migration)):
        return
    with contextlib.suppress(ArrayError):  # what the array's guard saw: the report's proof, not a condition
        state = client_of(migration).state()
        migration.journal.record(CREATE, array_guard={"mode": state["mode"], "reserved": state["reserved"]})
    migration.journal.record(CREATE, handing_to_kernel=True)
    HostSwitch(migration.journal, migration.emit).logout_migrator()  # its disk goes before the LUN does
    remove_served_objects(migration)
    checkpoint("copy:handing-to-kernel")  # the worst moment: no storage object of the volume at all
    volume = lio.create_volume(
        destination["target"], destination["volume"], migration.source["size"], destination["backing"],
        serial=destination["temporary_serial"], geometry=migration.source.get("geometry"), adopt=True,
    )
    destination["lun"] = volume.lun
    migration.journal.record(CREATE, handed_to_kernel=True)
    migration.emit({"event": "backstore", "state": "handed to the kernel", "volume": volume.name,
                    "plugin": volume.plugin})


def remove_served_objects(migration) -> list[str]:
    """Stop the handler and remove the storage objects it (or a killed one) left; never a kernel volume."""
    client.stop_handler(served_name(migration.journal))
    removed = []
    for name in (served_name(migration.journal), migrator_view_name(migration)):
        with contextlib.suppress(ArrayError):
            volume = lio.find_volume(name)
            if volume.plugin == "user":
                lio.remove_volume(volume)
                removed.append(f"storage object {name}")
    return removed
