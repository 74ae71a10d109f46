"""The copy engine: source -> read-ahead -> digest -> guard -> destination.

Chunks of a fixed length are read top to bottom; each chunk's write address is
the total length read before it, and its write is issued only after the previous
write's acknowledgement (one write outstanding, strictly in order). Reads run
ahead in a bounded pipeline. After acknowledged chunks (every chunk, or at most
once per `journal_interval`) the journal records the reserved address and the manifest so far, so `resume=True` after a crash
continues where the last acknowledgement left off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable  # not typing: ~20 ms less start-up in the lab VM

from blockmig import signals
from blockmig.datapath import readahead
from blockmig.datapath.blockdev import (
    Volume,
    check_copy_pair,
    open_destination,
    open_source,
    require_root_for_block_devices,
)
from blockmig.datapath.digest import Manifest
from blockmig.datapath.guard import DestinationGuard, WriteAck
from blockmig.datapath.journal import CopyJournal, default_journal_path
from blockmig.datapath.readahead import ReadAhead
from blockmig.errors import JournalError, UsageError
from blockmig.faults import checkpoint
from blockmig.sizes import MAX_CHUNK_SIZE

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
DEFAULT_QUEUE_DEPTH = None  # chunks read ahead: None is readahead.default_depth(chunk size), 6 of 4 MiB
# Each journal write costs a few ms (fsync of the file and of its directory), about
# as long as writing a 4 MiB chunk here; once a second keeps that cost under 1 %.
DEFAULT_JOURNAL_INTERVAL = 1.0

EventHandler = Callable[[dict], None]
AfterChunkHook = Callable[[DestinationGuard, WriteAck], None]


def copy_volume(
    source: str,
    destination: str,
    journal_path: str | None = None,
    *,
    chunk_size: int | None = None,
    resume: bool = False,
    allow_regular_files: bool = False,
    max_rate: float | None = None,
    journal_interval: float = DEFAULT_JOURNAL_INTERVAL,
    queue_depth: int | None = DEFAULT_QUEUE_DEPTH,
    on_event: EventHandler | None = None,
    after_chunk: AfterChunkHook | None = None,
    arm_destination: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Copy `source` onto the first bytes of `destination`; return the complete manifest.

    chunk_size: None means the journal's on resume, else DEFAULT_CHUNK_SIZE.
    resume: continue from the journal if there is one (start fresh if there is none);
        without it an existing journal is refused rather than silently overwritten.
    journal_interval: seconds between journal writes (0: after every acknowledged chunk);
        chunks acknowledged but not yet journaled are simply copied again on resume
        (the guard resumes at the journaled reserved address, so it accepts them).
    after_chunk: called with the guard and each acknowledgement (a hook for tests and
        the migrate orchestrator; it may try writes the guard must refuse).
    arm_destination: called with the address the copy starts (or resumes) from and how far past it the
        read-ahead may read, before its first read: a destination array that guards the copy itself
        (array/tcmu) reserves the address, and one that passes the host's IO through to the source marks
        what the host writes inside that window dirty.
    """
    emit = on_event or (lambda event: None)
    require_root_for_block_devices(source, destination)
    private_journal = journal_path is None  # blockmig's own directory; a journal the user names may be anywhere
    journal_path = journal_path or default_journal_path(source, destination)
    if chunk_size is not None and not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"chunk size {chunk_size} must be from 1 to {MAX_CHUNK_SIZE} bytes (sizes.MAX_CHUNK_SIZE)")
    source_volume = open_source(source, allow_regular_files)
    destination_volume: Volume | None = None
    try:
        destination_volume = open_destination(destination, allow_regular_files)
        journal = _open_journal(journal_path, source_volume, destination_volume, chunk_size, resume,
                                private_journal)
        check_copy_pair(source_volume.info, destination_volume.info, journal.manifest.chunk_size)
        journal.save()  # proves the journal is writable before the first byte is
        if arm_destination is not None and not journal.manifest.complete:
            chunk = journal.manifest.chunk_size
            depth = readahead.default_depth(chunk) if queue_depth is None else queue_depth
            arm_destination(journal.reserved_address, (depth + 1) * chunk)  # one chunk of margin
        guard = DestinationGuard(destination_volume, journal.reserved_address)
        destination_volume = None  # the guard owns it now
        with guard:
            _copy_chunks(source_volume, guard, journal, max_rate, journal_interval, queue_depth, emit, after_chunk)
    finally:
        source_volume.close()
        if destination_volume is not None:
            destination_volume.close()
    return journal.manifest


