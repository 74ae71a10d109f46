"""The destination guard: the only holder of the destination's writable descriptor.

It keeps the reserved write address (the total length already written) and executes
a write only when the write's designated address equals it. Anything else is refused
before a byte reaches the device. The descriptor is opened with O_DSYNC, so when
`write` returns its acknowledgement the data is durable on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from blockmig.datapath.blockdev import Volume, VolumeInfo, open_destination
from blockmig.errors import DeviceError, GuardRefusedWrite


@dataclass(frozen=True)
class WriteAck:
    """Write-complete notification: `length` bytes at `address` are durable."""

    address: int
    length: int
    reserved_address: int  # the next address the guard will accept


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
        if address != self._reserved:
            raise GuardRefusedWrite(address, self._reserved)
        length = len(data)
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
        self._reserved += length
        return WriteAck(address, length, self._reserved)

    def close(self) -> None:
        self._volume.close()

    def __enter__(self) -> "DestinationGuard":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
