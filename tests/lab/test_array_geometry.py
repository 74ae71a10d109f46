"""Volumes of the shapes real hosts have: 4096-byte blocks, INQUIRY strings, block backstores,
host LUN numbers that differ from the TPG's, ACLs that map nothing yet."""

import contextlib
import glob
import os
import subprocess
import time
import uuid

import pytest
from blockio import read_direct, read_file, write_direct
from conftest import MIGRATOR_IQN

from blockmig import lab
from blockmig.array import lio
from blockmig.errors import ArrayError
from blockmig.host import iscsi, udev
from blockmig.sysfs import read_attribute

HOST_IQN = "iqn.2026-11.lab.blockmig:host"
MIB = 1024 * 1024
CONFIGFS = "/sys/kernel/config/target"
DESTINATION_TPG = f"{CONFIGFS}/iscsi/{lab.DESTINATION_IQN}/tpgt_1"
# What a host's block layer and filesystems take from the disk.
HOST_VIEW = (
    "queue/logical_block_size", "queue/physical_block_size", "queue/rotational", "queue/discard_max_bytes",
    "queue/discard_granularity", "queue/write_zeroes_max_bytes", "queue/write_cache",
    "device/vendor", "device/model", "device/rev",
)
SHAPED = {"emulate_tpu": "1", "emulate_tpws": "1", "is_nonrot": "1", "unmap_zeroes_data": "1",
          "vendor_id": "ACME", "product_id": "BIGDISK", "revision": "9.9"}


def host_view(disk):
    # the /dev node can be there a moment before /sys/block/sdX (seen once): wait for it
    udev.wait_for_path(f"/sys/block/{disk}/queue")
    return {name: read_attribute(f"/sys/block/{disk}/{name}") for name in HOST_VIEW}


def source_session():
    return iscsi.find_session(lab.SOURCE_IQN, *lab.SOURCE_PORTAL)


def scan_for(session, lun):
    iscsi.rescan_session(session)
    return iscsi.wait_for_session_disk(session, lun)


def scsi_devices(session):
    """H:C:T:L of every SCSI device (disk or not) the session has."""
    pattern = f"/sys/class/iscsi_session/session{session.sid}/device/target*/*:*:*:*"
    return sorted(os.path.basename(p) for p in glob.glob(pattern))


@contextlib.contextmanager
def scsi_scan_logging():
    """Let the kernel log its SCSI scan decisions (scsi_logging.h: scan level 7 at shift 6)."""
    path = "/proc/sys/dev/scsi/logging_level"
    before = read_attribute(path)
    with open(path, "w") as f:
        f.write(str(7 << 6))
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(before or "0")


def test_destination_made_with_the_source_geometry_looks_the_same_to_the_host(lab_env, backing_dir):
    source = lab.add_source_volume("lab-4k", 16 * MIB, backing_dir, lun=1, block_size=4096, geometry=SHAPED)
    source_disk = scan_for(source_session(), 1)
    geometry = lio.volume_geometry(source)
    assert {k: geometry[k] for k in SHAPED} == SHAPED and geometry["block_size"] == "4096"

    destination = lio.create_volume(lab.DESTINATION_IQN, "lab-4k-copy", 16 * MIB,
                                    os.path.join(backing_dir, "copy.img"), lun=0, geometry=geometry)
    assert lio.volume_geometry(destination) == geometry
    lio.export_volume(destination, HOST_IQN)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    destination_disk = iscsi.wait_for_session_disk(session, 0)

    seen = host_view(source_disk)
    assert seen["queue/logical_block_size"] == "4096" and seen["queue/rotational"] == "0"
    assert (seen["device/vendor"], seen["device/model"], seen["device/rev"]) == ("ACME", "BIGDISK", "9.9")
    assert int(seen["queue/discard_max_bytes"]) > 0
    assert host_view(destination_disk) == seen
    # a volume made without it (the bug of issue 7) differs where the host notices
    plain = lio.create_volume(lab.DESTINATION_IQN, "lab-plain", 16 * MIB, os.path.join(backing_dir, "plain.img"), lun=1)
    assert lio.volume_geometry(plain)["block_size"] == "512"


