"""The pass-through's rule over files: the host's writes reach the source and the destination, and what
the copy may have read before a write is dirty, so that the copy and its delta passes leave the
destination equal to the source whatever the interleaving. The lab (test_passthrough.py there) serves
it to a host over iSCSI with the source reached through a session of its own."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmig.array.tcmu import passthrough as passthrough_module
from blockmig.array.tcmu.guard import ArrayGuard
from blockmig.array.tcmu.passthrough import CLEAN, DIRTY, INTENT, TAKEN, ChunkMap, PassThrough
from blockmig.array.tcmu.storage import Backing
from blockmig.errors import ArrayError

CHUNK = 4096
CHUNKS = 8
SIZE = CHUNK * CHUNKS


def make(tmp_path, name="v"):
    source, destination = tmp_path / f"{name}-source.img", tmp_path / f"{name}-destination.img"
    source.write_bytes(os.urandom(SIZE))
    destination.write_bytes(bytes(SIZE))
    guard = ArrayGuard(str(tmp_path / f"{name}.json"), name)
    guard.set_pass_through(True)  # as the handler serving a new pass-through volume does
    backing = Backing(str(destination))
    passthrough = PassThrough(str(source), backing, guard, str(tmp_path / f"{name}.chunks"), SIZE, CHUNK)
    return passthrough, source, destination


def host_write(passthrough: PassThrough, chunk: int, data: bytes, within: int = 0) -> None:
    passthrough.write_from(chunk * CHUNK + within, [memoryview(bytearray(data))])


def migrator_copy(passthrough: PassThrough, chunk: int, data: bytes) -> None:
    """The migrator's guarded write of a chunk it read (`data`) earlier."""
    guard, offset = passthrough.guard, chunk * CHUNK
    assert guard.admits(offset, CHUNK), (guard.state, offset)
    passthrough.destination.write(offset, data)
    guard.executed(offset, CHUNK)


def chunk_of(path, chunk: int) -> bytes:
    return path.read_bytes()[chunk * CHUNK:(chunk + 1) * CHUNK]


def chunk_digest(path, chunk: int) -> str:
    return hashlib.sha256(chunk_of(path, chunk)).hexdigest()


def dirty_by_host(passthrough: PassThrough, chunks) -> None:
    """Host writes where the copy may have read first: the chunks are DIRTY."""
    passthrough.guard.arm_sequential(0, window=SIZE)
    for chunk in chunks:
        host_write(passthrough, chunk, os.urandom(CHUNK))
    assert [c for c, v in enumerate(passthrough.chunks.bytes) if v == DIRTY] == sorted(chunks)


def test_a_write_where_the_copy_has_passed_reaches_both_and_is_clean(tmp_path):
    passthrough, source, destination = make(tmp_path)
    passthrough.guard.arm_sequential(2 * CHUNK, window=2 * CHUNK)
    data = os.urandom(CHUNK)
    host_write(passthrough, 0, data)
    assert source.read_bytes()[:CHUNK] == data == destination.read_bytes()[:CHUNK]
    assert passthrough.chunks.bytes[0] == INTENT


def test_a_write_inside_the_read_ahead_window_is_dirty_beyond_it_clean(tmp_path):
    passthrough, source, _ = make(tmp_path)
    passthrough.guard.arm_sequential(2 * CHUNK, window=2 * CHUNK)
    for chunk in (2, 3, 5):
        host_write(passthrough, chunk, os.urandom(512), within=1024)
    assert [c for c, v in enumerate(passthrough.chunks.bytes) if v == DIRTY] == [2, 3]
    assert passthrough.chunks.take_dirty() == [2, 3] and passthrough.chunks.dirty_count() == 2
    passthrough.chunks.copied([2, 3])
    assert passthrough.chunks.dirty_count() == 0


def test_in_a_delta_pass_a_chunk_not_yet_executed_is_dirty_again(tmp_path):
    passthrough, _, _ = make(tmp_path)
    passthrough.guard.arm_delta([[CHUNK, CHUNK], [4 * CHUNK, CHUNK]])
    migrator_copy(passthrough, 1, bytes(CHUNK))
    host_write(passthrough, 1, os.urandom(CHUNK))  # executed already: the destination followed
    host_write(passthrough, 4, os.urandom(CHUNK))  # still to come, maybe read already
    host_write(passthrough, 6, os.urandom(CHUNK))  # not in the pass
    assert passthrough.chunks.take_dirty() == [4]