def _open_journal(path: str, source: Volume, destination: Volume, chunk_size: int | None, resume: bool,
                  private: bool) -> CopyJournal:
    if not os.path.lexists(path):
        manifest = Manifest(source.info.size, chunk_size or DEFAULT_CHUNK_SIZE)
        return CopyJournal(path, source.info, destination.info, manifest, private)
    journal = CopyJournal.load(path, private)
    journal.check_belongs_to(source.info, destination.info)
    journal.check_matches_source(source.info)
    if not resume:
        state = "complete" if journal.manifest.complete else f"at byte {journal.reserved_address} of {journal.manifest.size}"
        raise JournalError(f"journal {path} exists (copy {state}): pass --resume to continue, or delete it to start over")
    if chunk_size is not None and chunk_size != journal.manifest.chunk_size:
        raise UsageError(f"chunk size {chunk_size} differs from the journal's {journal.manifest.chunk_size}")
    return journal


def _copy_chunks(
    source: Volume,
    guard: DestinationGuard,
    journal: CopyJournal,
    max_rate: float | None,
    journal_interval: float,
    queue_depth: int | None,
    emit: EventHandler,
    after_chunk: AfterChunkHook | None,
) -> None:
    manifest = journal.manifest
    start = journal.reserved_address
    emit(
        {
            "event": "start",
            "source": source.info.path,
            "destination": guard.info.path,
            "size": manifest.size,
            "chunk_size": manifest.chunk_size,
            "resume_from": start,
            "journal": journal.path,
        }
    )
    began = last_journaled = time.monotonic()
    cpu_began = time.process_time()
    # A signal stops the copy only at a chunk boundary, with the guard's reserved address journaled.
    with ReadAhead(source, start, manifest.size, manifest.chunk_size, queue_depth) as chunks, \
            signals.deferred("the copy stops at its next chunk boundary", then_stop=False):
        for chunk in chunks:
            ack = guard.write(chunk.address, chunk.data)
            chunks.release(chunk)
            manifest.chunk_digests.append(chunk.digest)
            now = time.monotonic()
            if now - last_journaled >= journal_interval or manifest.complete:
                journal.save()
                last_journaled = now
            if after_chunk is not None:
                after_chunk(guard, ack)
            emit(
                {
                    "event": "chunk",
                    "index": chunk.index,
                    "address": ack.address,
                    "length": ack.length,
                    "reserved_address": ack.reserved_address,
                    "digest": chunk.digest,
                }
            )
            checkpoint("copy:chunk")
            if signals.stop_requested() and not manifest.complete:
                journal.save()
                signals.check(f"the copy stopped at byte {ack.reserved_address} of {manifest.size}, "
                              f"journaled in {journal.path}")
            if max_rate:
                _throttle(ack.reserved_address - start, max_rate, began)
    seconds = time.monotonic() - began
    emit(
        {
            "event": "done",
            "size": manifest.size,
            "bytes_copied": manifest.size - start,
            "seconds": round(seconds, 3),
            "cpu_seconds": round(time.process_time() - cpu_began, 3),  # user+sys of all threads, while copying
            "volume_digest": manifest.volume_digest,
        }
    )


def _throttle(bytes_done: int, max_rate: float, began: float) -> None:
    ahead = bytes_done / max_rate - (time.monotonic() - began)
    if ahead > 0:
        signals.pause(ahead)
