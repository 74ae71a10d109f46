"""Online by pass-through: the host moves to the destination first, whose handler passes its IO through to
the source until the copy has converged; no host IO is held at any path change, whatever uses the volume.

  step                what it does
  reach_source        the destination array's own session to the source (array/source_session.py)
  create_destination  the handler serves NAME-pt (the source's identity, through to the source) and
                      NAME-pt-migrator (guarded, a serial of its own) on the destination's backing
  join                NAME-pt joins the host's map beside the source's path (same WWID, both return the
                      same bytes: every write reaches the source first); then the source's path leaves.
                      From here every host write reaches the source through the handler's dirty map
  copy                pass 1, the claim's guarded sequential copy (the array's disk of the source ->
                      the migrator's view), then delta passes of what the host dirtied, until the rest
                      fits --max-hold
  verify              the destination against the manifest: a chunk that differs must be one the host wrote
                      since its copy (copied again, by a delta pass or the commit), or the move stops
  commit              the array copies the last dirty chunks itself, holding only the host writes that
                      touch them; then the destination is the volume and the source gets no more writes
  hand_over           the kernel's backstore (NAME, same backing, same identity) joins the map, the
                      handler's path leaves, the handler stops; the array's session goes
  finish              WORM, leftovers, the report

Why no write is lost. Until the commit the source is authoritative: the host reads it (through the
handler) and every write lands on it before it is acknowledged. The destination is written too, and a
chunk the copy may have read before such a write and not yet written is recorded dirty before the write
is acknowledged (passthrough.py), so some later pass copies it again. The commit copies what is dirty
then with its writes held; every other chunk is current on the destination. Until the commit, the way
back is the source's path put back: nothing to copy back.
"""

from __future__ import annotations

import contextlib
import time

from blockmig import signals
from blockmig.array import lio
from blockmig.array.source_session import SourceSession
from blockmig.datapath.copy import copy_volume
from blockmig.datapath.delta import changed_chunks, copy_delta
from blockmig.datapath.digest import load_manifest
from blockmig.datapath.journal import write_json_atomically
from blockmig.errors import ArrayError, MigrationError, VerifyError
from blockmig.faults import checkpoint
from blockmig.host import iscsi, multipath, udev
from blockmig.host.devices import map_disks
from blockmig.host.runner import phase_deadline
from blockmig.orchestrator import served_destination
from blockmig.orchestrator.create_destination import (
    CreateDestinationStep,
    check_destination_is_the_migrators_alone,
    migrator_disk,
)
from blockmig.orchestrator.finish import FinishStep
from blockmig.orchestrator.host_switch import HostSwitch
from blockmig.orchestrator.plan import PlanStep
from blockmig.orchestrator.progress import Progress
from blockmig.orchestrator.sequencer import BaseStep
from blockmig.orchestrator.verify import check_geometry

MAX_DELTA_PASSES = 8  # per convergence; then the writer is said to outpace the copy
CREATE = served_destination.CREATE
# A path change that holds no IO (join, hand-over) is not bounded by --switch-timeout, which bounds a hold:
# it may take a loaded host's udev and multipathd a while, the host working meanwhile.
NO_HOLD_TIMEOUT = 180.0


def _interval(migration, phase: str, began: float, **facts) -> None:
    """An interval in which the host's IO may have been slowed by blockmig (report and status)."""
    seconds = round(time.time() - began, 3)
    state = migration.journal.data["online"]
    state["intervals"] = [i for i in state["intervals"] if i["phase"] != phase] + [
        {"phase": phase, "seconds": seconds, **facts}]
    migration.journal.save()
    migration.emit({"event": "interval", "phase": phase, "seconds": seconds, **facts})


# ---------------------------------------------------------------------------
# the steps


class ReachSourceStep(BaseStep):
    name = "reach_source"

    def run(self, migration) -> dict:
        return {"array_disk": SourceSession(migration.journal).disk()}

    def after_failure(self, migration, failed: str) -> None:
        if failed == self.name:
            SourceSession(migration.journal).close()

    def undo(self, migration) -> None:
        SourceSession(migration.journal).close()


