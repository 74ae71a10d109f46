"""Read-ahead: chunks are read and digested by reader threads ahead of the consumer.

Memory is bounded by a fixed pool of `depth` aligned buffers, whatever the
volume's size: a new read is queued only when the consumer releases a buffer.
Chunks are handed over strictly in address order.

`readers` threads each take the next read in address order, read it with `os.preadv`
and digest it (both release the GIL), so the consumer (the copy's writer) only writes.
Several readers let reads and digests run at once. Measured on loop devices (two CPUs,
medians of 6 alternating rounds), three readers and six 4 MiB buffers against two and
four: 1.03x against 0.87x dd with both images on one disk, 1.08x against 0.99x with the
destination in /dev/shm; equal in the one-CPU lab VM (copy loop 586 against 574 MiB/s).
Two readers beat one reader, and the writer digesting after its write (0.73x dd against
0.69x and 0.62x). The threads share one lock and wake each other through two
conditions (plain threading: concurrent.futures costs ~40 ms of start-up in the lab VM).
"""

from __future__ import annotations

import os
import threading
from collections import deque

from blockmig import signals
from blockmig.datapath.blockdev import Volume, allocate_aligned_buffer
from blockmig.datapath.digest import digest_chunk
from blockmig.errors import DeviceError


class Chunk:
    __slots__ = ("index", "address", "data", "digest", "buffer")

    def __init__(self, index: int, address: int, data: memoryview, digest: str, buffer):
        self.index = index
        self.address = address  # total length read before this chunk: where it belongs on the destination
        self.data = data
        self.digest = digest
        self.buffer = buffer


READERS = 3
READ_AHEAD_BYTES = 24 * 1024 * 1024  # what the default depth's buffers hold at most
MAX_DEPTH = 6


def default_depth(chunk_size: int) -> int:
    """As many buffers as 24 MiB hold, 2 to 6: six of 4 MiB, three of 8 MiB (peak RSS stays under 64 MiB)."""
    return max(2, min(MAX_DEPTH, READ_AHEAD_BYTES // chunk_size))


class ReadAhead:
    """Iterate to get chunks in order; `release(chunk)` once its data has been used."""

    def __init__(self, volume: Volume, start: int, end: int, chunk_size: int, depth: int | None = None,
                 readers: int = READERS):
        depth = default_depth(chunk_size) if depth is None else depth
        if depth < 1 or readers < 1:
            raise ValueError("depth and readers must be at least 1")
        self._volume = volume
        self._start, self._end, self._chunk_size = start, end, chunk_size
        self._next_address = start  # of the next read to hand out
        self._free = [allocate_aligned_buffer(chunk_size) for _ in range(min(depth, self._chunk_count()))]
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # readers wait here for a read to do
        self._done = threading.Condition(lock)  # the consumer waits here for the next chunk
        self._jobs: deque[tuple[object, int, int]] = deque()
        self._results: dict[int, Chunk | BaseException] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._reader, name=f"blockmig-read-{n}", daemon=True)
                         for n in range(min(readers, len(self._free)))]
        with lock:
            self._queue_reads()
        for thread in self._threads:
            thread.start()

    def _chunk_count(self) -> int:
        return max(1, -(-(self._end - self._start) // self._chunk_size))

    def __iter__(self):
        address = self._start
        while address < self._end:
            with self._done:
                while address not in self._results:
                    self._done.wait()
                result = self._results.pop(address)
            if isinstance(result, BaseException):
                raise result
            address += result.data.nbytes
            yield result

    def release(self, chunk: Chunk) -> None:
        chunk.data.release()
        with self._work:
            self._free.append(chunk.buffer)
            if self._queue_reads():
                self._work.notify()

    def close(self) -> None:
        with self._work:
            self._closed = True
            self._work.notify_all()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _queue_reads(self) -> bool:
        """Turn free buffers into reads, in address order (call with the lock held)."""
        queued = False
        while self._free and self._next_address < self._end:
            length = min(self._chunk_size, self._end - self._next_address)
            self._jobs.append((self._free.pop(), self._next_address, length))
            self._next_address += length
            queued = True
        return queued

    def _reader(self) -> None:
        signals.only_the_main_thread_receives()  # its handler then runs before the copy's next check
        while True:
            with self._work:
                while not self._jobs and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                buffer, address, length = self._jobs.popleft()
            try:
                result: Chunk | BaseException = self._read(buffer, address, length)
            except BaseException as exc:  # handed to the consumer, in order
                result = exc
            with self._done:
                self._results[address] = result
                self._done.notify()

    def _read(self, buffer, address: int, length: int) -> Chunk:
        view = memoryview(buffer)[:length]
        done = 0
        while done < length:
            try:
                count = os.preadv(self._volume.fd, [view[done:] if done else view], address + done)
            except OSError as exc:
                raise DeviceError(f"read at byte {address + done} of {self._volume.info.path} failed: {exc.strerror}") from None
            if count == 0:
                raise DeviceError(f"{self._volume.info.path} ended at byte {address + done}, expected {self._end}")
            done += count
        return Chunk(address // self._chunk_size, address, view, digest_chunk(view), buffer)
