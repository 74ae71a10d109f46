"""The backing store of a served volume: a file or a block device, written through.

Opened with O_DSYNC, as LIO's fileio with write_back=False: when a write
returns, its data is on the medium, so the handler acknowledges only durable
writes whatever the host believes about a write cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat

from blockmig.errors import DeviceError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


class Backing:
    """Positional IO on the backing; thread-safe (pread/pwrite), like the kernel's fileio."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_DSYNC | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(f"cannot open backing {path}: {exc.strerror}") from exc
        mode = os.fstat(self.fd).st_mode
        self.is_block_device = stat.S_ISBLK(mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        while views:
            done = os.preadv(self.fd, views, offset)
            if done <= 0:
                raise OSError(5, f"short read at byte {offset} of {self.path}")
            offset += done
            views = _advance(views, done)

    def write_from(self, offset: int, views: list[memoryview]) -> None:
        while views:
            done = os.pwritev(self.fd, views, offset)
            offset += done
            views = _advance(views, done)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, [memoryview(buf)])
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        self.write_from(offset, [memoryview(data)])

    def discard(self, offset: int, length: int) -> None:
        """Deallocate: a hole in a file, a discard/zero-out on a block device (reads return zeros)."""
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    def write_same(self, offset: int, length: int, block: bytes) -> None:
        """Repeat `block` over the range, a MiB at a time."""
        chunk = block * max(1, (1 << 20) // len(block))
        end = offset + length
        while offset < end:
            part = chunk[:end - offset]
            self.write(offset, part)
            offset += len(part)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    while views and done >= len(views[0]):
        done -= len(views[0])
        views = views[1:]
    if views and done:
        views = [views[0][done:]] + views[1:]
    return views