def test_change_volume_serial_keeps_geometry_data_and_mapped_luns(lab_env, backing_dir):
    backing = os.path.join(backing_dir, "lab-destination.img")
    volume = lio.create_volume(lab.DESTINATION_IQN, "lab-destination", 16 * MIB, backing, lun=2,
                               geometry={**SHAPED, "block_size": "4096"})
    lio.export_volume(volume, MIGRATOR_IQN)
    lio.export_volume(volume, HOST_IQN, write_protect=True, mapped_lun=5)
    data = os.urandom(MIB)
    with open(backing, "r+b") as f:
        f.seek(4 * MIB)
        f.write(data)
    geometry, mappings = lio.volume_geometry(volume), sorted(lio.list_mappings(volume))
    assert mappings == [lio.Mapping(HOST_IQN, 5, True), lio.Mapping(MIGRATOR_IQN, 2, False)]

    changed = lio.change_volume_serial(volume, uuid.uuid4().hex)
    assert (changed.lun, changed.backing) == (2, backing) and changed.serial != volume.serial
    assert lio.volume_geometry(changed) == geometry
    assert sorted(lio.list_mappings(changed)) == mappings
    assert read_file(backing, 4 * MIB, MIB) == data

    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    disk = iscsi.wait_for_session_disk(session, 5)
    assert udev.disk_wwid(disk) == changed.wwid
    assert host_view(disk)["queue/logical_block_size"] == "4096" and host_view(disk)["device/vendor"] == "ACME"
    assert read_direct(f"/dev/{disk}", 4 * MIB, MIB) == data


def test_host_sees_the_mapped_lun_number_not_the_tpg_lun(lab_env, backing_dir):
    volume = lab.add_source_volume("lab-mapped", 16 * MIB, backing_dir, lun=3, mapped_lun=7)
    assert volume.lun == 3
    assert lio.find_mapping(volume, HOST_IQN) == lio.Mapping(HOST_IQN, 7, False)
    session = source_session()
    disk = scan_for(session, 7)
    assert 3 not in iscsi.session_disks(session)
    [hctl] = os.listdir(f"/sys/block/{disk}/device/scsi_device")
    assert hctl.split(":")[3] == "7"
    assert udev.disk_wwid(disk) == volume.wwid
    link = udev.wait_for_path(iscsi.by_path_link(*lab.SOURCE_PORTAL, lab.SOURCE_IQN, 7))
    assert os.path.realpath(link) == f"/dev/{disk}"


def test_export_volume_picks_a_free_mapped_lun(lab_env, backing_dir):
    a, b, c = (
        lio.create_volume(lab.DESTINATION_IQN, f"lab-{n}", MIB, os.path.join(backing_dir, f"{n}.img"), lun=lun)
        for n, lun in (("a", 0), ("b", 1), ("c", 2))
    )
    assert lio.export_volume(c, HOST_IQN, mapped_lun=1).mapped_lun == 1
    assert lio.free_mapped_lun(lab.DESTINATION_IQN, HOST_IQN, 1) == 0
    assert lio.free_mapped_lun(lab.DESTINATION_IQN, HOST_IQN, 4) == 4
    assert lio.free_mapped_lun(lab.DESTINATION_IQN, MIGRATOR_IQN, 1) == 1  # no ACL yet
    assert lio.export_volume(b, HOST_IQN).mapped_lun == 0  # its TPG LUN 1 is taken on the host's ACL
    assert lio.export_volume(a, HOST_IQN).mapped_lun == 2  # 0 and 1 taken
    assert lio.export_volume(b, MIGRATOR_IQN).mapped_lun == 1  # free there: the TPG LUN
    with pytest.raises(ArrayError, match="already has LUN 1"):  # an explicit number is never moved
        lio.export_volume(a, MIGRATOR_IQN, mapped_lun=1)
    assert lio.find_mapping(a, MIGRATOR_IQN) is None
    assert lio.find_mapping(b, HOST_IQN) == lio.Mapping(HOST_IQN, 0, False)
    assert lio.find_mapping(b, "iqn.2026-11.lab.blockmig:nobody") is None
    assert lio.other_initiators(b, [HOST_IQN]) == [lio.Mapping(MIGRATOR_IQN, 1, False)]
    assert lio.other_initiators(b, {HOST_IQN, MIGRATOR_IQN}) == []
    assert lio.other_initiators(a, [HOST_IQN]) == []