class PathJoin(HostSwitch):
    """The host's map gains the handler's path, then loses the source's; never without a path, never held."""

    step = "join"

    def __init__(self, journal, emit):
        super().__init__(journal, emit)
        self.timeout = max(self.timeout, NO_HOLD_TIMEOUT)

    def destination_volume(self) -> lio.Volume:
        target, name = self.destination["target"], served_destination.served_name(self.journal)
        return lio.export_storage_object(target, name)

    def run(self) -> dict:
        began = time.time()
        with phase_deadline(max(self.timeout, udev.DEFAULT_TIMEOUT), f"the join of map {self.map_name}"):
            if not self.facts.prepared:
                self.prepare_host_side()  # the migrator keeps its session: it copies after the join
            if not self.facts.destination_joined:
                self.attach_destination()
                self.join_destination()
        checkpoint("pass-through:joined")
        self.source_path_leaves()
        return {"host_disk": self.facts.host_disk, "seconds": round(time.time() - began, 3)}

    def source_path_leaves(self) -> None:
        """The source's disks out of the map and deleted, its mapping to the host gone (no rescan brings it
        back); from here the handler sees every host write."""
        if self.facts.source_removed:
            return
        if not any(p.usable and p.dev == self.facts.host_disk for p in multipath.paths_of_map(self.map_name)):
            raise MigrationError(f"the destination's path {self.facts.host_disk} is not usable in map "
                                 f"{self.map_name}: the source's path stays")
        self._record(source_leaving=True)  # intent: undo puts the source's path back
        for session in self._host_source_sessions():
            disk = iscsi.session_disks(session).get(self.source["host_lun"])
            if disk is None:
                continue
            iscsi.check_disk_wwid(disk, self.source["wwid"],
                                  f"LUN {self.source['host_lun']} of session {session.sid}")
            if disk in map_disks(self.map_name):
                multipath.del_path(disk)
            checkpoint("pass-through:source-path-out")
            iscsi.delete_disk_checked(disk, self.source["wwid"])
        source = self._source_volume()
        if lio.find_mapping(source, self.source["host_initiator"]) is not None:
            lio.unexport_volume(source, self.source["host_initiator"], keep_acl=True)
        self._record(source_removed=True)
        self._phase("source path left")

    def put_source_back(self) -> None:
        """Before the commit: the source's path joins again, then the handler's leaves (the source is current:
        nothing to copy back)."""
        if self.facts.source_leaving or self.facts.source_removed:
            source = self._source_volume()
            if lio.find_mapping(source, self.source["host_initiator"]) is None:
                lio.export_volume(source, self.source["host_initiator"], mapped_lun=self.source["host_lun"])
            for session in self._host_source_sessions():
                if self.source["host_lun"] not in iscsi.session_disks(session):
                    iscsi.scan_session_lun(session, self.source["host_lun"])
                disk = iscsi.find_session_disk(session, self.source["host_lun"], self.source["wwid"])
                multipath.add_path_now(self.map_name, disk, max(self.timeout, udev.DEFAULT_TIMEOUT))
            self._record(source_removed=False, source_leaving=False)
        self._detach_host_from_destination_lun()
        self.release_host_destination_session()


class JoinStep(BaseStep):
    name = "join"
    when_signalled = "the join goes on until the source's path has left the host's map"

    def run(self, migration) -> dict:
        facts = PathJoin(migration.journal, migration.emit).run()
        _interval(migration, "join", time.time() - facts["seconds"], held=False)
        return facts

    def undo(self, migration) -> None:
        with phase_deadline(NO_HOLD_TIMEOUT, "putting the source's path back"):
            PathJoin(migration.journal, migration.emit).put_source_back()


class PassThroughCopyStep(BaseStep):
    name = "copy"
    needs_control_plane = False  # a plan's copies run side by side
    invalidates = ("verify",)

    def run(self, migration) -> dict:
        journal = migration.journal
        with migration.control_plane:
            served_destination.serve(migration)  # first: a handler killed meanwhile holds the host's IO
            source = "/dev/" + SourceSession(journal).disk()
            check_destination_is_the_migrators_alone(migration)
            destination = f"/dev/{migrator_disk(migration)}"
        state = journal.data["online"]
        progress = Progress(migration.emit, "copy")
        began = time.time()
        if not state["pass1_done"]:
            manifest = copy_volume(
                source, destination, journal.copy_journal_path, chunk_size=journal.data["chunk_size"],
                resume=True, max_rate=journal.data["max_rate"], on_event=progress,
                after_chunk=migration.after_chunk,
                arm_destination=lambda reserved, window: served_destination.arm_sequential(
                    migration, reserved, window),
            )
            write_json_atomically(journal.manifest_path, manifest.to_dict())
            rate = manifest.size / progress.seconds if progress.seconds else None
            state.update(pass1_done=True, pass1_rate=rate)
            journal.save()
        manifest = converge(migration, source, destination)
        # the host's IO shared the arrays with the copy: how long the handler held the copy back for it
        yielded = served_destination.client_of(migration).state().get("yielded_seconds")
        _interval(migration, "copy", began, held=False, yielded_seconds=yielded)
        return {"source_disk": source, "destination_disk": destination, "chunks": manifest.chunk_count,
                "seconds": progress.seconds}


