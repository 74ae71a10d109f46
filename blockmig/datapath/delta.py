"""Delta passes: chunks the host wrote after they were copied, copied again through the delta guard
(guard.DeltaGuard), and the chunks of a volume that no longer match the manifest."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from blockmig.datapath.blockdev import allocate_aligned_buffer, open_source
from blockmig.datapath.digest import Manifest, digest_chunk
from blockmig.datapath.guard import DeltaGuard
from blockmig.errors import DeviceError


def copy_delta(
    source: str, destination: str, chunks: list[int], manifest: Manifest, max_rate: float | None = None,
    arm: Callable[[list[tuple[int, int]]], None] | None = None,
) -> float:
    """Copy these ascending chunks (source O_DIRECT, digest, guarded write); the manifest gets each chunk's
    new digest. Not read back: where the host writes the destination too, a chunk may change after its copy.

    `arm`: tells a destination that guards the copy itself which extents the pass writes, before it does.
    Returns the seconds taken.
    """
    began = time.monotonic()
    if not chunks:
        return 0.0
    chunk_size = manifest.chunk_size
    if arm is not None:
        arm([(start, end - start) for start, end in map(manifest.chunk_range, chunks)])
    buffer = allocate_aligned_buffer(chunk_size)
    reader = open_source(source)
    try:
        with DeltaGuard.open(destination, [index * chunk_size for index in chunks], chunk_size) as guard:
            for done, index in enumerate(chunks, 1):
                start, end = manifest.chunk_range(index)
                with memoryview(buffer)[: end - start] as view:
                    _read_exactly(reader.fd, view, start, source)
                    manifest.chunk_digests[index] = digest_chunk(view)
                    guard.write(start, view)
                if max_rate:
                    ahead = done * chunk_size / max_rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
    finally:
        reader.close()
        buffer.close()
    return time.monotonic() - began


def changed_chunks(path: str, chunks: list[int], manifest: Manifest) -> set[int]:
    """Those of these chunks of `path` (read with O_DIRECT) that no longer match the manifest."""
    if not chunks:
        return set()
    buffer = allocate_aligned_buffer(manifest.chunk_size)
    volume = open_source(path)
    try:
        changed = set()
        for index in chunks:
            start, end = manifest.chunk_range(index)
            with memoryview(buffer)[: end - start] as view:
                _read_exactly(volume.fd, view, start, path)
                if digest_chunk(view) != manifest.chunk_digests[index]:
                    changed.add(index)
        return changed
    finally:
        volume.close()
        buffer.close()


def _read_exactly(fd: int, view: memoryview, address: int, path: str) -> None:
    try:
        got = os.preadv(fd, [view], address)
    except OSError as exc:
        raise DeviceError(f"read at byte {address} of {path} failed: {exc.strerror}") from None
    if got != len(view):
        raise DeviceError(f"short read at byte {address} of {path}: {got} of {len(view)} bytes")
