"""Read-ahead: a reader thread that reads and digests chunks ahead of the writer.

Memory is bounded by a fixed pool of `depth` aligned buffers, whatever the
volume's size: the reader blocks until the consumer releases a buffer.
`os.preadv` and hashlib release the GIL, so reading and digesting overlap with
the consumer's writes.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

from blockmig.datapath.blockdev import Volume, allocate_aligned_buffer
from blockmig.datapath.digest import digest_chunk
from blockmig.errors import DeviceError

_END = object()


@dataclass
class Chunk:
    index: int
    address: int  # total length read before this chunk: where it belongs on the destination
    data: memoryview
    digest: str
    buffer: object


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class ReadAhead:
    """Iterate to get chunks in order; `release(chunk)` once its data has been used."""

    def __init__(self, volume: Volume, start: int, end: int, chunk_size: int, depth: int = 4):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._volume = volume
        self._start, self._end, self._chunk_size = start, end, chunk_size
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put(allocate_aligned_buffer(chunk_size))
        self._ready: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="blockmig-readahead", daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            item = self._ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def release(self, chunk: Chunk) -> None:
        chunk.data.release()
        self._free.put(chunk.buffer)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _read_all(self) -> None:
        try:
            address = self._start
            while address < self._end and not self._stopping.is_set():
                buffer = self._take_free_buffer()
                if buffer is None:
                    break
                length = min(self._chunk_size, self._end - address)
                view = memoryview(buffer)[:length]
                self._read_exactly(view, address)
                self._ready.put(Chunk(address // self._chunk_size, address, view, digest_chunk(view), buffer))
                address += length
            self._ready.put(_END)
        except BaseException as exc:  # handed to the consumer's thread, which raises it
            self._ready.put(_Failed(exc))

    def _take_free_buffer(self):
        while not self._stopping.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _read_exactly(self, view: memoryview, address: int) -> None:
        done = 0
        while done < len(view):
            try:
                count = os.preadv(self._volume.fd, [view[done:]], address + done)
            except OSError as exc:
                raise DeviceError(f"read at byte {address + done} of {self._volume.info.path} failed: {exc.strerror}") from None
            if count == 0:
                raise DeviceError(f"{self._volume.info.path} ended at byte {address + done}, expected {self._end}")
            done += count
