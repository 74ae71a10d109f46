"""Shared by the host lab tests: the host's session to the source array, a second volume with its own map."""

import os

from blockmig import lab
from blockmig.array import lio
from blockmig.host import iscsi, multipath

HOST_IQN = "iqn.2026-11.lab.blockmig:host"
MIB = 1024 * 1024
XFS_MIN_SIZE = 320 * MIB  # mkfs.xfs 6.x refuses filesystems under 300 MiB


def source_session():
    return iscsi.find_session(lab.SOURCE_IQN, *lab.SOURCE_PORTAL)


def fs_volume_map(backing_dir):
    """A volume big enough for xfs, LUN 1 of the source array, with its map on the host."""
    volume = lio.create_volume(lab.SOURCE_IQN, "lab-fs", XFS_MIN_SIZE, os.path.join(backing_dir, "fs.img"), lun=1)
    lio.export_volume(volume, HOST_IQN)
    iscsi.find_session_disk(source_session(), 1, volume.wwid)
    return multipath.wait_for_map(volume.wwid)
