"""The switch: move the host from the source LUN to the destination LUN, never leaving it without one.

Everything that can be done while the host still works on the source is done
first (`prepare`): the migrator leaves, the destination takes the source's
serial (same WWID), the host gets an ACL and a session on the destination
portal, with no LUN mapped yet, so the login's scan adds no disk. The hold then
only does what must happen with host IO stopped:

  suspend the map        flush and freeze while the source still takes writes
  fence the source       write-protect the host's mapping (nothing lands there now)
  source path out        multipathd del path + SCSI delete of THIS volume's disk
  destination path in    map the LUN to the host, targeted scan of one H:C:T:L,
                         WWID checked, multipathd add path
  resume

At no moment are both paths in the map (a read through the source after a
write through the destination would return old bytes). multipathd resumes a
suspended map whenever it reloads it, so across the swap what holds IO is the
map having no path while it queues (`queue_if_no_path`); the map is kept open
meanwhile, because multipathd removes a path-less map that nobody holds.

Each irreversible step is journaled before it is taken. If the destination
path is not in the map within `switch_timeout`, the source path is put back
(`revert`) and IO resumes on the source; after kill -9 anywhere in here,
`resume` finishes the switch and `rollback` reverts it, from the journal.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, fields
from typing import Callable

from blockmig.array import lio
from blockmig.errors import ArrayError, BlockmigError, HostError, MigrationError
from blockmig.faults import checkpoint
from blockmig.host import iscsi, multipath, udev, usage
from blockmig.host.devices import freeze_filesystems, map_disks, resume_map_with_a_path, thaw_filesystems
from blockmig.host.runner import extend_phase_deadline, phase_deadline
from blockmig.state import MigrationJournal

DEFAULT_SWITCH_TIMEOUT = 10.0
END_HOLD_TIMEOUT = 30.0  # the commands that end a hold (restore queueing, resume) get their own budget

EventHandler = Callable[[dict], None]


@dataclass
class SwitchFacts:
    """What the switch journals (`steps.switch.facts`), each fact before the act it makes possible to undo;
    resume and rollback read them back. A fact renamed here is renamed for every reader."""

    prepared: bool = False  # migrator out, destination has the source's serial, host ACL and session made
    host_acl_ready: bool = False  # intent: rollback removes the host's ACL on the destination if it is empty
    host_session_existed: bool = False  # the host's session to the destination portal was there before us
    mountpoints: list[str] | None = None  # what the hold freezes (read before it: a walk of /proc is slow)
    suspended_at: float | None = None  # the hold began (time.time())
    source_fencing: bool = False  # intent: the host's mapping of the source is (being) write-protected
    source_leaving: bool = False  # pass-through intent: the source's path leaves the map (undo puts it back)
    source_removed: bool = False  # the source's path is out of the host's map
    source_logged_out: list = field(default_factory=list)  # relogin: [target, ip, port, iface] logged out
    queueing_held: bool = False  # the path-less map is held suspended past multipathd's countdown
    destination_host_lun: int | None = None  # the host's LUN of the destination (intent: revert unmaps it)
    destination_joined: bool = False  # the destination path is in the host's map: no way back
    host_disk: str | None = None  # the host's disk of the destination
    io_flowing_at: float | None = None  # host IO flows again
    thawed_at: float | None = None
    io_held_seconds: float | None = None
    reverted: bool = False  # the source path was put back (the copy is invalid: the host wrote the source)

    @classmethod
    def load(cls, journal: MigrationJournal, step: str = "switch") -> SwitchFacts:
        recorded = journal.facts(step)
        return cls(**{f.name: recorded[f.name] for f in fields(cls) if f.name in recorded})

    @classmethod
    def check_names(cls, facts: dict) -> None:
        unknown = set(facts) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"not a switch fact: {', '.join(sorted(unknown))}")


class HostSwitch:
    """The switch step of one migration; every method can run again after a crash."""

    step = "switch"  # the journal entry that holds its facts

    def __init__(self, journal: MigrationJournal, emit: EventHandler):
        self.journal = journal
        self.emit = emit
        self.source = journal.data["source"]
        self.destination = journal.data["destination"]
        self.migrator = journal.data["migrator"]
        self.map_name = self.source["map"]
        self.timeout = float(journal.data.get("switch_timeout") or DEFAULT_SWITCH_TIMEOUT)
        self._deadline: float | None = None  # set when the destination is mapped to the host

    # -- journal ---------------------------------------------------------------
    @property
    def facts(self) -> SwitchFacts:
        return SwitchFacts.load(self.journal, self.step)

    def _record(self, **facts) -> None:
        SwitchFacts.check_names(facts)
        self.journal.record(self.step, **facts)

    def _phase(self, phase: str) -> None:
        """Where the hold's time goes (events), and a point where tests can stop us."""
        since = time.time() - (self.facts.suspended_at or time.time())
        self.emit({"event": "switch_phase", "phase": phase, "seconds_since_hold": round(since, 3)})
        checkpoint(f"switch:{phase}")

    # -- the whole switch ---------------------------------------------------------
    def run(self) -> dict:
        if not self.facts.prepared:
            self.prepare()
        if not self.facts.destination_joined:
            failure = None
            with self.host_io_held():
                try:
                    self.take_source_out()
                    disk = self.bring_destination_in()
                except BaseException as exc:  # a bug or a KeyboardInterrupt too: never leave it path-less
                    if self.facts.destination_joined:
                        raise
                    try:
                        self.revert_in_hold()
                    except MigrationError as refused:  # say why it was reverting, too
                        raise MigrationError(f"{exc}; {refused}") from exc
                    failure = exc
            if failure is not None:
                self.after_revert()  # outside the hold: the host already works on the source again
                if not isinstance(failure, BlockmigError):
                    raise failure
                raise MigrationError(
                    f"switch reverted, the host is on the source again: {failure}"
                ) from failure
            self._record_io_held()
        else:  # killed after the destination joined: what the hold left is undone, then the rest
            disk = self.facts.host_disk
            if self.map_name:
                self.end_hold()
            if self.facts.io_held_seconds is None:
                self._record_io_held()
        self.after_switch()
        return {"io_held_seconds": self.facts.io_held_seconds, "host_disk": disk}

    def _record_io_held(self) -> None:
        """From the first held IO to the moment IO flows again: multipathd's reload resumed the map with
        the destination path in it, or our own resume and thaw, whichever came later."""
        if not self.map_name:
            return
        flowing = self.facts.io_flowing_at or time.time()
        if self.facts.thawed_at:
            flowing = max(flowing, self.facts.thawed_at)
        held = round(flowing - self.facts.suspended_at, 3)
        self._record(io_held_seconds=held)
        self.emit({"event": "io_resumed", "map": self.map_name, "io_held_seconds": held})

    # -- before the hold ----------------------------------------------------------
    def prepare(self) -> None:
        """Everything the host does not notice: migrator out, identity, host session to the destination."""
        self.logout_migrator()
        self.give_destination_the_source_identity()
        self.prepare_host_side()

    def give_destination_the_source_identity(self) -> None:
        """The migrator's mapping goes, then the destination takes the source's serial (same WWID)."""
        volume = self.destination_volume()
        for mapping in lio.list_mappings(volume):
            if mapping.initiator_iqn == self.migrator["initiator"]:
                lio.unexport_volume(volume, mapping.initiator_iqn)
        # Mapped to nobody now, so nobody sees the source's WWID on it yet.
        lio.change_volume_serial(volume, self.source["serial"])

    def prepare_host_side(self) -> None:
        """The host's ACL and session on the destination portal, no LUN mapped yet; what the hold will
        freeze."""
        self._record(host_acl_ready=True)  # intent first: rollback removes it again if it stays empty
        lio.ensure_node_acl(self.destination["target"], self.source["host_initiator"])
        if self.map_name:
            # Read before the hold (a walk of /proc is slow): what the hold will freeze.
            self._record(mountpoints=list(usage.volume_users(f"/dev/mapper/{self.map_name}").rw_mountpoints))
        existing = iscsi.find_portal_session(
            self.destination["target"], self.destination["portal"], self.source["host_iface"]
        )
        if existing is None:
            iscsi.login_portal(
                self.destination["target"], self.destination["portal"], self.source["host_iface"]
            )
        self._record(prepared=True, host_session_existed=existing is not None)
        self._phase("prepared")

    def destination_volume(self) -> lio.Volume:
        return existing_destination_volume(self.journal)

    def logout_migrator(self) -> None:
        session = iscsi.find_portal_session(
            self.destination["target"], self.destination["portal"], self.migrator["iface"]
        )
        if session is not None:
            iscsi.logout_safely(session)
        if self.migrator["iface"] in iscsi.list_ifaces():
            iscsi.remove_iface(self.migrator["iface"])

    # -- the hold ------------------------------------------------------------------
    @contextlib.contextmanager
    def host_io_held(self):
        """Freeze filesystems and suspend the map (draining IO in flight); resume and thaw at the end,
        whatever happens.

        Filesystems are frozen with FIFREEZE, not by dm's lockfs: multipathd's
        reloads resume the map, and a dm resume would thaw a lockfs freeze
        while the map has no path (the thaw's write then hangs multipathd).
        """
        if not self.map_name:
            yield
            return
        try:
            opener = os.open(f"/dev/mapper/{self.map_name}", os.O_RDONLY)
        except OSError as exc:
            raise HostError(f"cannot open /dev/mapper/{self.map_name}: {exc.strerror}") from None
        try:
            if self.facts.suspended_at is None:
                self._record(suspended_at=time.time())
            # Every command from here to the end of the hold is bounded by the switch timeout, from here to
            # the destination's mapping and from there to its join (the end of the hold, and a revert, get
            # budgets of their own).
            with phase_deadline(self.timeout, f"the switch timeout of map {self.map_name}"):
                # The source still takes writes here: the freeze and the drain can write.
                freeze_filesystems(
                    self.map_name, self.journal.frozen, self.journal.save, self.facts.mountpoints
                )
                if not multipath.is_suspended(self.map_name):
                    # A flushing suspend of a path-less map (resumed after kill -9) would fail its queued IO.
                    multipath.suspend_map(self.map_name, lockfs=False, flush=bool(map_disks(self.map_name)))
                self.emit({"event": "io_held", "map": self.map_name})
                self._phase("held")
                yield
        finally:
            try:
                self.end_hold()
            finally:
                os.close(opener)

    def end_hold(self) -> None:
        """Queueing back to multipathd, the map resumed, filesystems thawed (each only if still needed)."""
        with phase_deadline(END_HOLD_TIMEOUT, f"the end of the hold of map {self.map_name}"):
            self._end_hold()

    def _end_hold(self) -> None:
        self._end_queueing_hold()
        if multipath.is_suspended(self.map_name):
            resume_map_with_a_path(self.map_name)
            self._record(io_flowing_at=time.time())
        if thaw_filesystems(self.map_name, self.journal.frozen, self.journal.save):
            self._record(thawed_at=time.time())

    def hold_again_after_join(self) -> None:
        """multipathd's reload resumed the map when the destination joined; a group holds it till all have."""
        if not multipath.is_suspended(self.map_name):
            multipath.suspend_map(self.map_name, lockfs=False, flush=False)

    def _hold_queueing(self) -> None:
        """The map has no path now: keep its IO waiting past multipathd's no_path_retry countdown (kill -9
        included). Plan refused a map that does not queue, so its table is not asked."""
        self._record(queueing_held=True)
        multipath.hold_queueing(self.map_name, known_to_queue=True)

    def _end_queueing_hold(self) -> None:
        if self.facts.queueing_held and self._map_has_a_usable_path():
            multipath.restore_queueing(multipath.QueueHold(self.map_name, True))
            self._record(queueing_held=False)

    def _map_has_a_usable_path(self) -> bool:
        return any(path.usable for path in multipath.paths_of_map(self.map_name))

    def _host_source_sessions(self) -> list[iscsi.Session]:
        """Every session of the host to the source target (a map may have a path per portal)."""
        return [
            s
            for s in iscsi.sessions()
            if s.target_iqn == self.source["target"] and s.initiator_iqn == self.source["host_initiator"]
        ]

    def _source_volume(self) -> lio.Volume:
        return lio.find_volume(self.source["volume"])

    def take_source_out(self) -> None:
        """Fence the source and take this volume's disk out of the map (found by the host's LUN, WWID
        checked).

        The disk itself is deleted by finish_source_removal, while udev works on the destination's new disk.
        """
        if self.facts.source_removed:
            return
        self._record(source_fencing=True)  # intent: revert must lift the protection
        lio.set_mapping_write_protect(self._source_volume(), self.source["host_initiator"], True)
        self._phase("source fenced")
        for session in self._host_source_sessions():
            disk = iscsi.session_disks(session).get(self.source["host_lun"])
            if disk is not None:
                iscsi.check_disk_wwid(
                    disk, self.source["wwid"], f"LUN {self.source['host_lun']} of session {session.sid}"
                )
                if self.map_name and disk in map_disks(self.map_name):
                    multipath.del_path(disk)
        self._record(source_removed=True)
        self._phase("source path removed")

    def finish_source_removal(self) -> None:
        """Delete the source's disks (nothing can bring them back into the map), relogin's logouts, and keep
        the path-less map queueing past multipathd's countdown."""
        for session in self._host_source_sessions():
            disk = iscsi.session_disks(session).get(self.source["host_lun"])
            if disk is not None:
                iscsi.delete_disk_checked(disk, self.source["wwid"])
            if self.journal.data["switch"] == "relogin":
                self._logout_source_session(session)
        if self.map_name and not map_disks(self.map_name):
            self._hold_queueing()
        self._phase("source disk deleted")

    def _logout_source_session(self, session: iscsi.Session) -> None:
        """relogin: the session goes too, unless it carries other volumes; journaled first, so revert logs
        back in."""
        if iscsi.session_disks(session):
            return
        address = [session.target_iqn, session.portal_ip, session.port, session.iface]
        logged_out = self.facts.source_logged_out
        if address not in logged_out:
            self._record(source_logged_out=[*logged_out, address])
        iscsi.logout_if_unused(session)

    def bring_destination_in(self) -> str:
        """Map the destination to the host, scan that one LUN, check it, put it in the map."""
        self.attach_destination()
        self.finish_source_removal()  # while udev processes the new disk
        return self.join_destination()

    def attach_destination(self) -> None:
        """Map the destination to the host and scan that one LUN (udev and multipathd take it from there)."""
        volume = self.destination_volume()
        host = self.source["host_initiator"]
        mapping = lio.find_mapping(volume, host)
        if mapping is None:
            lun = lio.free_mapped_lun(self.destination["target"], host, preferred=self.source["host_lun"])
            self._record(destination_host_lun=lun)  # intent: revert must unmap it
            mapping = lio.export_volume(volume, host, mapped_lun=lun)
        self._record(destination_host_lun=mapping.mapped_lun)
        self._phase("destination mapped")
        session = self._host_destination_session(login=True)
        self._deadline = time.monotonic() + self.timeout
        extend_phase_deadline(self.timeout)  # the join's commands get what its wait gets
        if mapping.mapped_lun not in iscsi.session_disks(session):
            iscsi.scan_session_lun(session, mapping.mapped_lun)

    def join_destination(self) -> str:
        """The new disk, WWID checked, into the map: from here on the host's IO can reach the destination."""
        deadline = self._deadline or time.monotonic() + self.timeout
        session = self._host_destination_session(login=True)
        lun = self.facts.destination_host_lun
        wait = self._seconds_left_or_timeout(deadline)
        disk = iscsi.find_session_disk(session, lun, self.source["wwid"], wait)
        self._phase("destination disk present")
        if self.map_name:
            multipath.add_path_now(self.map_name, disk, self._seconds_left_or_timeout(deadline))
        flowing = not (self.map_name and multipath.is_suspended(self.map_name))
        self._record(destination_joined=True, host_disk=disk, io_flowing_at=time.time() if flowing else None)
        self._phase("destination path in the map")
        return disk

    def _host_destination_session(self, login: bool = False) -> iscsi.Session | None:
        session = iscsi.find_portal_session(
            self.destination["target"], self.destination["portal"], self.source["host_iface"]
        )
        if session is None and login:
            session = iscsi.login_portal(
                self.destination["target"], self.destination["portal"], self.source["host_iface"]
            )
        return session

    def _destination_path_took_io(self) -> bool:
        """The destination's disk is in the map's table: IO may have reached it, a revert would lose that.

        multipathd adds the new disk by itself once udev is done, and its reload
        resumes a suspended map; after kill -9 nobody knows whether that happened
        before a later suspend, so being in the table is what counts.
        """
        lun = self.facts.destination_host_lun
        if not self.map_name or lun is None:
            return False
        session = self._host_destination_session()
        disk = iscsi.session_disks(session).get(lun) if session else None
        return disk is not None and disk in map_disks(self.map_name)

    def _seconds_left_or_timeout(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HostError(
                f"the destination path did not join within the switch timeout ({self.timeout:g} s)"
            )
        return left

    # -- back to the source ---------------------------------------------------------
    def revert_in_hold(self) -> None:
        """Put the source path back while IO is still held: unmap the destination, unfence, re-add.

        Refused once IO may have reached the destination (see _destination_path_took_io):
        the switch is then finished forward by resume instead.
        """
        if self._destination_path_took_io():
            self._record(destination_joined=True)
            raise MigrationError(
                f"the destination path is already in map {self.map_name} and IO may have reached it: "
                "not reverting; blockmig resume finishes the switch"
            )
        self.emit({"event": "switch_revert", "map": self.map_name})
        with phase_deadline(max(self.timeout, udev.DEFAULT_TIMEOUT), f"the revert of map {self.map_name}"):
            self._revert_in_hold()

    def _revert_in_hold(self) -> None:
        self._detach_host_from_destination_lun()
        with contextlib.suppress(ArrayError):
            lio.set_mapping_write_protect(self._source_volume(), self.source["host_initiator"], False)
        for target, ip, port, iface in self.facts.source_logged_out:
            iscsi.login(target, ip, port, iface=iface)
        for session in self._host_source_sessions():
            if self.source["host_lun"] not in iscsi.session_disks(session):
                iscsi.scan_session_lun(session, self.source["host_lun"])
            disk = iscsi.find_session_disk(session, self.source["host_lun"], self.source["wwid"])
            if self.map_name:
                multipath.add_path_now(self.map_name, disk, max(self.timeout, udev.DEFAULT_TIMEOUT))
        self._record(source_removed=False, source_fencing=False, source_logged_out=[], reverted=True)
        self._phase("reverted")

    def _detach_host_from_destination_lun(self) -> None:
        """The destination's disk leaves the map and the SCSI layer; its mapping for the host goes."""
        with contextlib.suppress(ArrayError, MigrationError):
            volume = self.destination_volume()
            mapping = lio.find_mapping(volume, self.source["host_initiator"])
            if mapping is not None:
                session = self._host_destination_session()
                disk = iscsi.session_disks(session).get(mapping.mapped_lun) if session else None
                if disk is not None:
                    if self.map_name and disk in map_disks(self.map_name):
                        multipath.del_path(disk)
                    iscsi.delete_disk_checked(disk, self.source["wwid"])
                lio.unexport_volume(volume, self.source["host_initiator"], keep_acl=True)
        self._record(destination_joined=False, destination_host_lun=None)

    def after_revert(self) -> None:
        """Outside the hold: the destination gets its own serial back, the host's session to it goes.

        The migrator's export comes back with the next copy (the host wrote the
        source again, so the copy starts over).
        """
        with contextlib.suppress(MigrationError):  # a destination that vanished needs no serial back
            lio.change_volume_serial(self.destination_volume(), self.destination["temporary_serial"])
        self.release_host_destination_session()

    def record_revert(self) -> None:
        """The host is back on the source and may write it: resume runs again what that invalidates."""
        from blockmig.orchestrator.migration import Migration  # the step table, which imports this module

        self.journal.data["switch_reverts"] = self.journal.data.get("switch_reverts", 0) + 1
        Migration(self.journal, self.emit).invalidate("fence")  # fenced and copied again

    def release_host_destination_session(self) -> None:
        """The host's session to the destination goes if it carries nothing (it was made for this switch)."""
        session = self._host_destination_session()
        if session is not None and not self.facts.host_session_existed:
            iscsi.logout_if_unused(session)
        if self.facts.host_acl_ready:
            lio.remove_node_acl_if_empty(self.destination["target"], self.source["host_initiator"])
        self._record(prepared=False, host_acl_ready=False)

    # -- after the hold ---------------------------------------------------------------
    def after_switch(self) -> None:
        """The source is out of the host's view for good: unmapped, and sessions with nothing left go."""
        source = self._source_volume()
        for session in self._host_source_sessions():
            iscsi.logout_if_unused(session)
        if lio.find_mapping(source, self.source["host_initiator"]) is not None:
            lio.unexport_volume(source, self.source["host_initiator"])


def existing_destination_volume(journal: MigrationJournal) -> lio.Volume:
    try:
        return lio.find_volume(journal.data["destination"]["volume"])
    except ArrayError:
        raise MigrationError(f"destination volume {journal.data['destination']['volume']} is gone") from None


# ---------------------------------------------------------------------------
# several volumes as one consistency group


def switch_group(switches: list[HostSwitch]) -> list[dict]:
    """Switch verified migrations as one consistency group: every map held, every path moved, every map
    resumed.

    All sources go out and all destinations are mapped and scanned before any joins, so a
    failure up to there reverts the whole group. Joining is the point of no
    return (multipathd adds a processed disk by itself, and its reload resumes
    the map), so a member that then fails to join is reverted alone and the group
    is split: each volume still has all its acknowledged writes on the device the
    host uses, the failed ones copy again on resume. A joined map is suspended
    again until the last member has joined, and filesystems stay frozen until then.
    Marks the step `switch` in every journal; returns each member's facts in order.
    """
    pending = [switch for switch in switches if not switch.journal.is_done("switch")]
    for switch in pending:
        switch.journal.mark_started("switch")
    for switch in pending:
        if switch.facts.destination_joined:  # killed after it joined: end its hold first
            switch.end_hold()
        elif not switch.facts.prepared:
            switch.prepare()
    moving = [switch for switch in pending if not switch.facts.destination_joined]
    failures: dict[str, BlockmigError] = {}
    with contextlib.ExitStack() as holds:
        for switch in moving:
            holds.enter_context(switch.host_io_held())
        try:
            for switch in moving:
                switch.take_source_out()
            for switch in moving:
                switch.attach_destination()
            for switch in moving:  # while udev processes the new disks
                switch.finish_source_removal()
        except BaseException as exc:  # a bug or a KeyboardInterrupt too: the group goes back to the source
            failures = {switch.journal.id: exc for switch in moving}
        else:
            for switch in moving:
                try:
                    switch.join_destination()
                except BlockmigError as exc:
                    failures[switch.journal.id] = exc
                else:
                    if len(moving) > 1:
                        switch.hold_again_after_join()
        for switch in moving:
            if switch.journal.id in failures and not switch.facts.destination_joined:
                try:
                    switch.revert_in_hold()
                except BlockmigError as exc:  # its destination took IO meanwhile: finished forward on resume
                    failures[switch.journal.id] = exc
    results = []
    for switch in switches:
        if switch.journal.is_done("switch"):
            results.append(switch.journal.facts("switch"))
        elif switch.facts.reverted and switch.journal.id in failures:
            switch.after_revert()
            switch.record_revert()
        elif switch.journal.id not in failures:
            if switch.facts.io_held_seconds is None:
                switch._record_io_held()
            switch.after_switch()
            facts = {
                "io_held_seconds": switch.facts.io_held_seconds,
                "host_disk": switch.facts.host_disk,
            }
            switch.journal.mark_done("switch", **facts)
            results.append(facts)
    if failures:
        on_destination = [s.journal.id for s in switches if s.journal.is_done("switch")]
        details = "; ".join(f"{member}: {error}" for member, error in failures.items())
        raise MigrationError(
            f"group switch failed ({details}); on the destination: {', '.join(on_destination) or 'none'}; "
            "reverted members copy again on resume"
        )
    return results