def test_a_destination_that_fails_a_write_leaves_the_chunk_dirty_and_the_host_served(tmp_path):
    passthrough, source, _ = make(tmp_path)
    passthrough.destination.close()
    passthrough.destination.fd = os.open(os.devnull, os.O_RDONLY)  # writes fail with EBADF
    data = os.urandom(CHUNK)
    host_write(passthrough, 3, data)
    assert source.read_bytes()[3 * CHUNK:4 * CHUNK] == data
    assert passthrough.chunks.take_dirty() == [3]


def test_a_restarted_handler_counts_every_intent_as_dirty(tmp_path):
    path = str(tmp_path / "m.chunks")
    chunks = ChunkMap(path, SIZE, CHUNK)
    chunks.mark([1, 2], INTENT)
    chunks.mark([5], DIRTY)
    chunks.mark([5], INTENT)  # never lowered
    chunks.close()
    again = ChunkMap(path, SIZE, CHUNK)
    assert again.take_dirty() == [1, 2, 5]
    with pytest.raises(Exception, match="chunks, not the volume's"):
        ChunkMap(path, 2 * SIZE, CHUNK)


def test_take_dirty_returns_dirty_and_taken_chunks_and_leaves_them_taken(tmp_path):
    path = tmp_path / "m.chunks"
    chunks = ChunkMap(str(path), SIZE, CHUNK)
    chunks.mark([6, 1], DIRTY)
    chunks.mark([3], INTENT)
    assert chunks.dirty_count() == 2
    assert chunks.take_dirty() == [1, 6]
    assert list(chunks.bytes) == [CLEAN, TAKEN, CLEAN, INTENT, CLEAN, CLEAN, TAKEN, CLEAN]
    assert path.read_bytes() == bytes(chunks.bytes)  # on disk before take_dirty returns
    assert chunks.dirty_count() == 2  # taken, not said copied: the next take returns them
    chunks.mark([4], DIRTY)
    assert chunks.take_dirty() == [1, 4, 6] and chunks.dirty_count() == 3
    chunks.close()


def test_copied_lowers_taken_chunks_to_intent_and_leaves_dirty_ones_dirty(tmp_path):
    path = tmp_path / "m.chunks"
    chunks = ChunkMap(str(path), SIZE, CHUNK)
    chunks.mark([1, 2, 5], DIRTY)
    assert chunks.take_dirty() == [1, 2, 5]
    chunks.mark([2], DIRTY)  # a host write during the pass, where it may have read first
    chunks.mark([3], INTENT)
    chunks.copied([1, 2, 3, 4, 5, -1, CHUNKS, 10 * CHUNKS])  # clean, intent and out of range: unchanged
    assert list(chunks.bytes) == [CLEAN, INTENT, DIRTY, INTENT, CLEAN, INTENT, CLEAN, CLEAN]
    assert path.read_bytes() == bytes(chunks.bytes)
    assert chunks.dirty_count() == 1 and chunks.take_dirty() == [2]
    chunks.mark([1], INTENT)  # a host write to a copied chunk: INTENT is not lowered nor raised
    assert chunks.bytes[1] == INTENT
    chunks.close()


def test_redo_dirties_chunks_the_host_wrote_and_returns_those_it_never_wrote(tmp_path):
    """The verify's question: a chunk unlike the manifest that the host wrote where the copy had passed (it
    reached both and left no dirt) is copied again; one the host never wrote is a real difference."""
    passthrough, source, destination = make(tmp_path)
    passthrough.guard.arm_sequential(SIZE, window=0)  # the copy has passed every chunk
    host_write(passthrough, 2, os.urandom(CHUNK))
    chunks = passthrough.chunks
    chunks.mark([5], DIRTY)
    assert chunks.dirty_count() == 1  # the write to chunk 2 left no dirt: the destination followed it
    assert chunks.redo([2, 4, 5, 7, -1, CHUNKS]) == [4, 7]  # out of range: ignored
    assert list(chunks.bytes) == [CLEAN, CLEAN, DIRTY, CLEAN, CLEAN, DIRTY, CLEAN, CLEAN]
    assert (tmp_path / "v.chunks").read_bytes() == bytes(chunks.bytes)  # on disk before it answers
    assert chunks.take_dirty() == [2, 5]
    passthrough.close()


