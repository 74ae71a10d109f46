"""The host side on the real stack: disks with LIO's WWIDs, multipath maps, data through them."""

import os
import subprocess
import sys
import uuid

import pytest
from blockio import read_direct, read_file, write_direct

from blockmig import lab
from blockmig.array import lio
from blockmig.errors import ArrayError
from blockmig.host import iscsi, multipath, udev

HOST_IQN = "iqn.2026-11.lab.blockmig:host"
MIB = 1024 * 1024


def source_disk(status):
    return status["sessions"][0]["disks"]["0"]


def test_host_sees_the_source_disk_with_lio_wwid(lab_env):
    disk = source_disk(lab_env)
    assert lab.SOURCE_WWID == "36001405" + lab.SOURCE_SERIAL[:25]
    with open(f"/sys/block/{disk}/device/wwid") as f:
        assert f.read().strip() == "naa." + lab.SOURCE_WWID[1:]
    assert udev.disk_wwid(disk) == lab.SOURCE_WWID  # udev's ID_SERIAL, what multipath uses
    assert udev.disks_with_wwid(lab.SOURCE_WWID) == [disk]
    link = iscsi.by_path_link(*lab.SOURCE_PORTAL, lab.SOURCE_IQN, 0)
    assert udev.wait_for_path(link) == f"/dev/{disk}"
    found = multipath.map_for_wwid(lab.SOURCE_WWID)
    assert found is not None and [p.dev for p in multipath.paths_of_map(found.name)] == [disk]
    listing = subprocess.run(["multipath", "-ll"], capture_output=True, text=True, check=True).stdout
    assert f"{found.name} ({lab.SOURCE_WWID})" in listing and disk in listing


def test_data_written_through_the_map_lands_in_the_source_backing_file(lab_env, backing_dir):
    device = multipath.map_for_wwid(lab.SOURCE_WWID).device
    data = os.urandom(MIB)
    write_direct(device, 4 * MIB, data)
    assert read_file(lab.source_backing_file(backing_dir), 4 * MIB, MIB) == data
    assert read_direct(device, 4 * MIB, MIB) == data


def export_destination_volume(backing_dir, initiator, serial=None, name="lab-destination"):
    volume = lio.create_volume(lab.DESTINATION_IQN, name, 16 * MIB, os.path.join(backing_dir, name + ".img"),
                               serial=serial, lun=0)
    lio.export_volume(volume, initiator)
    return volume


def test_host_logs_in_to_both_arrays_and_sees_both_wwids(lab_env, backing_dir):
    assert set(iscsi.discover(*lab.SOURCE_PORTAL)) >= {lab.SOURCE_IQN}
    serial = uuid.uuid4().hex
    volume = export_destination_volume(backing_dir, HOST_IQN, serial)
    assert lab.DESTINATION_IQN in iscsi.discover(*lab.DESTINATION_PORTAL)
    assert volume.wwid == lio.wwid_for_serial(serial) != lab.SOURCE_WWID
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    assert session.initiator_iqn == HOST_IQN and session.iface == "default"
    disk = iscsi.wait_for_session_disk(session, 0)
    assert udev.disk_wwid(disk) == volume.wwid
    destination_map = multipath.wait_for_map(volume.wwid)
    source_map = multipath.map_for_wwid(lab.SOURCE_WWID)
    assert destination_map.name != source_map.name
    assert {s.target_iqn for s in iscsi.sessions()} >= set(lab.LAB_TARGETS)
    assert lio.find_volume_by_wwid(volume.wwid).name == "lab-destination"
    assert lio.find_volume_by_wwid(udev.disk_wwid(source_disk(lab_env))).name == lab.SOURCE_VOLUME


def test_a_destination_with_the_source_serial_joins_the_source_map(lab_env, backing_dir):
    """Why the destination must carry another serial until the switch: same serial, same map."""
    export_destination_volume(backing_dir, HOST_IQN, lab.SOURCE_SERIAL)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    disk = iscsi.wait_for_session_disk(session, 0)
    name = multipath.map_for_wwid(lab.SOURCE_WWID).name
    paths = multipath.wait_for_map_paths(name, {source_disk(lab_env), disk})
    assert len(paths) == 2
    assert len(lio.find_volumes_by_wwid(lab.SOURCE_WWID)) == 2
    # dropping the destination's path leaves the source's path serving the map; it can come back
    multipath.del_path(disk)
    multipath.wait_for_map_paths(name, {source_disk(lab_env)})
    multipath.add_path(disk)
    multipath.wait_for_map_paths(name, {source_disk(lab_env), disk})
    multipath.reconfigure()
    assert multipath.wait_for_map(lab.SOURCE_WWID, usable_paths=2).name == name


def test_a_suspended_map_holds_host_io_until_resumed(lab_env):
    found = multipath.map_for_wwid(lab.SOURCE_WWID)
    reader = [sys.executable, "-c", f"import os; fd = os.open('{found.device}', os.O_RDONLY | os.O_DIRECT); "
              "import mmap; b = mmap.mmap(-1, 4096); os.preadv(fd, [b], 8192); print('read')"]
    multipath.suspend_map(found.name)
    try:
        held = subprocess.Popen(reader, stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            held.wait(timeout=2)
    finally:
        multipath.resume_map(found.name)
    assert held.wait(timeout=30) == 0 and held.stdout.read() == "read\n"


def test_a_lun_mapped_after_login_appears_on_rescan(lab_env, backing_dir):
    volume = lio.create_volume(lab.SOURCE_IQN, "lab-second", 16 * MIB, os.path.join(backing_dir, "second.img"), lun=1)
    lio.export_volume(volume, HOST_IQN)
    session = iscsi.find_session(lab.SOURCE_IQN, *lab.SOURCE_PORTAL)
    iscsi.rescan_session(session)
    disk = iscsi.wait_for_session_disk(session, 1)
    assert udev.disk_wwid(disk) == volume.wwid
    multipath.wait_for_map(volume.wwid)


def test_a_block_device_backed_volume(lab_env, backing_dir):
    image = os.path.join(backing_dir, "block.img")
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    loop = subprocess.run(["losetup", "--find", "--show", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        with pytest.raises(ArrayError, match="holds 16777216 bytes, not the 8388608"):
            lio.create_volume(lab.DESTINATION_IQN, "lab-block", 8 * MIB, loop)
        volume = lio.create_volume(lab.DESTINATION_IQN, "lab-block", 16 * MIB, loop, lun=0)
        assert (volume.plugin, volume.backing, volume.size) == ("block", loop, 16 * MIB)
        lio.export_volume(volume, HOST_IQN)
        session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
        disk = iscsi.wait_for_session_disk(session, 0)
        data = os.urandom(MIB)
        write_direct(f"/dev/{disk}", MIB, data)
        assert read_direct(loop, MIB, MIB) == data  # LIO writes under the loop device's page cache
        multipath.flush_maps_on([disk])
        iscsi.logout_safely(session)
        lio.remove_volume(volume)
        assert lio.list_volumes(lab.DESTINATION_IQN) == []
    finally:
        subprocess.run(["losetup", "-d", loop])
