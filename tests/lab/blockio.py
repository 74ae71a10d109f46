"""O_DIRECT reads and writes for lab tests: what the host does to a disk, bypassing its page cache."""

import mmap
import os
import subprocess


def write_direct(device: str, offset: int, data: bytes) -> None:
    buffer = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT needs
    buffer.write(data)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        if os.pwritev(fd, [buffer], offset) != len(data):
            raise OSError(f"short write to {device}")
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()


def read_direct(device: str, offset: int, length: int) -> bytes:
    buffer = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        if os.preadv(fd, [buffer], offset) != length:
            raise OSError(f"short read from {device}")
        return bytes(buffer)
    finally:
        os.close(fd)
        buffer.close()


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def same_bytes(device: str, path: str) -> bool:
    """The device read whole with O_DIRECT (past the page cache: udev's blkid may hold stale blocks) and a
    file, byte for byte (dd | cmp)."""
    reader = subprocess.Popen(["dd", f"if={device}", "iflag=direct", "bs=1M", "status=none"],
                              stdout=subprocess.PIPE)
    same = subprocess.run(["cmp", "-", path], stdin=reader.stdout).returncode == 0
    return reader.wait() == 0 and same
