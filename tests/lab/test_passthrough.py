"""The array side of an online move on the real stack: blockmig's handler serves the host a LUN with the
source's identity whose IO passes through to the source, over a session of the array's own to the source
array, while the migrator fills the destination through the guarded view and then copies what the host
dirtied meanwhile; after the commit the destination alone serves the host.

The migrator here is the test (reads of the source, guarded writes of its disk of the destination, a
read-ahead window), so that every rule of the array side is exercised by a real host's IO over iSCSI.
"""

import os
import time

import pytest
from blockio import read_direct, read_file, write_direct
from conftest import MIGRATOR_IQN
from test_backstore import (  # noqa: F401
    THIRD_IQN,
    export_storage_object,
    migrator_disks,
    served,
    session_disk_of,
    third_iface,
)
from workloads import RawWriter, device_reader, file_reader

from blockmig import lab
from blockmig.array import lio
from blockmig.host import iscsi, multipath

MIB = 1024 * 1024
SERIAL = "b10c0dd" + "0" * 25
BLACKLIST = "/etc/multipath/conf.d/blockmig-test-pass-through.conf"
SIZE = 32 * MIB
CHUNK = MIB
DEPTH = 2  # the test migrator's read-ahead, in chunks
HOST_LUN, MIGRATOR_LUN = 5, 6


@pytest.fixture
def pass_through(served, backing_dir, third_iface):
    """A source volume (on the source array, mapped to the array's initiator), its disk on the array's own
    session, and the handler serving NAME (for the host) and NAME-migrator, passed through to it. In the lab
    the array's session and the host share one kernel: multipathd is kept off the WWID (else it would make
    the array's disk and the host's one map), and the host's disk is used directly."""
    wwid = lio.wwid_for_serial(SERIAL)
    os.makedirs(os.path.dirname(BLACKLIST), exist_ok=True)
    with open(BLACKLIST, "w") as f:
        f.write(f'blacklist {{\n    wwid "{wwid}"\n}}\n')
    multipath.reconfigure()
    host_session = None
    try:
        source = lab.add_source_volume("pt-source", SIZE, backing_dir, lun=7, initiators=(THIRD_IQN,),
                                       serial=SERIAL)
        array_disk = "/dev/" + session_disk_of(third_iface, 7, target_iqn=lab.SOURCE_IQN,
                                               portal=lab.SOURCE_PORTAL)
        content = os.urandom(SIZE)
        write_direct(array_disk, 0, content)
        volume = served("pt", SIZE, serial=SERIAL, guard_initiator=MIGRATOR_IQN,
                        pass_through_source=array_disk, chunk_size=CHUNK)
        export_storage_object("pt", [iscsi.read_initiator_name()], lun=HOST_LUN)
        export_storage_object("pt-migrator", [MIGRATOR_IQN], lun=MIGRATOR_LUN)
        host_disk = "/dev/" + session_disk_of(None, HOST_LUN)
        host_session = iscsi.session_of_disk(os.path.basename(host_disk))
        yield source, array_disk, volume, host_disk, content
    finally:
        if host_session is not None:
            iscsi.logout_safely(host_session)
        os.unlink(BLACKLIST)


def guarded_copy(volume, array_disk: str, migrator_disk: str, writes_meanwhile=lambda: None) -> None:
    """Pass 1 with a read-ahead of DEPTH chunks, then delta passes from the handler's dirty map until one
    finds nothing; `writes_meanwhile` runs between chunks."""
    volume.client.arm_sequential(0, window=DEPTH * CHUNK)
    read_ahead = [read_direct(array_disk, i * CHUNK, CHUNK) for i in range(DEPTH)]
    for index in range(SIZE // CHUNK):  # read chunks: from the reserved address on, DEPTH of them at most
        write_direct(migrator_disk, index * CHUNK, read_ahead.pop(0))
        if index + DEPTH < SIZE // CHUNK:
            read_ahead.append(read_direct(array_disk, (index + DEPTH) * CHUNK, CHUNK))
        writes_meanwhile()
    for _ in range(20):
        dirty = volume.client.take_dirty()
        if not dirty:
            return
        volume.client.arm_delta([[c * CHUNK, CHUNK] for c in dirty])
        for chunk in dirty:
            write_direct(migrator_disk, chunk * CHUNK, read_direct(array_disk, chunk * CHUNK, CHUNK))
            writes_meanwhile()
        volume.client.copied(dirty)  # else the next take hands them out again
    raise AssertionError("the delta passes did not converge in 20 passes")


def test_the_host_reads_and_writes_the_source_through_the_handler(pass_through):
    source, _, volume, host_disk, content = pass_through
    assert read_direct(host_disk, 0, SIZE) == content  # the destination is empty still: the source answers
    written = os.urandom(64 * 1024)
    write_direct(host_disk, 5 * MIB + 4096, written)
    assert read_file(source.backing, 5 * MIB + 4096, len(written)) == written  # on the source array
    state = volume.client.state()
    assert state["pass_through"] is True and state["dirty_chunks"] == 0  # no pass armed: none to copy again


def test_a_copy_under_a_host_writer_then_commit_leaves_no_acknowledged_write_behind(pass_through, backing_dir,
                                                                                   migrator_disks):
    source, array_disk, volume, host_disk, content = pass_through
    migrator_disk = "/dev/" + migrator_disks(MIGRATOR_LUN)
    destination = os.path.join(backing_dir, "pt.img")
    writer = RawWriter(host_disk, SIZE)
    writer.start()
    try:
        time.sleep(0.5)
        guarded_copy(volume, array_disk, migrator_disk, writes_meanwhile=lambda: time.sleep(0.05))
    finally:
        writer.stop()
    dirty = volume.client.take_dirty()  # the writer's last writes: the final pass, host writes stopped
    volume.client.arm_delta([[c * CHUNK, CHUNK] for c in dirty])
    for chunk in dirty:
        write_direct(migrator_disk, chunk * CHUNK, read_direct(array_disk, chunk * CHUNK, CHUNK))
    volume.client.commit()
    assert volume.client.state()["pass_through"] is False
    print(f"\n{writer.summary()}; final pass {len(dirty)} chunks")
    writer.check(file_reader(source.backing), expected=content)  # the source was current throughout
    writer.check(file_reader(destination), expected=content)  # and the destination equals it
    assert read_file(destination, 0, SIZE) == read_file(source.backing, 0, SIZE)
    writer.check(device_reader(host_disk), expected=content)  # what the host reads now: the destination's
    after = os.urandom(4096)  # after the commit the host writes the destination alone
    write_direct(host_disk, 0, after)
    assert read_file(destination, 0, 4096) == after and read_direct(host_disk, 0, 4096) == after
    assert read_file(source.backing, 0, 4096) != after
