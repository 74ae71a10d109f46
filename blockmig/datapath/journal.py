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
from blockmig.datapath.digest import MAX_MANIFEST_BYTES, Manifest, parse_json_document
from blockmig.errors import JournalError
from blockmig.safefile import read_bounded, write_atomically

JOURNAL_DIR = "/var/lib/blockmig"
FORMAT = "blockmig-copy-journal/1"


def default_journal_path(source: str, destination: str) -> str:
    """One journal per (source, destination) pair of paths, under /var/lib/blockmig."""
    pair = f"{os.path.realpath(source)}\0{os.path.realpath(destination)}"
    return os.path.join(JOURNAL_DIR, f"copy-{hashlib.sha256(pair.encode()).hexdigest()[:16]}.json")


def write_json_atomically(path: str, data: dict, *, private_dir: bool = True) -> None:
    """Replace `path` with `data` as JSON (safefile: 0600, exclusive unfollowed temp file, fsyncs, rename).

    private_dir: the directory is blockmig's state (made or checked 0700); False for a file the user named.
    """
    write_atomically(path, json.dumps(data, separators=(",", ":")).encode(), private_dir=private_dir)


class CopyJournal:
    """A plain class: see blockdev.VolumeInfo."""

    def __init__(self, path: str, source: VolumeInfo, destination: VolumeInfo, manifest: Manifest,
                 private_dir: bool = True):
        self.path, self.source, self.destination, self.manifest = path, source, destination, manifest
        self.private_dir = private_dir

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
            private_dir=self.private_dir,
        )

    @classmethod
    def load(cls, path: str, private_dir: bool = True) -> "CopyJournal":
        """JournalError (one line) for anything that is not a consistent copy journal."""
        try:
            raw = read_bounded(path, MAX_MANIFEST_BYTES, "copy journal")  # never through a link
        except FileNotFoundError as exc:
            raise JournalError(f"cannot read journal {path}: {exc.strerror}") from None
        data = parse_json_document(raw, path, "copy journal")
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            journal = cls(
                path,
                _volume_info(data["source"]),
                _volume_info(data["destination"]),
                Manifest.from_dict(data["manifest"]),
                private_dir,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JournalError(f"{path} is not a blockmig copy journal ({exc})") from None
        except JournalError as exc:
            raise JournalError(f"{path} is not a usable copy journal: {exc}") from None
        if data.get("reserved_address") != journal.reserved_address:
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

    def check_matches_source(self, source: VolumeInfo) -> None:
        """The manifest must span the whole source: one of another size would resume and verify only a part."""
        if self.manifest.size != source.size:
            raise JournalError(f"journal {self.path} records a {self.manifest.size}-byte copy, but the source "
                               f"{source.path} holds {source.size} bytes: delete it to start over")


_VOLUME_FIELD_TYPES = {"path": str, "size": int, "logical_block_size": int, "is_block_device": bool}


def _volume_info(data) -> VolumeInfo:
    """A recorded volume with the types the checks rely on (a bool is not a size)."""
    info = VolumeInfo.from_dict(data)
    for name, kind in _VOLUME_FIELD_TYPES.items():
        value = getattr(info, name)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise ValueError(f"{name} {value!r}")
    return info