def test_a_restarted_handler_counts_taken_chunks_as_dirty(tmp_path):
    path = str(tmp_path / "m.chunks")
    chunks = ChunkMap(path, SIZE, CHUNK)
    chunks.mark([2, 4], DIRTY)
    chunks.mark([7], INTENT)
    assert chunks.take_dirty() == [2, 4]
    chunks.mark([2], DIRTY)
    chunks.close()
    again = ChunkMap(path, SIZE, CHUNK)
    assert list(again.bytes) == [CLEAN, CLEAN, DIRTY, CLEAN, DIRTY, CLEAN, CLEAN, DIRTY]
    assert again.dirty_count() == 3 and again.take_dirty() == [2, 4, 7]
    again.close()


def test_a_migrator_killed_before_copied_gets_the_chunks_again_from_the_next_take(tmp_path):
    passthrough, _, _ = make(tmp_path)
    dirty_by_host(passthrough, [1, 5])
    taken = passthrough.chunks.take_dirty()
    assert taken == [1, 5]
    passthrough.guard.arm_delta([[c * CHUNK, CHUNK] for c in taken])
    migrator_copy(passthrough, 1, passthrough.source.read(CHUNK, CHUNK))
    # killed here: chunk 5 never written, `copied` never said
    assert passthrough.chunks.dirty_count() == 2
    assert passthrough.chunks.take_dirty() == [1, 5]  # the resumed migrator's take
    passthrough.guard.arm_delta([[CHUNK, CHUNK], [5 * CHUNK, CHUNK]])
    for chunk in (1, 5):
        migrator_copy(passthrough, chunk, passthrough.source.read(chunk * CHUNK, CHUNK))
    passthrough.chunks.copied([1, 5])
    assert passthrough.chunks.take_dirty() == [] and passthrough.chunks.dirty_count() == 0
    passthrough.close()


def test_a_handler_restarted_between_take_and_copied_returns_the_taken_chunks(tmp_path):
    passthrough, _, _ = make(tmp_path)
    dirty_by_host(passthrough, [0, 3])
    assert passthrough.chunks.take_dirty() == [0, 3]
    passthrough.chunks.close()
    again = ChunkMap(str(tmp_path / "v.chunks"), SIZE, CHUNK)
    assert again.take_dirty() == [0, 3]
    again.close()
    passthrough.source.close()


def test_commit_pending_copies_exactly_the_dirty_chunks_and_saves_before_the_flip(tmp_path):
    passthrough, source, destination = make(tmp_path)
    dirty_by_host(passthrough, [1, 4])
    passthrough.chunks.mark([6], DIRTY)  # a destination write failed: the host's write is on the source only
    assert passthrough.chunks.take_dirty() == [1, 4, 6]
    passthrough.chunks.mark([2], DIRTY)
    passthrough.chunks.copied([4])  # the last pass said copied chunk 4 only: 1 and 6 stay taken
    passthrough.destination.write(0, bytes(SIZE))  # the destination differs from the source everywhere
    before = source.read_bytes()
    saved = []

    def save(record):
        saved.append((dict(record), passthrough.guard.state.pass_through, destination.read_bytes()))

    record = passthrough.commit_pending(save)
    assert record["chunks"] == [1, 2, 6]
    assert record["digests"] == {str(c): hashlib.sha256(before[c * CHUNK:(c + 1) * CHUNK]).hexdigest()
                                 for c in (1, 2, 6)}
    assert isinstance(record["held_seconds"], float) and record["held_seconds"] >= 0
    [(saved_record, pass_through_at_save, destination_at_save)] = saved
    assert saved_record == record and pass_through_at_save, "save must come before pass-through ends"
    assert not passthrough.guard.state.pass_through
    after = destination.read_bytes()
    assert after == destination_at_save  # copied before the save
    for c in range(CHUNKS):
        expected = before[c * CHUNK:(c + 1) * CHUNK] if c in (1, 2, 6) else bytes(CHUNK)
        assert after[c * CHUNK:(c + 1) * CHUNK] == expected, f"chunk {c}"
    assert source.read_bytes() == before
    assert passthrough.chunks.dirty_count() == 0 and passthrough.chunks.bytes[1] == INTENT
    assert not passthrough.guard.admits(0, CHUNK) and not passthrough.guard.admits(CHUNK, CHUNK)
    passthrough.close()


