"""The data path: block devices, the destination guard, the copy engine, digests, the copy journal.

No iSCSI knowledge here: anything with two block devices can use it.
"""

from blockmig.datapath.copy import DEFAULT_CHUNK_SIZE, copy_volume
from blockmig.datapath.digest import Manifest, load_manifest
from blockmig.datapath.guard import DestinationGuard, WriteAck
from blockmig.datapath.journal import CopyJournal, default_journal_path
from blockmig.datapath.verify import verify_volume

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CopyJournal",
    "DestinationGuard",
    "Manifest",
    "WriteAck",
    "copy_volume",
    "default_journal_path",
    "load_manifest",
    "verify_volume",
]
