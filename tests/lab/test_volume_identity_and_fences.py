"""Serial change with data kept, the write-protect fence, and exclusive access for the migrator."""

import os
import uuid

import pytest
from blockio import read_direct, read_file, write_direct
from conftest import MIGRATOR_IQN

from blockmig import lab
from blockmig.array import lio
from blockmig.errors import ArrayError, HostError
from blockmig.host import iscsi, multipath, udev

HOST_IQN = "iqn.2026-11.lab.blockmig:host"
MIB = 1024 * 1024


def test_change_volume_serial_keeps_data_lun_and_mappings(lab_env, backing_dir):
    backing = os.path.join(backing_dir, "lab-destination.img")
    volume = lio.create_volume(lab.DESTINATION_IQN, "lab-destination", 16 * MIB, backing, lun=0)
    lio.export_volume(volume, HOST_IQN)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    disk = iscsi.wait_for_session_disk(session, 0)
    data = os.urandom(2 * MIB)
    write_direct(f"/dev/{disk}", 3 * MIB, data)
    multipath.flush_maps_on([disk])
    iscsi.logout_safely(session)

    new_serial = uuid.uuid4().hex
    changed = lio.change_volume_serial(volume, new_serial)
    assert (changed.serial, changed.lun, changed.target_iqn, changed.backing) == (new_serial, 0, lab.DESTINATION_IQN, backing)
    assert changed.wwid == lio.wwid_for_serial(new_serial) != volume.wwid
    assert lio.list_mappings(changed) == [lio.Mapping(HOST_IQN, 0, False)]
    assert read_file(backing, 3 * MIB, 2 * MIB) == data

    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    disk = iscsi.wait_for_session_disk(session, 0)
    assert udev.disk_wwid(disk) == changed.wwid
    assert read_direct(f"/dev/{disk}", 3 * MIB, 2 * MIB) == data
    assert lio.find_volume_by_wwid(changed.wwid).name == "lab-destination"


def test_a_serial_the_kernel_refuses_leaves_the_volume_as_it_was(lab_env, backing_dir, monkeypatch):
    source = lio.find_volume(lab.SOURCE_VOLUME)
    data = read_file(source.backing, 0, MIB)
    monkeypatch.setattr(lio, "MAX_SERIAL_LENGTH", 400)  # let the kernel itself refuse it
    with pytest.raises(ArrayError, match="old serial kept"):
        lio.change_volume_serial(source, "a" * 300)
    assert lio.find_volume(lab.SOURCE_VOLUME) == source
    assert lio.list_mappings(source) == [lio.Mapping(HOST_IQN, 0, False)]
    assert read_file(source.backing, 0, MIB) == data


def test_write_protected_mapping_refuses_host_writes_and_keeps_reads(lab_env, backing_dir):
    disk = f"/dev/{lab_env['sessions'][0]['disks']['0']}"
    backing = lab.source_backing_file(backing_dir)
    source = lio.find_volume(lab.SOURCE_VOLUME)
    before = os.urandom(MIB)
    write_direct(disk, 0, before)

    lio.set_mapping_write_protect(source, HOST_IQN, True)
    assert lio.list_mappings(source) == [lio.Mapping(HOST_IQN, 0, True)]
    with pytest.raises(OSError):
        write_direct(disk, 0, os.urandom(MIB))
    assert read_file(backing, 0, MIB) == before
    assert read_direct(disk, 0, MIB) == before  # the host keeps reading

    lio.set_mapping_write_protect(source, HOST_IQN, False)
    after = os.urandom(MIB)
    write_direct(disk, 0, after)
    assert read_file(backing, 0, MIB) == after


def test_migrator_iface_sees_only_what_its_acl_allows(migrator_iface, backing_dir):
    volume = lio.create_volume(lab.DESTINATION_IQN, "lab-destination", 16 * MIB,
                               os.path.join(backing_dir, "lab-destination.img"), lun=0)
    lio.export_volume(volume, MIGRATOR_IQN)

    # the host's own initiator name has no ACL on the destination: refused, nothing left behind
    with pytest.raises(HostError, match="authorization"):
        iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    assert iscsi.find_session(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL) is None
    assert iscsi.run_iscsiadm(["-m", "node", "-T", lab.DESTINATION_IQN], ok=(0, 21)).returncode == 21

    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL, iface=migrator_iface)
    assert (session.iface, session.initiator_iqn) == (migrator_iface, MIGRATOR_IQN)
    disk = iscsi.wait_for_session_disk(session, 0)
    assert udev.disk_wwid(disk) == volume.wwid
    data = os.urandom(MIB)
    write_direct(f"/dev/{disk}", 0, data)
    assert read_file(volume.backing, 0, MIB) == data


def test_unexport_and_remove_volume(lab_env, backing_dir):
    acls = f"/sys/kernel/config/target/iscsi/{lab.DESTINATION_IQN}/tpgt_1/acls"
    backing = os.path.join(backing_dir, "lab-destination.img")
    volume = lio.create_volume(lab.DESTINATION_IQN, "lab-destination", 16 * MIB, backing, lun=0)
    lio.export_volume(volume, MIGRATOR_IQN)
    lio.export_volume(volume, HOST_IQN, write_protect=True)
    assert sorted(os.listdir(acls)) == sorted([HOST_IQN, MIGRATOR_IQN])

    lio.unexport_volume(volume, MIGRATOR_IQN)  # the switch takes the migrator's access away
    assert lio.list_mappings(volume) == [lio.Mapping(HOST_IQN, 0, True)]
    assert os.listdir(acls) == [HOST_IQN]  # an ACL that maps nothing goes too
    with pytest.raises(ArrayError, match="not exported to"):
        lio.unexport_volume(volume, MIGRATOR_IQN)

    lio.remove_volume(volume, remove_backing=True)
    assert lio.list_volumes(lab.DESTINATION_IQN) == [] and not os.path.exists(backing)
    assert os.listdir(f"/sys/kernel/config/target/iscsi/{lab.DESTINATION_IQN}/tpgt_1/lun") == []
    with pytest.raises(ArrayError, match="no volume"):
        lio.remove_volume(volume)
