"""The host's view passed through to the source until the copy converges (the array side of online moves).

While the destination is filled, the host's IO reaches the source through the
handler, over a session of the array's own to the source array (a block device
here, opened O_DIRECT: the host may still write the source by its own path too,
so no cache of it may be trusted). Reads come from the source, which stays
complete and current. Writes go to the source first, then:
to the destination too, and where the copy may have read the chunk before
this write and not yet written it (from the reserved address to the end of
the `window` the migrator declares when it arms: its read-ahead; in a delta
pass the extent being copied, as a delta pass reads an extent only once the
one before is written) the chunks are marked dirty: the next delta
pass copies them again. Elsewhere the destination is current (the copy has
passed) or will be (the copy reads the chunk from the source later). A pass
must be armed before the migrator reads its first chunk.

The chunk map (one byte per chunk, in the state directory) is written
O_DSYNC before the write it records is acknowledged: INTENT before the
source is written (a handler killed between the source's write and the
destination's leaves the chunk possibly different on the two), DIRTY before
the completion. A delta pass takes the dirty chunks (TAKEN) and says when it
has copied them (`copied`: TAKEN -> INTENT); a migrator killed in between
gets them again from the next take. A restarted handler counts every INTENT
and TAKEN chunk as DIRTY. Overlapping host writes are serialised per chunk
(striped locks), so the source and the destination see them in the same
order.

The commit copies the last dirty chunks here, a piece at a time, holding
only the host writes that touch the piece being copied, then makes the
destination the volume: from then on the host's writes go to the
destination alone.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time

from blockmig.array.tcmu.storage import Backing
from blockmig.datapath.digest import digest_chunk
from blockmig.errors import ArrayError, DeviceError, UsageError

CLEAN, INTENT, TAKEN, DIRTY = 0, 1, 2, 3
LOCK_STRIPES = 64
# The commit copies a chunk in pieces this long, holding host writes to the piece being copied only: a
# write waits one piece's copy at most (about 30 ms at the lab's slowest, an emulated CPU's 8 MB/s).
COMMIT_PIECE = 256 * 1024


class ChunkMap:
    """One byte per chunk, persisted with O_DSYNC writes of the bytes that change."""

    def __init__(self, path: str, size: int, chunk_size: int):
        self.path, self.chunk_size = path, chunk_size
        self.count = -(-size // chunk_size)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DSYNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        existing = os.fstat(fd).st_size
        if existing not in (0, self.count):
            os.close(fd)
            raise ArrayError(f"chunk map {path} has {existing} chunks, not the volume's {self.count}")
        if existing == 0:
            os.ftruncate(fd, self.count)
        self.fd = fd
        self.bytes = bytearray(os.pread(fd, self.count, 0))
        self._lock = threading.Lock()
        restarted = [i for i, v in enumerate(self.bytes) if v in (INTENT, TAKEN)]
        self.mark(restarted, DIRTY)  # killed between a source's write and a destination's: copy again

    def chunks_of(self, offset: int, length: int) -> range:
        return range(offset // self.chunk_size, -(-(offset + length) // self.chunk_size))

    def mark(self, chunks, value: int) -> None:
        """Raise the chunks to `value` (never lower them), on disk before returning."""
        with self._lock:
            self._set([c for c in chunks if self.bytes[c] < value], value)

    def take_dirty(self) -> list[int]:
        """The dirty chunks and those taken by a pass not said copied, ascending, now TAKEN (a delta pass
        copies them; a write meanwhile dirties them again)."""
        with self._lock:
            dirty = [i for i, v in enumerate(self.bytes) if v in (TAKEN, DIRTY)]
            self._set([i for i in dirty if self.bytes[i] == DIRTY], TAKEN)
            return dirty

    def take(self, chunks) -> None:
        """Dirty ones among these chunks are TAKEN again: the caller copies them next, their writes held."""
        with self._lock:
            self._set([c for c in chunks if self.bytes[c] == DIRTY], TAKEN)

    def redo(self, chunks) -> list[int]:
        """Chunks the migrator found unlike its manifest: those the host has written (not CLEAN: a write
        where the copy had passed reaches both and leaves no dirt) are dirty again, for a delta pass or the
        commit to copy; the CLEAN ones, never written by the host, are returned (a real difference)."""
        with self._lock:
            chunks = [c for c in chunks if 0 <= c < self.count]
            self._set([c for c in chunks if self.bytes[c] == INTENT], DIRTY)
            return [c for c in chunks if self.bytes[c] == CLEAN]

    def copied(self, chunks) -> None:
        """A pass copied these chunks: those still TAKEN are current on the destination (not dirty ones)."""
        with self._lock:
            self._set([c for c in chunks if 0 <= c < self.count and self.bytes[c] == TAKEN], INTENT)

    def _set(self, chunks: list[int], value: int) -> None:
        """In memory and on disk, a pwrite per run of consecutive chunks; the caller holds the lock."""
        for run_start, run_end in _runs(chunks):
            self.bytes[run_start:run_end] = bytes([value]) * (run_end - run_start)
            os.pwrite(self.fd, self.bytes[run_start:run_end], run_start)

    def dirty_count(self) -> int:
        """What the next take returns."""
        return self.bytes.count(DIRTY) + self.bytes.count(TAKEN)

    def close(self) -> None:
        os.close(self.fd)


def _runs(indices: list[int]):
    """Ascending indices as (start, end) runs of consecutive ones."""
    start = prev = None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            yield start, prev + 1
            start = prev = i
    if start is not None:
        yield start, prev + 1


class SourceDevice(Backing):
    """The source volume as the array host reaches it: O_DIRECT, written through (O_DSYNC)."""

    def __init__(self, path: str):
        try:
            super().__init__(path, extra_flags=os.O_DIRECT)
        except DeviceError as exc:
            raise UsageError(f"pass-through: {exc}") from exc
        self.in_memory, self._nowait = False, False  # across the network: never read in the ring's thread
        self._bounce = threading.local()

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        self._direct(super().read_into, offset, views, into_views=True)

    def write_from(self, offset: int, views: list[memoryview]) -> None:
        self._direct(super().write_from, offset, views, into_views=False)

    def _direct(self, io, offset: int, views: list[memoryview], into_views: bool) -> None:
        """`io` on the views, or view by view through an aligned buffer where the ring's pages are
        refused for direct IO."""
        try:
            io(offset, views)
        except OSError as exc:
            if exc.errno not in (errno.EFAULT, errno.EINVAL):
                raise
            for view in views:
                bounce = self._buffer(len(view))
                if not into_views:
                    bounce[:] = view
                io(offset, [bounce])
                if into_views:
                    view[:] = bounce
                offset += len(view)

    def _buffer(self, length: int) -> memoryview:
        held = getattr(self._bounce, "map", None)
        if held is None or len(held) < length:
            held = self._bounce.map = mmap.mmap(-1, max(length, 1 << 20))
        return memoryview(held)[:length]


class PassThrough:
    """The host view's IO while the source is authoritative (see the module docstring)."""

    def __init__(self, source_path: str, destination: Backing, guard, map_path: str, size: int,
                 chunk_size: int):
        if chunk_size <= 0 or chunk_size % 4096:
            raise UsageError(f"chunk size {chunk_size} must be a positive multiple of 4096")
        self.source = SourceDevice(source_path)
        if self.source.size < size:
            raise UsageError(f"the source {source_path} holds {self.source.size} bytes, less than the "
                             f"volume's {size}")
        self.destination, self.guard, self.size = destination, guard, size
        self.chunks = ChunkMap(map_path, size, chunk_size)
        self._stripes = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._held = (0, 0)  # the bytes [start, end) the commit is copying: host writes touching them wait
        self._parked: list = []  # resubmit() of host writes that wait for the held bytes' copy
        self._released = threading.Condition()

    # --- the Backing interface the handler executes commands on --------------------------------
    in_memory = False

    def read_cached(self, offset: int, views: list[memoryview]) -> bool:
        return False  # the source is across the network: a worker reads it

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        self.source.read_into(offset, views)

    def read(self, offset: int, length: int) -> bytes:
        return self.source.read(offset, length)

    def write_from(self, offset: int, views: list[memoryview]) -> None:
        self.modify(offset, sum(len(v) for v in views), lambda target, at: target.write_from(at, views))

    def write(self, offset: int, data: bytes) -> None:
        self.write_from(offset, [memoryview(data)])

    def discard(self, offset: int, length: int) -> None:
        self.modify(offset, length, lambda target, at: target.discard(at, length))

    def write_same(self, offset: int, length: int, block: bytes) -> None:
        self.modify(offset, length, lambda target, at: target.write_same(at, length, block))

    def commit_pending(self, save=lambda record: None) -> dict:
        """The last dirty chunks copied source -> destination in pieces (COMMIT_PIECE), each read back, the
        host's writes to the piece being copied held meanwhile (elsewhere they reach both, as before): a
        host write waits one piece's copy at most, wherever it lands. Then `save(record)`, and the
        destination is the volume. The record: the chunks, their digests (as read back), the longest one
        piece's writes were held, and how long the commit took."""
        size = self.chunks.chunk_size
        with self._locked(range(LOCK_STRIPES)):  # no write half way while the last list is taken
            # no pass in flight (a write elsewhere keeps the destination current), no migrator write admitted
            self.guard.arm_delta([])
            final = self.chunks.take_dirty()
        began = time.monotonic()
        digests, longest = {}, 0.0
        try:
            for chunk in final:
                with self._locked(range(chunk, chunk + 1)):
                    self.chunks.take([chunk])  # a destination that failed a write to it: this copy mends it
                copied = bytearray()
                end = min((chunk + 1) * size, self.size)
                for start in range(chunk * size, end, COMMIT_PIECE):
                    length = min(COMMIT_PIECE, end - start)
                    with self._locked(range(chunk, chunk + 1)):  # no write to the piece half way
                        with self._released:
                            self._held = (start, start + length)
                    held_at = time.monotonic()
                    data = self.source.read(start, length)
                    self.destination.write(start, data)
                    back = self.destination.read(start, length)
                    if back != data:
                        raise ArrayError(f"chunk {chunk} read back from the destination differs from the "
                                         "source")
                    copied += back
                    self._release_held()  # its waiting writes now reach both, like any other chunk's
                    longest = max(longest, time.monotonic() - held_at)
                digests[chunk] = digest_chunk(bytes(copied))  # as the commit copied it, piece by piece
            self.destination.flush()
            with self._locked(range(LOCK_STRIPES)):
                missed = [c for c, state in enumerate(self.chunks.bytes) if state == DIRTY]
                if missed:  # the destination failed a host write meanwhile: the source alone has it
                    raise ArrayError(f"the destination failed host writes to chunks {missed[:8]} during the "
                                     "commit; the pass-through goes on, and the next commit copies them")
                record = {"chunks": final, "digests": {str(c): d for c, d in digests.items()},
                          "held_seconds": round(longest, 6), "seconds": round(time.monotonic() - began, 6)}
                save(record)  # before the flip: a committed volume always has its record
                self.chunks.copied(final)  # before it too: a restart then finds nothing dirty, or INTENT
                self.guard.set_pass_through(False)
        finally:
            self._release_held()
        return record

    def _release_held(self) -> None:
        with self._released:
            self._held, parked, self._parked = (0, 0), self._parked, []
            self._released.notify_all()
        for resubmit in parked:
            resubmit()

    def park(self, offset: int, length: int, resubmit) -> bool:
        """A host write touching the bytes the commit holds: `resubmit()` once they are copied (True), else
        False."""
        with self._released:
            if not self._touches_held(offset, length):
                return False
            self._parked.append(resubmit)
            return True

    def modify(self, offset: int, length: int, apply) -> None:
        """Run `apply(backing, offset)` on the source, then on the destination; mark what the copy must
        take again. Writing the destination is always safe: a chunk the copy may still overwrite with
        what it read before is dirty, and one it has not read yet it will read from the source."""
        chunks = self.chunks.chunks_of(offset, length)
        with self._unheld(chunks, offset, length):
            if not self.guard.state.pass_through:  # waited for the commit: the destination is the volume
                apply(self.destination, offset)
                return
            self.chunks.mark(chunks, INTENT)
            apply(self.source, offset)  # an error here is the host's: the source is authoritative
            dirty = self._dirty(chunks)
            if dirty:
                self.chunks.mark(dirty, DIRTY)
            try:
                apply(self.destination, offset)
            except OSError:  # the source has it: the destination's copy of these chunks is redone
                self.chunks.mark(chunks, DIRTY)

    def flush(self) -> None:
        self.source.flush()
        with contextlib.suppress(OSError):  # written through (O_DSYNC) already; the source is what counts
            self.destination.flush()

    def _dirty(self, chunks: range) -> list[int]:
        """The touched chunks the copy may have read before this write and not yet written."""
        size = self.chunks.chunk_size
        with self.guard.locked() as state:
            if state.mode == "sequential":
                window_end = state.reserved + state.window
                return [c for c in chunks if (c + 1) * size > state.reserved and c * size < window_end]
            if state.mode == "delta":  # the extent being copied: a delta pass reads the next one only
                if state.chunk_index >= len(state.chunks):  # after it has written this one
                    return []
                offset, length = state.chunks[state.chunk_index]
                return [c for c in chunks if c * size < offset + length and (c + 1) * size > offset]
            return []  # no pass in flight: the destination, written above, is current here

    @contextlib.contextmanager
    def _unheld(self, chunks: range, offset: int, length: int):
        """The chunks' stripes, once the commit holds none of the bytes [offset, offset + length)."""
        while True:
            with self._locked(chunks):
                if not self._touches_held(offset, length):
                    yield
                    return
            with self._released:
                self._released.wait_for(lambda: not self._touches_held(offset, length))

    def _touches_held(self, offset: int, length: int) -> bool:
        start, end = self._held
        return offset < end and offset + length > start

    @contextlib.contextmanager
    def _locked(self, chunks: range):
        stripes = sorted({c % LOCK_STRIPES for c in chunks})
        for s in stripes:
            self._stripes[s].acquire()
        try:
            yield
        finally:
            for s in reversed(stripes):
                self._stripes[s].release()

    def close(self) -> None:
        self.chunks.close()
        self.source.close()
