"""Online migration: the host keeps reading and writing while its volume moves; only the last delta is held.

Where writes are tracked, and why there: the kernel never lets a multipath map
be reloaded as another target ("can't replace immutable target type
multipath", host/era.py). So online mode tracks on the dm maps stacked ON the
host's multipath map, its holders: LVM logical volumes, kpartx partitions, any
linear map. Each holder is reloaded as dm-era over a private copy of its own
table (its dev_t and open handles stay), and era lists the blocks written
since a given era. A volume used directly (a filesystem on /dev/mapper/mpathX,
an application opening it for writing) or a bare disk cannot be tracked:
`--mode online` is refused for it and `--mode offline` (a fence for the whole
copy) is the default there.

The passes, each journaled, each resumable after kill -9:
  track     every holder becomes era (host/era.py; the plan journaled first)
  pass 1    a drained checkpoint, then the claim's guarded sequential copy
  deltas    drained checkpoint E_k; chunks written since the previous pass's era
            E_(k-1); copied through DeltaGuard, read back, new digests in the
            manifest; until the estimated hold of the next delta <= --max-hold
  verify    the destination against the manifest (the migrator's alone, so
            stable), then deltas again for what the host wrote meanwhile
  hold      freeze filesystems, suspend the private maps with flush, list and
            copy the last delta, read it back, hand the destination to the host
            (switch.HostSwitch), resume, thaw; the holders' tables go back after

Why the destination equals the source at the switch. A "drained checkpoint"
starts a new era E and then suspends (with flush) and resumes each era map:
era records a write (bit set, metadata committed) BEFORE passing it down, and
the flush waits for every write in flight, so every write recorded in an era
before E has completed on the source before any read of a pass that follows.
Take a chunk c read for the last time in pass k (reads after E_k began). A
write to c that completes after that read cannot be recorded before E_k (it
would have completed before the read), so it is recorded in an era >= E_k and
pass k+1 lists c and reads it again; so no pass is ever the last one to read
c while a later write to it is missing. In the hold the private maps (the only
way into the multipath map) are suspended with flush: nothing reaches the
source any more, and a write era has recorded but not yet passed down waits in
the private map and lands on the destination after the switch. The final list
(written since the last drained checkpoint) therefore covers every write the
last reads can have missed; each copied chunk is read back from the
destination against its new digest, the rest of the destination was verified
against the manifest before, and the manifest holds the digest of each chunk
as last read from the source. The base era only moves at a drained
checkpoint; a pass killed half-way is redone from the same base (a superset).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable

from blockmig import signals
from blockmig.datapath.blockdev import allocate_aligned_buffer, open_source
from blockmig.datapath.digest import Manifest, digest_chunk, load_manifest
from blockmig.datapath.guard import DeltaGuard
from blockmig.datapath.journal import write_json_atomically
from blockmig.errors import DeviceError, HostError, MigrationError, UsageError, VerifyError
from blockmig.faults import checkpoint
from blockmig.host import era, multipath, usage
from blockmig.host.devices import freeze_filesystems, holder_maps
from blockmig.host.runner import extend_phase_deadline, phase_deadline
from blockmig.orchestrator.host_switch import END_HOLD_TIMEOUT, HostSwitch
from blockmig.state import MigrationJournal

MODES = ("online", "offline", "pass-through")
PASS_THROUGH = "pass-through"
DEFAULT_MAX_HOLD = 1.0
MAX_DELTA_PASSES = 8  # per convergence; then the writer is said to outpace the copy
STALLED_PASSES = 3  # a delta that has not shrunk in this many passes in a row will not converge
SECTOR = 512

EventHandler = Callable[[dict], None]


# ---------------------------------------------------------------------------
# which hosts can be migrated online


@dataclass(frozen=True)
class Segment:
    """One `linear` line of a holder's table: holder sectors [start, start+length) are map sectors from
    offset."""

    start: int
    length: int
    offset: int


def linear_segments(table_text: str, device_number: str) -> list[Segment]:
    """The table as segments over `device_number` (MAJ:MIN); a line of another target or device is refused."""
    segments = []
    for line in table_text.splitlines():
        fields = line.split()
        if len(fields) != 5 or fields[2] != "linear" or fields[3] != device_number:
            raise HostError(
                f"its table has a segment that is not linear on {device_number}: {line.strip()!r}"
            )
        segments.append(Segment(int(fields[0]), int(fields[1]), int(fields[4])))
    return segments


def online_refusal(map_name: str | None, device: str) -> str | None:
    """Why writes to this host device cannot be tracked (None: they can)."""
    if map_name is None:
        return f"{device} is a bare disk, not a multipath map with maps stacked on it"
    holders = holder_maps(map_name)
    if not holders:
        return f"nothing is stacked on /dev/mapper/{map_name} (a filesystem or application uses it directly)"
    dm = os.path.basename(os.path.realpath(f"/dev/mapper/{map_name}"))
    users = usage.volume_users(f"/dev/mapper/{map_name}")
    direct = [m.mountpoint for m in users.mounts if m.device == dm]
    direct += [f"pid {o.pid} ({o.name})" for o in users.writers if o.device == dm]
    if direct:
        return f"{', '.join(direct)} use{'s' if len(direct) == 1 else ''} /dev/mapper/{map_name} directly"
    number = ":".join(map(str, usage.device_number(dm)))
    for holder in holders:
        if not holder.startswith(era.PRIVATE_PREFIX):
            try:
                linear_segments(era.table(holder), number)
            except HostError as exc:
                return f"stacked map {holder}: {exc}"
    return None


def choose_mode(requested: str | None, fence_given: bool, map_name: str | None, device: str) -> str:
    """--mode, or the default: online where writes can be tracked and no --fence asks for offline."""
    if requested not in (None, *MODES):
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    if requested == "offline":
        return "offline"
    if requested in ("online", PASS_THROUGH) and fence_given:
        raise UsageError("--fence is for --mode offline: online mode lets the host write during the copy")
    if requested == PASS_THROUGH:
        if map_name is None:
            raise UsageError(f"--mode pass-through moves the host by its multipath map: {device} is not one")
        return PASS_THROUGH
    if requested is None and fence_given:
        return "offline"
    refusal = online_refusal(map_name, device)
    if refusal is None:
        return "online"
    if requested == "online":
        if map_name is None:
            raise UsageError(f"--mode online moves the host by its multipath map: {refusal}; use --mode "
                             "offline with --switch relogin")
        return PASS_THROUGH  # used directly: the destination passes through to the source (pass_through.py)
    return "offline"


def new_state(map_name: str, max_hold: float) -> dict:
    """The journal's `online` record at plan time."""
    if not 0 < max_hold <= 60:
        raise UsageError(f"--max-hold {max_hold:g} s must be above 0 and at most 60 s")
    return {
        "max_hold": max_hold,
        "holders": holder_maps(map_name),
        "trackings": {},
        "base_era": None,
        "pass1_done": False,
        "pass": 0,
        "passes": [],
        "holding": False,
    }


