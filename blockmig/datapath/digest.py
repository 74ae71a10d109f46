"""Per-chunk digests and the whole-volume digest.

SHA-256 because an admin can check any chunk independently with
`dd ... | sha256sum`, and with the SHA extensions of current CPUs it is faster
than BLAKE2b in hashlib (about 1.7 vs 0.9 GB/s measured here).

The whole-volume digest is SHA-256 over the concatenated raw per-chunk digests
(a hash list). Unlike a running hash over the bytes, it can be recomputed from
the journal after a crash, so it survives resume without storing hash state.
"""

from __future__ import annotations

import hashlib
import json

from blockmig.errors import JournalError

ALGORITHM = "sha256"


def digest_chunk(data) -> str:
    return hashlib.sha256(data).hexdigest()


class Manifest:
    """The chunk digests of a volume, in order (a plain class: see blockdev.VolumeInfo)."""

    def __init__(self, size: int, chunk_size: int, chunk_digests: list[str] | None = None,
                 algorithm: str = ALGORITHM):
        self.size, self.chunk_size, self.algorithm = size, chunk_size, algorithm
        self.chunk_digests = [] if chunk_digests is None else chunk_digests

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def complete(self) -> bool:
        return len(self.chunk_digests) == self.chunk_count

    @property
    def volume_digest(self) -> str:
        """Hash list: sha256(raw digest of chunk 0 || chunk 1 || ...)."""
        hasher = hashlib.sha256()
        for digest in self.chunk_digests:
            hasher.update(bytes.fromhex(digest))
        return hasher.hexdigest()

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Byte range [start, end) of chunk `index`."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def to_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunk_digests": list(self.chunk_digests),
            "volume_digest": self.volume_digest if self.complete else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        manifest = cls(data["size"], data["chunk_size"], list(data["chunk_digests"]), data["algorithm"])
        if manifest.algorithm != ALGORITHM:
            raise JournalError(f"manifest uses {manifest.algorithm}; this blockmig knows {ALGORITHM}")
        if len(manifest.chunk_digests) > manifest.chunk_count:
            raise JournalError("manifest has more chunk digests than its size allows")
        if data.get("volume_digest") not in (None, manifest.volume_digest):
            raise JournalError("manifest's volume digest does not match its chunk digests")
        return manifest


def load_manifest(path: str) -> Manifest:
    """Read a manifest file, or the manifest inside a copy journal."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return Manifest.from_dict(data.get("manifest", data))
    except OSError as exc:
        raise JournalError(f"cannot read manifest {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise JournalError(f"{path} is not a blockmig manifest ({exc})") from None
