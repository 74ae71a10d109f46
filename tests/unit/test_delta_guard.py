"""The guard's delta mode: a pass writes only the next chunk of its declared ascending list."""

from __future__ import annotations

import pytest
from datapath_helpers import LoopDevices, read_volume
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmig.datapath.blockdev import allocate_aligned_buffer
from blockmig.datapath.guard import DeltaGuard
from blockmig.errors import DeviceError, GuardRefusedWrite

CHUNK = 4096
CHUNKS = 16
VOLUME = CHUNKS * CHUNK - 1024  # the last chunk is short, as at the end of an odd-sized volume

# A pass: which chunks the host changed (the declared list), then the writes attempted,
# as (chunk index, fill byte, whole chunk or not). Most attempts miss the next listed chunk.
passes = st.tuples(
    st.sets(st.integers(0, CHUNKS - 1), max_size=CHUNKS).map(sorted),
    st.lists(st.tuples(st.integers(0, CHUNKS - 1), st.integers(1, 255), st.booleans()), min_size=1, max_size=30),
)


def chunk_length(index: int) -> int:
    return min(CHUNK, VOLUME - index * CHUNK)


def replay_pass(path: str, listed: list[int], attempts, allow_regular_file: bool) -> None:
    """Every attempt against a model: a write lands only if it is the next listed chunk, whole."""
    model = bytearray(read_volume(path, VOLUME))
    buffer = allocate_aligned_buffer(CHUNK)
    addresses = [index * CHUNK for index in listed]
    with DeltaGuard.open(path, addresses, CHUNK, allow_regular_file=allow_regular_file) as guard:
        position = 0
        for index, fill, whole in attempts:
            address = index * CHUNK
            length = chunk_length(index) if whole else 512
            buffer[:length] = bytes([fill]) * length
            data = memoryview(buffer)[:length]
            expected = addresses[position] if position < len(addresses) else None
            if address != expected:
                with pytest.raises(GuardRefusedWrite) as refused:
                    guard.write(address, data)
                assert (refused.value.designated, refused.value.reserved) == (address, expected)
            elif not whole and length != chunk_length(index):
                with pytest.raises(DeviceError, match="the chunk there is"):
                    guard.write(address, data)
            else:
                ack = guard.write(address, data)
                model[address:address + length] = data
                position += 1
                assert (ack.address, ack.length) == (address, length)
                assert ack.reserved_address == (addresses[position] if position < len(addresses) else None)
            data.release()
            assert guard.position == position
            assert read_volume(path, VOLUME) == bytes(model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=passes)
def test_delta_guard_writes_only_the_next_listed_chunk_on_a_file(tmp_path, case):
    path = tmp_path / "volume"
    path.write_bytes(bytes(VOLUME))
    replay_pass(str(path), *case, allow_regular_file=True)


@pytest.fixture(scope="module")
def delta_loop(tmp_path_factory):
    devices = LoopDevices(tmp_path_factory.mktemp("delta"))
    try:
        yield devices.attach("delta", CHUNKS * CHUNK, seed=5)
    finally:
        devices.detach_all()


@settings(max_examples=25, deadline=None)
@given(case=passes)
def test_delta_guard_writes_only_the_next_listed_chunk_on_a_loop_device(delta_loop, case):
    global VOLUME
    saved, VOLUME = VOLUME, CHUNKS * CHUNK  # a loop device's size is whole sectors
    try:
        replay_pass(delta_loop, *case, allow_regular_file=False)
    finally:
        VOLUME = saved


def test_a_pass_resumes_at_its_journaled_position(tmp_path):
    path = tmp_path / "volume"
    path.write_bytes(bytes(VOLUME))
    with DeltaGuard.open(str(path), [0, 3 * CHUNK, 9 * CHUNK], CHUNK, position=1, allow_regular_file=True) as guard:
        with pytest.raises(GuardRefusedWrite, match="reserved write address is 12288"):
            guard.write(0, b"x" * CHUNK)
        guard.write(3 * CHUNK, b"y" * CHUNK)
        guard.write(9 * CHUNK, b"z" * CHUNK)
        with pytest.raises(GuardRefusedWrite, match="the pass is complete"):
            guard.write(10 * CHUNK, b"w" * CHUNK)
    data = path.read_bytes()
    assert data == bytes(3 * CHUNK) + b"y" * CHUNK + bytes(5 * CHUNK) + b"z" * CHUNK + bytes(VOLUME - 10 * CHUNK)


@pytest.mark.parametrize("addresses, problem", [
    ([CHUNK, 0], "must ascend"),
    ([CHUNK, CHUNK], "must ascend"),
    ([100], "not a chunk start"),
    ([CHUNKS * CHUNK], "not a chunk start"),
])
def test_a_bad_list_is_refused_before_anything_is_written(tmp_path, addresses, problem):
    path = tmp_path / "volume"
    path.write_bytes(bytes(VOLUME))
    with pytest.raises(DeviceError, match=problem):
        DeltaGuard.open(str(path), addresses, CHUNK, allow_regular_file=True)
    assert path.read_bytes() == bytes(VOLUME)
