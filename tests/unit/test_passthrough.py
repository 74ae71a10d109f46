"""The pass-through's rule over files: the host's writes reach the source and the destination, and what
the copy may have read before a write is dirty, so that the copy and its delta passes leave the
destination equal to the source whatever the interleaving. The lab (test_passthrough.py there) serves
it to a host over iSCSI with the source reached through a session of its own."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmig.array.tcmu.guard import ArrayGuard
from blockmig.array.tcmu.passthrough import DIRTY, INTENT, ChunkMap, PassThrough
from blockmig.array.tcmu.storage import Backing

CHUNK = 4096
CHUNKS = 8
SIZE = CHUNK * CHUNKS


def make(tmp_path, name="v"):
    source, destination = tmp_path / f"{name}-source.img", tmp_path / f"{name}-destination.img"
    source.write_bytes(os.urandom(SIZE))
    destination.write_bytes(bytes(SIZE))
    guard = ArrayGuard(str(tmp_path / f"{name}.json"), name)
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
    assert passthrough.chunks.take_dirty() == [2, 3] and passthrough.chunks.dirty_count() == 0


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
        pending = [(c, passthrough.source.read(c * CHUNK, CHUNK)) for c in dirty]  # read all first
        host_writes(data.draw(st.integers(0, 3), label="host writes in the pass"))
        for chunk, content in pending:
            migrator_copy(passthrough, chunk, content)
    dirty = passthrough.chunks.take_dirty()  # the last pass: the host holds its writes to these chunks
    passthrough.guard.arm_delta([[c * CHUNK, CHUNK] for c in dirty])
    for chunk in dirty:
        migrator_copy(passthrough, chunk, passthrough.source.read(chunk * CHUNK, CHUNK))
    passthrough.commit()
    assert destination.read_bytes() == source.read_bytes()
    passthrough.close()
