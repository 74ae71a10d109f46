"""The destination guard: only a write at the reserved address reaches the device."""

from __future__ import annotations

import os

import pytest
from datapath_helpers import LoopDevices, read_volume
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmig.datapath.blockdev import allocate_aligned_buffer
from blockmig.datapath.guard import DestinationGuard
from blockmig.errors import DeviceError, GuardRefusedWrite

BLOCK = 512
VOLUME = 64 * BLOCK

# Each attempt: (address in blocks, length in blocks, fill byte). Addresses cluster near
# the low end so that some attempts hit the reserved address and most do not.
attempts = st.lists(
    st.tuples(st.integers(0, 24), st.integers(1, 8), st.integers(1, 255)), min_size=1, max_size=30
)


def attempt_writes(path: str, sequence, allow_regular_file: bool) -> None:
    """Replay `sequence` through a guard and check the device after every attempt against a model."""
    model = bytearray(read_volume(path, VOLUME))
    buffer = allocate_aligned_buffer(8 * BLOCK)
    with DestinationGuard.open(path, allow_regular_file=allow_regular_file) as guard:
        reserved = 0
        for address_blocks, length_blocks, fill in sequence:
            address, length = address_blocks * BLOCK, length_blocks * BLOCK
            buffer[:length] = bytes([fill]) * length
            data = memoryview(buffer)[:length]
            if address != reserved:
                with pytest.raises(GuardRefusedWrite) as refused:
                    guard.write(address, data)
                assert (refused.value.designated, refused.value.reserved) == (address, reserved)
                assert f"at byte {address}: reserved write address is {reserved}" in str(refused.value)
            else:
                ack = guard.write(address, data)
                model[address:address + length] = data
                reserved += length
                assert (ack.address, ack.length, ack.reserved_address) == (address, length, reserved)
            data.release()
            assert guard.reserved_address == reserved
            assert read_volume(path, VOLUME) == bytes(model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=attempts)
def test_guard_executes_only_writes_at_the_reserved_address_on_a_file(tmp_path, sequence):
    path = tmp_path / "volume"
    path.write_bytes(bytes(VOLUME))
    attempt_writes(str(path), sequence, allow_regular_file=True)


@pytest.fixture(scope="module")
def guarded_loop(tmp_path_factory):
    devices = LoopDevices(tmp_path_factory.mktemp("guard"))
    try:
        yield devices.attach("guarded", VOLUME, seed=11)
    finally:
        devices.detach_all()


@settings(max_examples=25, deadline=None)
@given(sequence=attempts)
def test_guard_executes_only_writes_at_the_reserved_address_on_a_loop_device(guarded_loop, sequence):
    attempt_writes(guarded_loop, sequence, allow_regular_file=False)


def test_guard_resumes_at_a_journaled_reserved_address(tmp_path):
    path = tmp_path / "volume"
    path.write_bytes(bytes(VOLUME))
    with DestinationGuard.open(str(path), reserved_address=4 * BLOCK, allow_regular_file=True) as guard:
        with pytest.raises(GuardRefusedWrite):
            guard.write(0, b"x" * BLOCK)
        guard.write(4 * BLOCK, b"y" * BLOCK)
    assert path.read_bytes() == bytes(4 * BLOCK) + b"y" * BLOCK + bytes(VOLUME - 5 * BLOCK)


def test_guard_refuses_a_write_past_the_end(tmp_path):
    path = tmp_path / "volume"
    path.write_bytes(bytes(2 * BLOCK))
    with DestinationGuard.open(str(path), reserved_address=BLOCK, allow_regular_file=True) as guard:
        with pytest.raises(DeviceError, match="would pass the end"):
            guard.write(BLOCK, b"z" * 2 * BLOCK)
        assert guard.reserved_address == BLOCK
    assert path.read_bytes() == bytes(2 * BLOCK)


def test_guard_opens_the_destination_write_only_durable_and_exclusive(loops):
    device = loops.attach("dst", VOLUME)
    with DestinationGuard.open(device) as guard:
        fd = guard._volume.fd
        flags = int(open(f"/proc/self/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_WRONLY
        assert flags & os.O_DIRECT and flags & os.O_DSYNC
        with pytest.raises(OSError):  # the guard's O_EXCL claim keeps other exclusive openers out
            os.close(os.open(device, os.O_WRONLY | os.O_EXCL))
