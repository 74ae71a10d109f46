"""Which disk is which: host-mapped LUN numbers, targeted scans, WWID checks before delete and logout."""

import os
import subprocess

import pytest
from host_support import HOST_IQN, MIB, source_session

from blockmig import lab
from blockmig.array import lio
from blockmig.errors import HostError
from blockmig.host import iscsi, multipath, udev


def export_to_host(backing_dir, name, tpg_lun, mapped_lun, target=lab.SOURCE_IQN, size=16 * MIB):
    volume = lio.create_volume(target, name, size, os.path.join(backing_dir, name + ".img"), lun=tpg_lun)
    lio.export_volume(volume, HOST_IQN, mapped_lun=mapped_lun)
    return volume


def test_targeted_scan_finds_only_the_scanned_lun_of_an_existing_session(lab_env, backing_dir):
    """A second volume on a reused session: its LUN appears when scanned, a LUN mapped but not scanned does not."""
    session = source_session()
    wanted = export_to_host(backing_dir, "lab-second", tpg_lun=1, mapped_lun=5)
    unscanned = export_to_host(backing_dir, "lab-third", tpg_lun=2, mapped_lun=6)
    assert set(iscsi.session_disks(session)) == {0}  # mapped after login: not seen yet
    host_no, channel, target_id = iscsi.session_scsi_address(session)
    assert os.path.isdir(f"/sys/class/scsi_host/host{host_no}/device/session{session.sid}/target{host_no}:{channel}:{target_id}")

    disk = iscsi.find_session_disk(session, 5, wanted.wwid)  # host LUN 5, though the TPG LUN is 1
    udev.settle()
    assert set(iscsi.session_disks(session)) == {0, 5}
    assert udev.disk_wwid(disk) == wanted.wwid
    assert udev.disks_with_wwid(unscanned.wwid) == []
    multipath.wait_for_map(wanted.wwid)
    iscsi.scan_session_lun(session, 5)  # scanning a present LUN again changes nothing
    udev.settle()
    assert iscsi.session_disks(session) == {0: lab_env["sessions"][0]["disks"]["0"], 5: disk}


def test_a_tpg_lun_number_is_not_taken_for_the_hosts_lun(lab_env, backing_dir):
    """TPG LUN 1 is the host's LUN 0 on the destination: looking for 'LUN 1' finds nothing, LUN 0 the right disk."""
    volume = export_to_host(backing_dir, "lab-destination", tpg_lun=1, mapped_lun=0, target=lab.DESTINATION_IQN)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    with pytest.raises(HostError, match="LUN 1 of .* to appear"):
        iscsi.find_session_disk(session, 1, volume.wwid, timeout=3)
    disk = iscsi.find_session_disk(session, 0, volume.wwid)
    assert iscsi.disk_identity(disk) == iscsi.DiskIdentity(volume.wwid, 512, 16 * MIB)


def test_find_session_disk_refuses_a_disk_with_another_wwid_and_leaves_it(lab_env):
    session = source_session()
    disk = iscsi.session_disks(session)[0]
    other = lio.wwid_for_serial("ffff0000000000000000000000000001")
    with pytest.raises(HostError) as refused:
        iscsi.find_session_disk(session, 0, other)
    message = str(refused.value)
    assert disk in message and lab.SOURCE_WWID in message and other in message and "\n" not in message
    assert os.path.exists(f"/sys/block/{disk}")
    with pytest.raises(HostError, match=f"{disk} .*has WWID {lab.SOURCE_WWID}, not the expected {other}"):
        iscsi.delete_disk_checked(disk, other)
    assert os.path.exists(f"/sys/block/{disk}")
    found = multipath.map_for_wwid(lab.SOURCE_WWID)
    assert [p.dev for p in multipath.paths_of_map(found.name) if p.usable] == [disk]


def test_disk_identity_and_the_maps_block_size(lab_env):
    disk = lab_env["sessions"][0]["disks"]["0"]
    assert iscsi.disk_identity(disk) == iscsi.DiskIdentity(lab.SOURCE_WWID, 512, 16 * MIB)
    found = multipath.map_for_wwid(lab.SOURCE_WWID)
    assert multipath.logical_block_size(found.device) == 512
    assert multipath.logical_block_size(f"/dev/{disk}") == 512


def test_logout_if_unused_keeps_a_session_that_carries_another_volume(lab_env, backing_dir):
    session = source_session()
    second = export_to_host(backing_dir, "lab-second", tpg_lun=1, mapped_lun=1)
    disk = iscsi.find_session_disk(session, 1, second.wwid)
    second_map = multipath.wait_for_map(second.wwid)
    multipath.flush_map(second_map.name)
    iscsi.delete_disk_checked(disk, second.wwid)
    iscsi.delete_disk_checked(disk, second.wwid)  # gone already: nothing to do
    assert not iscsi.logout_if_unused(session)  # LUN 0, the source volume, still rides on it
    assert iscsi.find_session(lab.SOURCE_IQN, *lab.SOURCE_PORTAL) == session
    multipath.wait_for_map(lab.SOURCE_WWID)


def test_logout_if_unused_logs_out_a_session_without_disks_and_deletes_its_node(lab_env, backing_dir):
    volume = export_to_host(backing_dir, "lab-destination", tpg_lun=0, mapped_lun=0, target=lab.DESTINATION_IQN)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    disk = iscsi.find_session_disk(session, 0, volume.wwid)
    assert not iscsi.logout_if_unused(session)
    multipath.flush_map(multipath.wait_for_map(volume.wwid).name)
    iscsi.delete_disk_checked(disk, volume.wwid)
    assert iscsi.logout_if_unused(session)
    assert iscsi.find_session(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL) is None
    nodes = subprocess.run(["iscsiadm", "-m", "node", "-T", lab.DESTINATION_IQN], capture_output=True, text=True)
    assert nodes.returncode == iscsi.ISCSI_ERR_NO_OBJS_FOUND
    assert not iscsi.logout_if_unused(session)  # already gone


def test_the_host_can_log_in_before_its_lun_is_mapped_and_scan_it_later(lab_env, backing_dir):
    """An ACL without mapped LUNs accepts the login and shows no disk: a switch can log in before its IO hold."""
    import rtslib_fb

    target = rtslib_fb.Target(rtslib_fb.FabricModule("iscsi"), lab.DESTINATION_IQN, mode="lookup")
    rtslib_fb.NodeACL(next(iter(target.tpgs)), HOST_IQN)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    udev.settle()
    assert iscsi.session_disks(session) == {}
    volume = export_to_host(backing_dir, "lab-destination", tpg_lun=0, mapped_lun=0, target=lab.DESTINATION_IQN)
    udev.settle()
    assert iscsi.session_disks(session) == {}  # mapped, not scanned: the host does not see it yet
    disk = iscsi.find_session_disk(session, 0, volume.wwid, timeout=5)
    assert iscsi.session_disks(session) == {0: disk}
    multipath.wait_for_map(volume.wwid)
