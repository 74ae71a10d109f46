"""The backing store of a served volume: a file or a block device, written through.

Opened with O_DSYNC, as LIO's fileio with write_back=False: when a write
returns, its data is on the medium, so the handler acknowledges only durable
writes whatever the host believes about a write cache.

`in_memory`: the medium is memory (tmpfs, ramfs, a RAM disk), so no IO on it
waits for a device and the handler runs it in the ring's thread; on any other
medium a read the page cache holds does (RWF_NOWAIT), the rest goes to workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

from blockmig.errors import DeviceError

MEMORY_FILESYSTEMS = frozenset({0x01021994, 0x858458F6})  # statfs f_type: TMPFS_MAGIC, RAMFS_MAGIC
MEMORY_BLOCK_DEVICES = ("ram", "zram", "pmem")  # brd, zram, persistent memory
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


class Backing:
    """Positional IO on the backing; thread-safe (pread/pwrite), like the kernel's fileio."""

    def __init__(self, path: str, extra_flags: int = 0):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_DSYNC | os.O_CLOEXEC | extra_flags)
        except OSError as exc:
            raise DeviceError(f"cannot open backing {path}: {exc.strerror}") from exc
        mode = os.fstat(self.fd).st_mode
        self.is_block_device = stat.S_ISBLK(mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.in_memory = _in_memory(self.fd, mode)
        self._nowait = hasattr(os, "RWF_NOWAIT")

    def read_cached(self, offset: int, views: list[memoryview]) -> bool:
        """Read the range only if the page cache holds all of it (never waits for the medium)."""
        if not self._nowait:
            return False
        try:
            done = os.preadv(self.fd, views, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:  # an IO error is the workers' to answer, with a blocking read
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False  # this medium has no non-blocking reads: the workers read it
            return False
        return done == sum(len(v) for v in views)  # a part only: the workers read it whole

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
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

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


def _in_memory(fd: int, mode: int) -> bool:
    if stat.S_ISBLK(mode):
        rdev = os.fstat(fd).st_rdev
        name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))
        return name.startswith(MEMORY_BLOCK_DEVICES)
    return _statfs_type(fd) in MEMORY_FILESYSTEMS


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_Statfs))


def _statfs_type(fd: int) -> int | None:
    """fstatfs's f_type (os.statvfs has no filesystem type)."""
    buf = _Statfs()
    return buf.f_type if _libc.fstatfs(fd, ctypes.byref(buf)) == 0 else None


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    while views and done >= len(views[0]):
        done -= len(views[0])
        views = views[1:]
    if views and done:
        views = [views[0][done:]] + views[1:]
    return views