def converge(migration, source: str, destination: str):
    """Delta passes of what the host dirtied until the rest is estimated to copy within --max-hold."""
    journal = migration.journal
    state = journal.data["online"]
    handler = served_destination.client_of(migration)
    manifest = load_manifest(journal.manifest_path, state_file=True)
    history = []
    for _ in range(MAX_DELTA_PASSES):
        dirty = handler.state()["dirty_chunks"]
        estimate = dirty * manifest.chunk_size / _rate(state)
        history.append(dirty)
        migration.emit({"event": "delta", "pass": state["pass"] + 1, "chunks": dirty,
                        "bytes": dirty * manifest.chunk_size, "estimated_hold": round(estimate, 3)})
        if estimate <= state["max_hold"]:
            state["estimated_hold"] = round(estimate, 3)
            journal.save()
            return manifest
        signals.check(f"migration {journal.id} stopped between delta passes")
        state["pass"] += 1
        journal.save()
        checkpoint("pass-through:delta")
        chunks = handler.take_dirty()  # taken, not cleared: a pass killed here gets them again
        seconds = copy_delta(source, destination, chunks, manifest, journal.data["max_rate"],
                             arm=lambda extents: served_destination.arm_delta(migration, extents))
        write_json_atomically(journal.manifest_path, manifest.to_dict())
        handler.copied(chunks)
        state["passes"].append({"pass": state["pass"], "chunks": len(chunks),
                                "bytes": len(chunks) * manifest.chunk_size, "seconds": round(seconds, 3)})
        journal.save()
    raise MigrationError(
        f"the host writes faster than the delta copy: {', '.join(map(str, history))} dirty chunks in "
        f"{len(history)} rounds (--max-hold {state['max_hold']:g}); host IO was never held and the host is "
        f"on the destination's path, passed through to the source: blockmig resume {journal.id} tries "
        f"again, blockmig rollback {journal.id} puts the source's path back"
    )


def _rate(state: dict) -> float:
    for done in reversed(state["passes"]):
        if done["bytes"] and done["seconds"]:
            return done["bytes"] / done["seconds"]
    return state.get("pass1_rate") or 50e6


class PassThroughVerifyStep(BaseStep):
    """The destination read back against the manifest while the host writes on. A chunk that differs is
    one the host wrote since its copy (it reached both, or is dirty: a sequential pass armed over the whole
    volume dirties every write meanwhile), which the handler copies again in a delta pass or the commit,
    or one the host never wrote: a real difference."""

    name = "verify"
    needs_control_plane = False

    def run(self, migration) -> dict:
        journal = migration.journal
        manifest = load_manifest(journal.manifest_path, state_file=True)
        with migration.control_plane:
            served_destination.serve(migration)
            destination = f"/dev/{migrator_disk(migration)}"
            check_geometry(migration, destination[5:])
        began = time.monotonic()
        served_destination.arm_sequential(migration, 0, manifest.size)  # every host write now dirties
        differ = changed_chunks(destination, list(range(manifest.chunk_count)), manifest)
        handler = served_destination.client_of(migration)
        unexplained = handler.redo(sorted(differ))
        if unexplained:
            raise VerifyError(f"destination chunks {unexplained[:8]} differ from what was copied from the "
                              "source and the host did not write them: not committing")
        return {"seconds": round(time.monotonic() - began, 3), "rewritten_meanwhile": len(differ),
                "dirty": handler.state()["dirty_chunks"]}


class CommitStep(BaseStep):
    """Deltas until the rest fits --max-hold, then the array's commit: the last chunks copied with only their
    writes held; from then on the destination is the volume, and there is no way back but a new move."""

    name = "commit"
    needs_control_plane = False

    def run(self, migration) -> dict:
        journal = migration.journal
        with migration.control_plane:
            served_destination.serve(migration)
            source = "/dev/" + SourceSession(journal).disk()
            destination = f"/dev/{migrator_disk(migration)}"
        handler = served_destination.client_of(migration)
        if handler.state()["pass_through"]:
            manifest = converge(migration, source, destination)
            journal.record(self.name, committing=True)  # from here a rollback asks the handler first
            checkpoint("pass-through:committing")
            record = handler.commit()
        else:  # committed while we were killed: the handler kept the record
            manifest = load_manifest(journal.manifest_path, state_file=True)
            record = handler.state()["commit"]
        for chunk, digest in record["digests"].items():
            manifest.chunk_digests[int(chunk)] = digest
        write_json_atomically(journal.manifest_path, manifest.to_dict())
        held = record["held_seconds"]  # the longest one chunk's writes waited (one chunk at a time)
        _interval(migration, "commit", time.time() - record.get("seconds", held), held=True,
                  longest_hold=held, chunks=len(record["chunks"]),
                  bytes=len(record["chunks"]) * manifest.chunk_size)
        checkpoint("pass-through:committed")
        # the manifest: each chunk as last copied from the source (the host writes on, so not a digest of
        # the volume now; the lab's cmp after its writers stop is that)
        return {"final_chunks": len(record["chunks"]), "writes_held_seconds": held,
                "volume_digest": manifest.volume_digest}

    def check_undo(self, migration) -> None:
        if committed(migration):
            raise MigrationError(
                f"migration {migration.journal.id} is committed: the destination holds writes the source has "
                f"not; finish it with blockmig resume {migration.journal.id} (the way back is a migration "
                "from the destination to the source)")


