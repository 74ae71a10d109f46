"""Verify: re-read a volume and compare every chunk with the manifest."""

from __future__ import annotations

from blockmig import signals
from blockmig.datapath.blockdev import open_source
from blockmig.datapath.copy import DEFAULT_QUEUE_DEPTH, EventHandler
from blockmig.datapath.digest import Manifest
from blockmig.datapath.readahead import ReadAhead
from blockmig.errors import VerifyError


def verify_volume(
    path: str,
    manifest: Manifest,
    *,
    allow_regular_file: bool = False,
    queue_depth: int | None = DEFAULT_QUEUE_DEPTH,
    on_event: EventHandler | None = None,
) -> str:
    """Return the volume digest if the first `manifest.size` bytes of `path` match; else raise VerifyError.

    Reads the whole range even after a mismatch, so the error can say how many chunks differ.
    """
    emit = on_event or (lambda event: None)
    if not manifest.complete:
        raise VerifyError(
            f"manifest covers {len(manifest.chunk_digests)} of {manifest.chunk_count} chunks: the copy is not finished"
        )
    volume = open_source(path, allow_regular_file)
    try:
        if volume.info.size < manifest.size:
            raise VerifyError(f"{path} has {volume.info.size} bytes, the manifest {manifest.size}")
        if manifest.chunk_size % volume.info.logical_block_size:
            raise VerifyError(
                f"manifest chunk size {manifest.chunk_size} is not a multiple of {path}'s "
                f"logical block size {volume.info.logical_block_size}"
            )
        emit({"event": "verify_start", "path": volume.info.path, "size": manifest.size})
        mismatches = []
        with ReadAhead(volume, 0, manifest.size, manifest.chunk_size, queue_depth) as chunks:
            for chunk in chunks:
                chunks.release(chunk)
                expected = manifest.chunk_digests[chunk.index]
                if chunk.digest != expected:
                    mismatches.append((chunk.index, chunk.digest, expected))
                _, end = manifest.chunk_range(chunk.index)
                emit({"event": "verified_chunk", "path": volume.info.path, "index": chunk.index, "end": end,
                      "match": chunk.digest == expected})
                signals.check(f"verify of {path} stopped at byte {end} of {manifest.size}")  # a plan's member thread
    finally:
        volume.close()
    if mismatches:
        index, actual, expected = mismatches[0]
        start, end = manifest.chunk_range(index)
        more = f" (and {len(mismatches) - 1} more chunks differ)" if len(mismatches) > 1 else ""
        raise VerifyError(
            f"{path}: chunk {index} (bytes {start}-{end - 1}) has sha256 {actual[:16]}..., "
            f"manifest says {expected[:16]}...{more}"
        )
    emit({"event": "verify_done", "path": path, "size": manifest.size, "volume_digest": manifest.volume_digest})
    return manifest.volume_digest