# ---------------------------------------------------------------------------
# tracking


def era_block_sectors(chunk_size: int) -> int:
    """The largest power of two dividing the chunk (era wants one), so an era block never spans two chunks."""
    sectors = chunk_size // SECTOR
    return sectors & -sectors


def _trackings(journal: MigrationJournal) -> list[era.Tracking]:
    return [era.Tracking.from_dict(data) for data in journal.data["online"]["trackings"].values()]


def _journal_tracking(journal: MigrationJournal, tracking: era.Tracking) -> None:
    journal.data["online"]["trackings"][tracking.map_name] = tracking.to_dict()
    journal.save()


def start_tracking(journal: MigrationJournal) -> dict:
    """Every holder of the host's map becomes era; each plan is journaled before it changes anything."""
    state = journal.data["online"]
    block_sectors = era_block_sectors(journal.data["chunk_size"])
    resume_era_maps(journal)
    for name in state["holders"]:
        known = state["trackings"].get(name)
        if known is not None:
            tracking = era.Tracking.from_dict(known)
            if era.is_tracking(tracking) and era.map_exists(tracking.private_map):
                continue
            era.stop_tracking(tracking)  # killed half-way through the start: undo it, then start again
        tracking = era.new_tracking(name, journal.directory, block_sectors)
        _journal_tracking(journal, tracking)
        era.start_tracking(tracking, on_change=lambda t: _journal_tracking(journal, t))
    return {"tracking": list(state["holders"]), "era_block_sectors": block_sectors}


