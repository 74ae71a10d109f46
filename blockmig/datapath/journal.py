"""The copy journal: what survives kill -9 so a copy can resume.

It holds the source and destination identities, the manifest so far and the
guard's reserved write address as last acknowledged. It is replaced atomically
(temp file, fsync, rename, fsync of the directory), so a crash leaves either
the previous journal or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os

from blockmig.datapath.blockdev import VolumeInfo
from blockmig.datapath.digest import Manifest
from blockmig.errors import JournalError

JOURNAL_DIR = "/var/lib/blockmig"
FORMAT = "blockmig-copy-journal/1"


def default_journal_path(source: str, destination: str) -> str:
    """One journal per (source, destination) pair of paths, under /var/lib/blockmig."""
    pair = f"{os.path.realpath(source)}\0{os.path.realpath(destination)}"
    return os.path.join(JOURNAL_DIR, f"copy-{hashlib.sha256(pair.encode()).hexdigest()[:16]}.json")


def write_json_atomically(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except OSError as exc:
        raise JournalError(f"cannot write {path}: {exc.strerror}") from None


class CopyJournal:
    """A plain class: see blockdev.VolumeInfo."""

    def __init__(self, path: str, source: VolumeInfo, destination: VolumeInfo, manifest: Manifest):
        self.path, self.source, self.destination, self.manifest = path, source, destination, manifest

    @property
    def reserved_address(self) -> int:
        """End of the last acknowledged chunk: where the guard resumes."""
        return min(len(self.manifest.chunk_digests) * self.manifest.chunk_size, self.manifest.size)

    def save(self) -> None:
        write_json_atomically(
            self.path,
            {
                "format": FORMAT,
                "source": self.source.to_dict(),
                "destination": self.destination.to_dict(),
                "reserved_address": self.reserved_address,
                "complete": self.manifest.complete,
                "manifest": self.manifest.to_dict(),
            },
        )

    @classmethod
    def load(cls, path: str) -> "CopyJournal":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            journal = cls(
                path,
                VolumeInfo.from_dict(data["source"]),
                VolumeInfo.from_dict(data["destination"]),
                Manifest.from_dict(data["manifest"]),
            )
        except OSError as exc:
            raise JournalError(f"cannot read journal {path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JournalError(f"{path} is not a blockmig copy journal ({exc})") from None
        if data["reserved_address"] != journal.reserved_address:
            raise JournalError(f"journal {path} is inconsistent: reserved address does not match its digests")
        return journal

    def check_belongs_to(self, source: VolumeInfo, destination: VolumeInfo) -> None:
        for role, recorded, actual in (("source", self.source, source), ("destination", self.destination, destination)):
            if not recorded.same_volume(actual):
                raise JournalError(
                    f"journal {self.path} belongs to another {role}: it records {recorded.path} "
                    f"({recorded.size} bytes, {recorded.serial or recorded.device}), "
                    f"not {actual.path} ({actual.size} bytes, {actual.serial or actual.device})"
                )