def test_an_acl_without_luns_gives_the_host_no_disk_and_a_later_lun_needs_a_scan(lab_env, backing_dir):
    assert lio.ensure_node_acl(lab.DESTINATION_IQN, HOST_IQN) is True
    assert lio.ensure_node_acl(lab.DESTINATION_IQN, HOST_IQN) is False
    assert os.listdir(f"{DESTINATION_TPG}/acls") == [HOST_IQN]
    with scsi_scan_logging():
        session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
        udev.settle()
    if os.environ.get("BLOCKMIG_LAB_RUNNER") == "qemu":  # the UML kernel has no SCSI logging
        session_dir = os.path.realpath(f"/sys/class/iscsi_session/session{session.sid}/device")
        host = os.path.basename(os.path.dirname(session_dir))
        log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
        assert f"scsi {host[len('host'):]}:0:0:0: scsi scan: peripheral device type of 31, no device added" in log
    # LIO answers for LUN 0 with its virtual LUN 0 ("not connected": peripheral qualifier 1,
    # type 0x1f) and REPORT LUNS lists only that; Linux adds no SCSI device for it (and drops
    # the empty SCSI target), not even on an explicit scan.
    assert scsi_devices(session) == [] and iscsi.session_disks(session) == {}
    assert not glob.glob(f"/sys/class/iscsi_session/session{session.sid}/device/target*")
    iscsi.rescan_session(session)
    udev.settle()
    assert scsi_devices(session) == []

    volume = lio.create_volume(lab.DESTINATION_IQN, "lab-late", 16 * MIB, os.path.join(backing_dir, "late.img"), lun=0)
    lio.export_volume(volume, HOST_IQN)
    time.sleep(3)
    assert iscsi.session_disks(session) == {}  # mapped while logged in: nothing appears by itself
    disk = scan_for(session, 0)
    assert udev.disk_wwid(disk) == volume.wwid

    assert lio.remove_node_acl_if_empty(lab.DESTINATION_IQN, HOST_IQN) is False  # it maps a LUN now
    assert lio.remove_node_acl_if_empty(lab.DESTINATION_IQN, MIGRATOR_IQN) is False  # it has no ACL


def test_a_geometry_the_kernel_refuses_leaves_nothing_behind(lab_env, backing_dir):
    backing = os.path.join(backing_dir, "refused.img")
    with pytest.raises(ArrayError, match="optimal_sectors=99999999"):
        lio.create_volume(lab.DESTINATION_IQN, "lab-refused", 16 * MIB, backing, lun=0,
                          geometry={"block_size": "4096", "optimal_sectors": "99999999"})
    assert not glob.glob(f"{CONFIGFS}/core/*/lab-refused")
    assert os.listdir(f"{DESTINATION_TPG}/lun") == [] and not os.path.exists(backing)
    with pytest.raises(ArrayError, match="no_such_attribute"):
        lio.create_volume(lab.DESTINATION_IQN, "lab-refused", 16 * MIB, backing, geometry={"no_such_attribute": "1"})
    assert not os.path.exists(backing)

    image = os.path.join(backing_dir, "device.img")
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    loop = subprocess.run(["losetup", "--find", "--show", "--sector-size=4096", image],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        # a value the kernel itself refuses on a block volume
        with pytest.raises(ArrayError, match="refuses emulate_tpu=maybe on block volume lab-refused"):
            lio.create_volume(lab.DESTINATION_IQN, "lab-refused", 16 * MIB, loop, lun=0,
                              geometry={"emulate_tpu": "maybe"})
        assert not glob.glob(f"{CONFIGFS}/core/*/lab-refused") and os.listdir(f"{DESTINATION_TPG}/lun") == []
        # 512-byte blocks on a 4096-byte device: the kernel would take it; blockmig refuses up front
        with pytest.raises(ArrayError, match="4096-byte logical blocks"):
            lio.check_backing_device_geometry(loop, {"block_size": "512"})
        with pytest.raises(ArrayError, match="4096-byte logical blocks"):
            lio.create_volume(lab.DESTINATION_IQN, "lab-refused", 16 * MIB, loop, geometry={"block_size": "512"})
        # a fileio volume's default optimal_sectors (16384) is above what iblock takes from the
        # device (2560); another write cache setting than the device's the kernel refuses too
        fileio = {**lio.volume_geometry(lab.SOURCE_VOLUME), "block_size": "4096"}
        assert fileio["optimal_sectors"] == "16384"
        with pytest.raises(ArrayError, match="optimal_sectors 16384"):
            lio.check_backing_device_geometry(loop, fileio)
        other_cache = "0" if lio.backing_device_limits(loop)["emulate_write_cache"] == "1" else "1"
        with pytest.raises(ArrayError, match=f"emulate_write_cache {other_cache}"):
            lio.check_backing_device_geometry(loop, {"emulate_write_cache": other_cache})
        assert not glob.glob(f"{CONFIGFS}/core/*/lab-refused")
        lio.check_backing_device_geometry(loop, {"block_size": "4096", "optimal_sectors": "2560"})
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)