def committed(migration) -> bool:
    """The handler's word where it was asked to commit (it may have before we were killed)."""
    journal = migration.journal
    if journal.is_done(CommitStep.name) or journal.is_done(HandOverStep.name):
        return True
    if not journal.facts(CommitStep.name).get("committing"):
        return False
    try:
        return not served_destination.client_of(migration).state()["pass_through"]
    except ArrayError:
        with contextlib.suppress(ArrayError):
            return not served_destination.saved_state(migration).pass_through
        return True  # nobody can say: never roll back over writes the source may lack



class HandOver(HostSwitch):
    """The kernel's backstore (NAME on the same backing, the source's identity) joins the map, then the
    handler's path leaves; the two serve one backing through one page cache (fileio) meanwhile."""

    step = "hand_over"

    def __init__(self, journal, emit):
        super().__init__(journal, emit)
        self.timeout = max(self.timeout, NO_HOLD_TIMEOUT)

    def destination_volume(self) -> lio.Volume:
        destination = self.destination
        facts = self.journal.facts(CREATE)
        if not facts.get("handing_to_kernel"):
            self.journal.record(CREATE, handing_to_kernel=True)  # intent: the kernel volume may exist
        with contextlib.suppress(ArrayError):
            return lio.find_volume(destination["volume"])
        volume = lio.create_volume(
            destination["target"], destination["volume"], self.source["size"], destination["backing"],
            serial=self.source["serial"], geometry=self.source.get("geometry"), adopt=True,
        )
        destination["lun"] = volume.lun
        self.journal.save()
        return volume

    def run(self) -> dict:
        began = time.time()
        with phase_deadline(max(self.timeout, udev.DEFAULT_TIMEOUT), f"the hand-over of map {self.map_name}"):
            if not self.facts.destination_joined:
                self._record(prepared=True, host_session_existed=True)  # the join's session carries it
                self.attach_destination()
                self.join_destination()
        checkpoint("hand-over:kernel-joined")
        self.handler_path_leaves()
        return {"host_disk": self.facts.host_disk, "destination_host_lun": self.facts.destination_host_lun,
                "seconds": round(time.time() - began, 3)}

    def handler_path_leaves(self) -> None:
        """The handler's path out of the map and its disk deleted, its mapping gone."""
        if not any(p.usable and p.dev == self.facts.host_disk for p in multipath.paths_of_map(self.map_name)):
            raise MigrationError(f"the kernel volume's path {self.facts.host_disk} is not usable in map "
                                 f"{self.map_name}: the handler's path stays")
        PathJoin(self.journal, self.emit)._detach_host_from_destination_lun()
        checkpoint("hand-over:handler-out")


class HandOverStep(BaseStep):
    name = "hand_over"
    when_signalled = "the hand-over goes on until the handler's path has left the host's map"

    def run(self, migration) -> dict:
        journal = migration.journal
        facts = {}
        if not journal.facts(CREATE).get("handed_to_kernel"):
            facts = HandOver(journal, migration.emit).run()
            _interval(migration, "hand_over", time.time() - facts["seconds"], held=False)
            HostSwitch(journal, migration.emit).logout_migrator()
            served_destination.remove_served_objects(migration)
            SourceSession(journal).close()
            journal.record(CREATE, handed_to_kernel=True)
            migration.emit({"event": "backstore", "state": "handed to the kernel",
                            "volume": migration.destination["volume"]})
        for session in HostSwitch(journal, migration.emit)._host_source_sessions():
            iscsi.logout_if_unused(session)  # the host's session to the source, if it carries nothing now
        with contextlib.suppress(ArrayError):  # the ACL the join kept for a way back
            lio.remove_node_acl_if_empty(migration.source["target"], migration.source["host_initiator"])
        return facts

    def check_undo(self, migration) -> None:
        CommitStep().check_undo(migration)


STEPS = [
    PlanStep(),
    ReachSourceStep(),
    CreateDestinationStep(),
    JoinStep(),
    PassThroughCopyStep(),
    PassThroughVerifyStep(),
    CommitStep(),
    HandOverStep(),
    FinishStep(),
]