def stop_tracking(journal: MigrationJournal) -> None:
    """Every holder gets its original table back; private maps, loop devices and metadata go."""
    resume_private_maps(journal)
    resume_era_maps(journal)
    for tracking in _trackings(journal):
        era.stop_tracking(tracking)
        del journal.data["online"]["trackings"][tracking.map_name]
        journal.save()


def resume_era_maps(journal: MigrationJournal) -> None:
    """An era map is suspended only inside a drained checkpoint: one left so by kill -9 is resumed."""
    for tracking in _trackings(journal):
        if era.map_exists(tracking.map_name) and multipath.is_suspended(tracking.map_name):
            _resume(tracking.map_name)


def resume_private_maps(journal: MigrationJournal) -> bool:
    """End the hold's suspend of the private maps (before any thaw: the thaw writes through them).

    Only `holding` suspends them; no state query first (each dmsetup call costs ~80 ms of held IO in the lab
    VM).
    """
    if not journal.data["online"]["holding"]:
        return False
    for tracking in _trackings(journal):
        try:
            _resume(tracking.private_map)
        except HostError:
            if era.map_exists(tracking.private_map):
                raise
    journal.data["online"]["holding"] = False
    journal.save()
    return True


def _drained_checkpoint(journal: MigrationJournal) -> dict[str, int]:
    """A new era on every holder, then a flushing suspend + resume: every write recorded before it has
    completed."""
    eras = {}
    for tracking in _trackings(journal):
        eras[tracking.map_name] = era.checkpoint(tracking)
        _suspend(tracking.map_name)
        _resume(tracking.map_name)
    return eras


def _suspend(name: str) -> None:
    """Flushing suspend without a filesystem freeze: every IO in flight through the map completes first."""
    era.run(["dmsetup", "suspend", "--nolockfs", name], f"cannot suspend map {name}")


def _resume(name: str) -> None:
    # No wait for udev: the node stays, and udev's rules (blkid, LVM) cost 0.1-0.5 s a call in the lab VM.
    era.run(["dmsetup", "resume", "--noudevsync", name], f"cannot resume map {name}")


def _delta_chunks(
    journal: MigrationJournal, base: dict[str, int], map_name: str, source: str, manifest: Manifest
) -> list[int]:
    """Ascending chunk indexes of the host's map holding any block written on a holder since `base`,
    and the head chunks if LVM changed its metadata there meanwhile."""
    chunk_size = journal.data["chunk_size"]
    size = journal.data["source"]["size"]
    number = ":".join(
        map(str, usage.device_number(os.path.basename(os.path.realpath(f"/dev/mapper/{map_name}"))))
    )
    check_nothing_new_stacked(journal, map_name)
    chunks: set[int] = set()
    all_segments = []
    for tracking in _trackings(journal):
        segments = linear_segments(tracking.original_table, number)
        all_segments += segments
        blocks = era.written_since(tracking, base[tracking.map_name])
        chunks.update(chunks_of_blocks(blocks, tracking.block_sectors, segments, chunk_size, size))
    head = head_chunks(all_segments, chunk_size) - chunks
    return sorted(chunks | changed_chunks(source, sorted(head), manifest))