def test_block_backstore_on_loop_devices_of_512_and_4096_byte_blocks(lab_env, backing_dir):
    session = source_session()
    for lun, block_size in ((1, 512), (2, 4096)):
        volume = lab.add_source_volume(f"lab-block-{block_size}", 16 * MIB, backing_dir, lun=lun,
                                       backstore="block", block_size=block_size)
        assert volume.plugin == "block" and volume.backing.startswith("/dev/loop")
        geometry = lio.volume_geometry(volume)
        assert geometry["block_size"] == geometry["hw_block_size"] == str(block_size)
        # what the planner predicts from the device is what iblock took from it
        limits = lio.backing_device_limits(volume.backing)
        assert limits == {name: geometry[name] for name in limits}
        disk = scan_for(session, lun)
        assert host_view(disk)["queue/logical_block_size"] == str(block_size)
        # iblock's attrib says 0, the host sees the loop device's "write back": geometry says what the host sees
        assert geometry["emulate_write_cache"] == "1" and host_view(disk)["queue/write_cache"] == "write back"
        data = os.urandom(MIB)
        write_direct(f"/dev/{disk}", 2 * MIB, data)
        assert read_file(os.path.join(backing_dir, f"lab-block-{block_size}.img"), 2 * MIB, MIB) == data
    # a block volume keeps its geometry and mapping through a serial change too
    changed = lio.change_volume_serial(volume, lab.lab_serial("renamed"))
    assert (changed.plugin, changed.backing, changed.lun) == ("block", volume.backing, 2)
    assert lio.volume_geometry(changed) == geometry
    assert lio.list_mappings(changed) == [lio.Mapping(HOST_IQN, 2, False)]


def test_add_source_volume_and_lab_down_leave_nothing(backing_dir):
    lab.lab_down(backing_dir)
    status = lab.lab_up(16 * MIB, backing_dir, block_size=4096, backstore="block")
    try:
        source = lio.find_volume(lab.SOURCE_VOLUME)
        assert source.plugin == "block" and source.wwid == lab.SOURCE_WWID
        assert host_view(status["sessions"][0]["disks"]["0"])["queue/logical_block_size"] == "4096"
        extra = [
            lab.add_source_volume("lab-extra-file", 4 * MIB, backing_dir, lun=1),
            lab.add_source_volume("lab-extra-block", 4 * MIB, backing_dir, lun=2, backstore="block"),
        ]
        assert len({v.wwid for v in [source, *extra]}) == 3
        assert all(set(v.serial) <= set("0123456789abcdef") for v in extra)
        with pytest.raises(ArrayError, match="already has a LUN 2"):
            lab.add_source_volume("lab-extra-again", 4 * MIB, backing_dir, lun=2, backstore="block")
        assert not os.path.exists(os.path.join(backing_dir, "lab-extra-again.img"))
        loops = [v.backing for v in (source, extra[1])]
        assert all(os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop") for loop in loops)
    finally:
        removed = lab.lab_down(backing_dir)
    assert sum(item.startswith("loop device") for item in removed) == 2
    for name in ("lab-source", "lab-extra-file", "lab-extra-block"):
        assert not glob.glob(f"{CONFIGFS}/core/*/{name}")
    backing_files = {read_attribute(f) for f in glob.glob("/sys/block/loop*/loop/backing_file")}
    assert not [f for f in backing_files if f.startswith(backing_dir)]
    assert os.listdir(backing_dir) == []
    assert not [a for a in lio.list_arrays() if a.target_iqn in lab.LAB_TARGETS]
