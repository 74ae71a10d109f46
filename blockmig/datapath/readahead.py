"""Read-ahead: chunks are read and digested by worker threads ahead of the consumer.

Memory is bounded by a fixed pool of `depth` aligned buffers, whatever the
volume's size: a new read is submitted only when the consumer releases a buffer.
Chunks are handed over strictly in address order. Two workers let two reads and
two digests run at once (`os.preadv` and hashlib release the GIL), which matters
because reading and digesting one chunk takes longer than writing it.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from blockmig.datapath.blockdev import Volume, allocate_aligned_buffer
from blockmig.datapath.digest import digest_chunk
from blockmig.errors import DeviceError


@dataclass
class Chunk:
    index: int
    address: int  # total length read before this chunk: where it belongs on the destination
    data: memoryview
    digest: str
    buffer: object


class ReadAhead:
    """Iterate to get chunks in order; `release(chunk)` once its data has been used."""

    def __init__(self, volume: Volume, start: int, end: int, chunk_size: int, depth: int = 4, workers: int = 2):
        if depth < 1 or workers < 1:
            raise ValueError("depth and workers must be at least 1")
        self._volume = volume
        self._next_address, self._end, self._chunk_size = start, end, chunk_size
        self._free = [allocate_aligned_buffer(chunk_size) for _ in range(depth)]
        self._pending: deque[Future] = deque()
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockmig-read")
        self._submit_reads()

    def __iter__(self):
        while self._pending:
            yield self._pending.popleft().result()

    def release(self, chunk: Chunk) -> None:
        chunk.data.release()
        self._free.append(chunk.buffer)
        self._submit_reads()

    def close(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _submit_reads(self) -> None:
        while self._free and self._next_address < self._end:
            address = self._next_address
            length = min(self._chunk_size, self._end - address)
            self._pending.append(self._workers.submit(self._read_chunk, self._free.pop(), address, length))
            self._next_address += length

    def _read_chunk(self, buffer, address: int, length: int) -> Chunk:
        view = memoryview(buffer)[:length]
        done = 0
        while done < length:
            try:
                count = os.preadv(self._volume.fd, [view[done:]], address + done)
            except OSError as exc:
                raise DeviceError(f"read at byte {address + done} of {self._volume.info.path} failed: {exc.strerror}") from None
            if count == 0:
                raise DeviceError(f"{self._volume.info.path} ended at byte {address + done}, expected {self._end}")
            done += count
        return Chunk(address // self._chunk_size, address, view, digest_chunk(view), buffer)