def head_chunks(segments: list[Segment], chunk_size: int) -> set[int]:
    """The chunks before the first holder segment: LVM's label and metadata area (or a partition table).

    LVM commands write them straight to the multipath map, where era does not look
    (a VG tag, an LV renamed), so each pass reads them (a chunk or two) and copies them if they changed.
    LVM commands during the hold itself are not covered: the README tells admins to leave the VG alone.
    """
    if not segments:
        return set()
    first = min(segment.offset for segment in segments) * SECTOR
    return set(range(0, -(-first // chunk_size)))


def check_nothing_new_stacked(journal: MigrationJournal, map_name: str) -> None:
    """A map stacked on the host's map after tracking began (a new LV) writes where era does not look."""
    untracked = [name for name in holder_maps(map_name) if not name.startswith(era.PRIVATE_PREFIX)]
    if untracked:
        raise MigrationError(
            f"{', '.join(untracked)} was stacked on /dev/mapper/{map_name} during the migration and its "
            "writes are "
            "not tracked: roll this migration back and start again"
        )


def chunks_of_blocks(
    blocks: list[int], block_sectors: int, segments: list[Segment], chunk_size: int, size: int
) -> set[int]:
    """Era blocks (holder address space) -> chunk indexes of the map, through the holder's linear segments."""
    chunks = set()
    for block in blocks:
        first, end = block * block_sectors, (block + 1) * block_sectors
        for segment in segments:
            low, high = max(first, segment.start), min(end, segment.start + segment.length)
            if low >= high:
                continue
            start = (segment.offset + low - segment.start) * SECTOR
            stop = min((segment.offset + high - segment.start) * SECTOR, size)
            chunks.update(range(start // chunk_size, (stop - 1) // chunk_size + 1))
    return chunks


# ---------------------------------------------------------------------------
# the passes


def begin_pass_one(journal: MigrationJournal) -> None:
    """Pass 1 reads only after a drained checkpoint (once: a resumed pass 1 keeps its base)."""
    state = journal.data["online"]
    if state["base_era"] is None:
        resume_era_maps(journal)
        state["base_era"] = _drained_checkpoint(journal)
        state["pass"] = 1
        journal.save()


def converge(
    journal: MigrationJournal,
    manifest: Manifest | None,
    source: Callable[[], str],
    destination: str,
    emit: EventHandler,
    pass1_seconds: float | None = None,
    arm: Callable[[list[tuple[int, int]]], None] | None = None,
) -> Manifest:
    """Delta passes until the next delta fits --max-hold; the writer outpacing the copy stops the migration.

    `manifest`: pass 1's (ignored once pass 1 is recorded: manifest.json then holds the newer digests).
    `arm`: tells a destination that guards the copy itself which extents each pass writes, before it does.
    """
    state = journal.data["online"]
    if not state["pass1_done"]:
        write_json_atomically(journal.manifest_path, manifest.to_dict())
        state["pass1_done"] = True
        state["pass1_rate"] = manifest.size / pass1_seconds if pass1_seconds else None
        journal.save()
    manifest = load_manifest(journal.manifest_path, state_file=True)
    resume_era_maps(journal)
    map_name = journal.data["source"]["map"]
    history = []
    for _ in range(MAX_DELTA_PASSES):
        listed = time.monotonic()
        new_base = _drained_checkpoint(journal)
        chunks = _delta_chunks(journal, state["base_era"], map_name, source(), manifest)
        list_seconds = time.monotonic() - listed
        delta = _delta_bytes(chunks, manifest)
        # The hold also lists the delta (list_seconds, a fixed cost); --max-hold bounds the copy.
        estimate = delta / _delta_rate(state)
        state.update(
            delta_bytes=delta, estimated_hold=round(estimate, 3), list_seconds=round(list_seconds, 3)
        )
        history.append(delta)
        emit(
            {
                "event": "delta",
                "pass": state["pass"] + 1,
                "chunks": len(chunks),
                "bytes": delta,
                "estimated_hold": round(estimate, 3),
                "list_seconds": round(list_seconds, 3),
            }
        )
        measured = any(done["bytes"] and done["seconds"] for done in state["passes"])
        if not chunks or (measured and estimate <= state["max_hold"]):  # pass 1's pipelined rate says little
            journal.save()
            return manifest
        if len(history) > STALLED_PASSES and min(history[-STALLED_PASSES:]) >= history[-STALLED_PASSES - 1]:
            break
        signals.check(f"migration {journal.id} stopped between delta passes")  # a plan's member thread
        state["pass"] += 1
        journal.save()
        checkpoint("online:delta")
        seconds = copy_delta(source(), destination, chunks, manifest, journal.data["max_rate"], arm)
        write_json_atomically(journal.manifest_path, manifest.to_dict())
        state["base_era"] = new_base
        state["passes"].append(
            {
                "pass": state["pass"],
                "chunks": len(chunks),
                "bytes": delta,
                "seconds": round(seconds, 3),
                "list_seconds": round(list_seconds, 3),
            }
        )
        journal.save()
    trend = ", ".join(f"{size / 2**20:.1f}" for size in history)
    raise MigrationError(
        f"the host writes faster than the delta copy: deltas of {trend} MiB in {len(history)} rounds, the "
        "next "
        f"would hold host IO about {state['estimated_hold']:g} s (--max-hold {state['max_hold']:g}); host "
        "IO was "
        "never held: lower the write load, raise --max-rate or --max-hold, or use --mode offline"
    )


def _delta_bytes(chunks: list[int], manifest: Manifest) -> int:
    return sum(manifest.chunk_range(index)[1] - manifest.chunk_range(index)[0] for index in chunks)


def _delta_rate(state: dict) -> float:
    """Bytes/s of the last delta pass that copied something (read, guarded write, read back)."""
    for done in reversed(state["passes"]):
        if done["bytes"] and done["seconds"]:
            return done["bytes"] / done["seconds"]
    return state.get("pass1_rate") or 50e6


def copy_delta(
    source: str, destination: str, chunks: list[int], manifest: Manifest, max_rate: float | None = None,
    arm: Callable[[list[tuple[int, int]]], None] | None = None, read_back: bool = True,
) -> float:
    """Copy these chunks through the delta guard (source O_DIRECT, digest, guarded write), then read them
    back (not where the host writes the destination too: a pass-through's chunk may change after its copy).

    The manifest gets each chunk's new digest; returns the seconds taken.
    """
    began = time.monotonic()
    if not chunks:
        return 0.0
    chunk_size = manifest.chunk_size
    if arm is not None:
        arm([(start, end - start) for start, end in map(manifest.chunk_range, chunks)])
    buffer = allocate_aligned_buffer(chunk_size)
    reader = open_source(source)
    try:
        with DeltaGuard.open(destination, [index * chunk_size for index in chunks], chunk_size) as guard:
            for done, index in enumerate(chunks, 1):
                start, end = manifest.chunk_range(index)
                view = memoryview(buffer)[: end - start]
                _read_exactly(reader.fd, view, start, source)
                manifest.chunk_digests[index] = digest_chunk(view)
                guard.write(start, view)
                view.release()
                if max_rate:
                    ahead = done * chunk_size / max_rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
    finally:
        reader.close()
    if read_back:
        check_chunks(destination, chunks, manifest, buffer)
    buffer.close()
    return time.monotonic() - began


def check_chunks(path: str, chunks: list[int], manifest: Manifest, buffer) -> None:
    """Re-read these chunks of the destination and compare each with the manifest."""
    for index, found in _chunk_digests(path, chunks, manifest, buffer):
        if found != manifest.chunk_digests[index]:
            raise VerifyError(
                f"{path}: chunk {index} reads back with sha256 {found[:16]}..., "
                f"written as {manifest.chunk_digests[index][:16]}..."
            )


def changed_chunks(path: str, chunks: list[int], manifest: Manifest) -> set[int]:
    """Those of these chunks of `path` that no longer match the manifest."""
    if not chunks:
        return set()
    buffer = allocate_aligned_buffer(manifest.chunk_size)
    try:
        return {
            index
            for index, found in _chunk_digests(path, chunks, manifest, buffer)
            if found != manifest.chunk_digests[index]
        }
    finally:
        buffer.close()


def _chunk_digests(path: str, chunks: list[int], manifest: Manifest, buffer):
    """(index, sha256) of each of these chunks of `path`, read with O_DIRECT."""
    volume = open_source(path)
    try:
        for index in chunks:
            start, end = manifest.chunk_range(index)
            view = memoryview(buffer)[: end - start]
            _read_exactly(volume.fd, view, start, path)
            found = digest_chunk(view)
            view.release()
            yield index, found
    finally:
        volume.close()


def _read_exactly(fd: int, view: memoryview, address: int, path: str) -> None:
    try:
        got = os.preadv(fd, [view], address)
    except OSError as exc:
        raise DeviceError(f"read at byte {address} of {path} failed: {exc.strerror}") from None
    if got != len(view):
        raise DeviceError(f"short read at byte {address} of {path}: {got} of {len(view)} bytes")


# ---------------------------------------------------------------------------
# the hold and the switch


class OnlineSwitch(HostSwitch):
    """The switch of an online migration: the last delta is copied inside the hold, then the paths move.

    The hold suspends the private maps (below era, above the multipath map),
    not the multipath map: era must keep answering (a suspended era map
    answers no message), and a flushing suspend of the multipath map under
    them would wait for IO they queue. The migrator keeps the destination
    until the last delta is in; only then does it take the source's serial.
    """

    revert_invalidates = (
        "copy"  # era went on tracking while the host wrote the source: deltas again, pass 1 stays
    )

    def __init__(
        self,
        journal: MigrationJournal,
        emit: EventHandler,
        source: Callable[[], str],
        destination: Callable[[], str],
    ):
        super().__init__(journal, emit)
        self.source_disk = source
        self.destination_disk = destination

    def prepare(self) -> None:
        self.prepare_host_side()

    def run(self) -> dict:
        facts = super().run()
        return {
            **facts,
            "final_delta": self.facts.final_delta,
            "volume_digest": self.facts.volume_digest,
        }

    def hold_again_after_join(self) -> None:
        """Nothing to do: the private maps above the multipath map hold IO until end_hold."""

    def after_switch(self) -> None:
        super().after_switch()
        self.logout_migrator()
        stop_tracking(self.journal)  # outside the hold: each holder gets its linear table back

    @contextlib.contextmanager
    def host_io_held(self):
        try:
            if self.facts.suspended_at is None:
                self._record(suspended_at=time.time())
            # As the offline hold's: every command to the destination's join within the switch timeout.
            with phase_deadline(self.timeout, f"the switch timeout of map {self.map_name}"):
                freeze_filesystems(
                    self.map_name, self.journal.frozen, self.journal.save, self.facts.mountpoints
                )
                self.journal.data["online"]["holding"] = True  # intent: whoever comes next resumes them
                self.journal.save()
                for tracking in _trackings(self.journal):
                    if not multipath.is_suspended(tracking.private_map):
                        _suspend(tracking.private_map)
                self.emit({"event": "io_held", "map": self.map_name})
                self._phase("held")
                yield
        finally:
            self.end_hold()

    def end_hold(self) -> None:
        with phase_deadline(END_HOLD_TIMEOUT, f"the end of the hold of map {self.map_name}"):
            resumed_at = time.time() if resume_private_maps(self.journal) else None
        if resumed_at:
            self._phase("private maps resumed")
        super().end_hold()
        if resumed_at and resumed_at > (self.facts.io_flowing_at or 0):
            self._record(io_flowing_at=resumed_at)
        self._phase("hold ended")

    def take_source_out(self) -> None:
        if not self.facts.source_removed and not self.facts.source_fencing:
            self.copy_final_delta()
            # --max-hold sized that copy (by estimate); the path change after it gets all of --switch-timeout
            # (under TCG a last delta of 8.7 s left a 10 s timeout nothing for the source's removal).
            extend_phase_deadline(self.timeout)
            # The migrator's session logs out after the hold (run); its disk has no LUN behind it meanwhile.
            self.give_destination_the_source_identity()
            self._phase("destination handed over")
        super().take_source_out()

    def copy_final_delta(self) -> None:
        """In the hold: what was written since the last drained checkpoint, copied, read back, in the
        manifest."""
        began = time.monotonic()
        state = self.journal.data["online"]
        manifest = load_manifest(self.journal.manifest_path, state_file=True)
        chunks = _delta_chunks(self.journal, state["base_era"], self.map_name, self.source_disk(), manifest)
        copy_delta(self.source_disk(), self.destination_disk(), chunks, manifest)
        write_json_atomically(self.journal.manifest_path, manifest.to_dict())
        final = {
            "chunks": len(chunks),
            "bytes": _delta_bytes(chunks, manifest),
            "seconds": round(time.monotonic() - began, 3),
        }
        self._record(final_delta=final, volume_digest=manifest.volume_digest)
        self._phase("final delta copied")


def summary(journal: MigrationJournal) -> dict | None:
    """What status and the report show of an online migration."""
    state = journal.data.get("online")
    if not state or state.get("mechanism") == PASS_THROUGH:
        return None
    return {
        key: state.get(key)
        for key in ("pass", "delta_bytes", "estimated_hold", "max_hold", "holders", "passes")
    }


# The pass-through's journal record (pass_through.py, whose steps import finish and plan, which use these)
def new_pass_through_state(max_hold: float) -> dict:
    """The journal's `online` record of a pass-through move."""
    if not 0 < max_hold <= 60:
        raise UsageError(f"--max-hold {max_hold:g} s must be above 0 and at most 60 s")
    return {"mechanism": PASS_THROUGH, "max_hold": max_hold, "pass1_done": False, "pass1_rate": None,
            "pass": 0, "passes": [], "intervals": []}


def pass_through_summary(journal) -> dict | None:
    """The pass-through's figures for the report and status."""
    state = journal.data.get("online")
    if not state or state.get("mechanism") != PASS_THROUGH:
        return None
    return {"mechanism": PASS_THROUGH, "passes": state["passes"], "intervals": state["intervals"],
            "max_hold": state["max_hold"]}
