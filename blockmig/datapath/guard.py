"""The destination guard: the only holder of the destination's writable descriptor.

It keeps the reserved write address (the total length already written) and executes
a write only when the write's designated address equals it. Anything else is refused
before a byte reaches the device. The descriptor is opened with O_DSYNC, so when
`write` returns its acknowledgement the data is durable on the device.

`DeltaGuard` is the same rule over a sparse pass (the chunks the host changed since
the previous pass, for an online migration): it is given the pass's ascending list
of chunk addresses, and its reserved address is the next one on the list.
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Sequence

from blockmig.datapath.blockdev import Volume, VolumeInfo, open_destination
from blockmig.errors import DeviceError, GuardRefusedWrite


class WriteAck(namedtuple("WriteAck", "address length reserved_address")):
    """Write-complete notification: `length` bytes at `address` are durable; `reserved_address`
    is the next address the guard will accept (a named tuple: see blockdev.VolumeInfo)."""

    __slots__ = ()


class DestinationGuard:
    """Open with `DestinationGuard.open(...)`; use as a context manager."""

    def __init__(self, volume: Volume, reserved_address: int = 0):
        if not 0 <= reserved_address <= volume.info.size:
            volume.close()
            raise DeviceError(
                f"reserved write address {reserved_address} is outside {volume.info.path} ({volume.info.size} bytes)"
            )
        self._volume = volume
        self._reserved = reserved_address

    @classmethod
    def open(cls, path: str, reserved_address: int = 0, allow_regular_file: bool = False) -> "DestinationGuard":
        return cls(open_destination(path, allow_regular_file), reserved_address)

    @property
    def reserved_address(self) -> int:
        return self._reserved

    @property
    def info(self) -> VolumeInfo:
        return self._volume.info

    def write(self, address: int, data) -> WriteAck:
        """Write `data` at `address` if and only if `address` is the reserved write address.

        On a block device `data` must be an aligned buffer (O_DIRECT), as the engine's are.
        """
        if address != self.reserved_address:
            raise GuardRefusedWrite(address, self.reserved_address)
        length = len(data)
        self._check_length(address, length)
        if address + length > self._volume.info.size:
            raise DeviceError(
                f"write of {length} bytes at {address} would pass the end of {self._volume.info.path} "
                f"({self._volume.info.size} bytes)"
            )
        if self._volume.fd < 0:
            raise DeviceError(f"destination {self._volume.info.path} is closed")
        try:
            written = os.pwritev(self._volume.fd, [data], address)
        except OSError as exc:
            raise DeviceError(f"write at byte {address} of {self._volume.info.path} failed: {exc.strerror}") from None
        if written != length:
            # Only part is durable; the reserved address stays so a retry rewrites the whole chunk.
            raise DeviceError(f"short write at byte {address} of {self._volume.info.path}: {written} of {length} bytes")
        self._advance(length)
        return WriteAck(address, length, self.reserved_address)

    def _check_length(self, address: int, length: int) -> None:
        """Any length goes for the sequential copy: the next reserved address follows from it."""

    def _advance(self, length: int) -> None:
        self._reserved += length

    def close(self) -> None:
        self._volume.close()

    def __enter__(self) -> "DestinationGuard":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class DeltaGuard(DestinationGuard):
    """The guard of a delta pass: writes only at the next address of a declared ascending chunk list.

    Each accepted write is exactly one chunk (shorter only at the volume's end),
    so nothing between two listed chunks can be written; once the list is
    done, every write is refused.
    """

    def __init__(self, volume: Volume, addresses: Sequence[int], chunk_size: int, position: int = 0):
        size = volume.info.size
        problem = _delta_list_problem(addresses, chunk_size, size)
        if problem or not 0 <= position <= len(addresses):
            volume.close()
            raise DeviceError(problem or f"delta position {position} is outside the pass of {len(addresses)} chunks")
        super().__init__(volume, 0)
        self._addresses = list(addresses)
        self._chunk_size = chunk_size
        self._position = position

    @classmethod
    def open(cls, path: str, addresses: Sequence[int], chunk_size: int, position: int = 0,
             allow_regular_file: bool = False) -> "DeltaGuard":
        return cls(open_destination(path, allow_regular_file), addresses, chunk_size, position)

    @property
    def reserved_address(self) -> int | None:
        """The next listed address; None once the pass is complete (then nothing is accepted)."""
        return self._addresses[self._position] if self._position < len(self._addresses) else None

    @property
    def position(self) -> int:
        """How many chunks of the pass are acknowledged (what a journal records to resume the pass)."""
        return self._position

    def _check_length(self, address: int, length: int) -> None:
        expected = min(self._chunk_size, self._volume.info.size - address)
        if length != expected:
            raise DeviceError(f"delta write at byte {address} is {length} bytes; the chunk there is {expected}")

    def _advance(self, length: int) -> None:
        self._position += 1


def _delta_list_problem(addresses: Sequence[int], chunk_size: int, size: int) -> str:
    if chunk_size <= 0:
        return f"delta chunk size {chunk_size} is not positive"
    previous = -1
    for address in addresses:
        if address <= previous:
            return f"delta addresses must ascend: {address} follows {previous}"
        if address % chunk_size or not 0 <= address < size:
            return f"delta address {address} is not a chunk start of the {size}-byte volume"
        previous = address
    return ""