def test_after_the_commit_host_writes_reach_the_destination_only(tmp_path):
    passthrough, source, destination = make(tmp_path)
    dirty_by_host(passthrough, [2])
    passthrough.commit_pending()
    before = source.read_bytes()
    data, same = os.urandom(CHUNK), os.urandom(512)
    host_write(passthrough, 2, data)  # a committed chunk
    host_write(passthrough, 5, data, within=0)
    passthrough.write(3 * CHUNK, data)
    passthrough.write_same(6 * CHUNK, CHUNK, same)
    passthrough.discard(7 * CHUNK, CHUNK)
    assert source.read_bytes() == before
    assert chunk_of(destination, 2) == chunk_of(destination, 3) == chunk_of(destination, 5) == data
    assert chunk_of(destination, 6) == same * (CHUNK // 512)
    assert chunk_of(destination, 7) == bytes(CHUNK)
    assert passthrough.chunks.dirty_count() == 0  # nothing marked for a copy that is over
    passthrough.close()


def test_during_the_commit_only_writes_to_the_piece_being_copied_wait(tmp_path, monkeypatch):
    """Chunks 2 and 4 are the last dirty ones, copied in halves: while the commit copies 2's first half, a
    write there waits; writes to 2's second half, to 4 (next in the commit's list) and to 5 (not in it)
    reach both arrays at once; the held write goes on as soon as its half is copied."""
    monkeypatch.setattr(passthrough_module, "COMMIT_PIECE", CHUNK // 2)
    passthrough, source, destination = make(tmp_path)
    dirty_by_host(passthrough, [2, 4])
    committed_content = chunk_of(source, 2)
    copying, go_on = threading.Event(), threading.Event()
    read = passthrough.source.read

    def slow_read(offset, length):
        if offset == 2 * CHUNK:
            copying.set()
            assert go_on.wait(30), "the test never let the commit go on"
        return read(offset, length)

    passthrough.source.read = slow_read
    results, errors = [], []

    def run(target, *args):
        try:
            results.append(target(*args))
        except BaseException as exc:  # seen by the test thread
            errors.append(exc)

    committer = threading.Thread(target=run, args=(passthrough.commit_pending,))
    held_data, next_data, other_data = os.urandom(CHUNK // 2), os.urandom(CHUNK), os.urandom(CHUNK)
    half = os.urandom(CHUNK // 2)
    held_writer = threading.Thread(target=run, args=(host_write, passthrough, 2, held_data))
    try:
        committer.start()
        assert copying.wait(10), "commit_pending never read the dirty chunk"
        held_writer.start()
        held_writer.join(0.5)
        assert held_writer.is_alive(), "a write to the chunk being copied completed meanwhile"
        assert chunk_of(source, 2) == committed_content
        for chunk, data, within in ((2, half, CHUNK // 2), (4, next_data, 0), (5, other_data, 0)):
            writer = threading.Thread(target=run, args=(host_write, passthrough, chunk, data, within))
            writer.start()
            writer.join(10)
            assert not writer.is_alive(), f"a write to chunk {chunk} at {within}, not being copied, waited"
            at, end = chunk * CHUNK + within, chunk * CHUNK + within + len(data)
            assert source.read_bytes()[at:end] == data == destination.read_bytes()[at:end]
        assert passthrough.chunks.bytes[5] != DIRTY and passthrough.guard.state.pass_through
        assert held_writer.is_alive() and committer.is_alive()
    finally:
        go_on.set()
        for thread in (committer, held_writer):
            if thread.ident is not None:
                thread.join(10)
    assert not errors, errors
    assert not committer.is_alive() and not held_writer.is_alive()
    record = next(r for r in results if isinstance(r, dict))
    assert record["chunks"] == [2, 4]
    copied_2 = committed_content[:CHUNK // 2] + half  # its first half before the write, the second after
    assert record["digests"]["2"] == hashlib.sha256(copied_2).hexdigest()
    assert record["digests"]["4"] == hashlib.sha256(next_data).hexdigest()  # copied after its write
    assert 0 <= record["held_seconds"] <= record["seconds"]
    assert not passthrough.guard.state.pass_through
    assert chunk_of(destination, 2) == held_data + half
    assert chunk_of(source, 2) in (copied_2, held_data + half)  # went on before the flip, or after it
    assert chunk_of(source, 4) == next_data == chunk_of(destination, 4)
    assert chunk_of(source, 5) == other_data == chunk_of(destination, 5)
    passthrough.close()


@pytest.mark.parametrize("failed_chunk, committed", [(3, True), (5, False)],
                         ids=["copied-later", "not-copied"])
def test_a_host_write_the_destination_failed_during_the_commit(tmp_path, failed_chunk, committed):
    """While the commit copies chunk 1 (of 1 and 3), a host write's destination half fails: to chunk 3 the
    commit's own copy mends it; to chunk 5 the source alone has it, so the commit must not end the
    pass-through (the next one copies it)."""
    passthrough, source, destination = make(tmp_path)
    dirty_by_host(passthrough, [1, 3])
    read = passthrough.source.read
    write = passthrough.destination.write_from
    written = os.urandom(CHUNK)

    def failing_write_from(offset, views):
        raise OSError(5, "Input/output error")

    def read_then_fail_a_host_write(offset, length):
        if offset == CHUNK:
            passthrough.destination.write_from = failing_write_from
            host_write(passthrough, failed_chunk, written)
            passthrough.destination.write_from = write
        return read(offset, length)

    passthrough.source.read = read_then_fail_a_host_write
    if committed:
        record = passthrough.commit_pending()
        assert record["chunks"] == [1, 3] and not passthrough.guard.state.pass_through
        assert chunk_of(destination, 3) == written == chunk_of(source, 3)
    else:
        with pytest.raises(ArrayError, match=r"failed host writes to chunks \[5\]"):
            passthrough.commit_pending()
        assert passthrough.guard.state.pass_through and passthrough.chunks.bytes[5] == DIRTY
        assert chunk_of(source, 5) == written != chunk_of(destination, 5)
    passthrough.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_the_copy_and_its_delta_passes_leave_the_destination_equal_to_the_source(tmp_path_factory, data):
    """Any interleaving of the migrator's read-ahead, its guarded writes and host writes anywhere."""
    tmp_path = tmp_path_factory.mktemp("pt")
    passthrough, source, destination = make(tmp_path)
    depth = data.draw(st.integers(1, 3), label="read-ahead depth")
    passthrough.guard.arm_sequential(0, window=depth * CHUNK)
    read_ahead: list[tuple[int, bytes]] = []
    next_read = next_write = 0

    written = [0]

    def host_writes(count):
        for _ in range(count):
            chunk = data.draw(st.integers(0, CHUNKS - 1), label="host chunk")
            within = data.draw(st.sampled_from([0, 512, CHUNK - 512]), label="offset in chunk")
            written[0] += 1
            host_write(passthrough, chunk, written[0].to_bytes(4, "big") * 128, within)

    while next_write < CHUNKS:  # pass 1: reads at most `depth` chunks ahead of the reserved address
        can_read = next_read < CHUNKS and next_read < next_write + depth
        if can_read and (not read_ahead or data.draw(st.booleans(), label="read")):
            read_ahead.append((next_read, passthrough.source.read(next_read * CHUNK, CHUNK)))
            next_read += 1
        elif read_ahead:
            chunk, content = read_ahead.pop(0)
            migrator_copy(passthrough, chunk, content)
            next_write += 1
        host_writes(data.draw(st.integers(0, 2), label="host writes"))
    for _ in range(data.draw(st.integers(0, 3), label="delta passes with the host writing")):
        dirty = passthrough.chunks.take_dirty()
        passthrough.guard.arm_delta([[c * CHUNK, CHUNK] for c in dirty])
        for chunk in dirty:  # as copy_delta: an extent is read only once the one before is written
            content = passthrough.source.read(chunk * CHUNK, CHUNK)
            host_writes(data.draw(st.integers(0, 2), label="host writes between a delta read and its write"))
            migrator_copy(passthrough, chunk, content)
        if data.draw(st.booleans(), label="the migrator lives to say copied"):
            passthrough.chunks.copied(dirty)
    record = passthrough.commit_pending()  # the last pass: the array copies the dirty chunks itself
    assert destination.read_bytes() == source.read_bytes()
    assert passthrough.chunks.dirty_count() == 0 and not passthrough.guard.state.pass_through
    assert record["digests"] == {str(c): chunk_digest(source, c) for c in record["chunks"]}
    passthrough.close()
