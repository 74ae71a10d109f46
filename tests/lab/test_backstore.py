"""blockmig's own backstore (TCMU handler) on the real kernel, side by side with a kernel fileio LUN.

Each test serves a volume with `blockmig array serve` (its own process, as on an array host),
exports the handler's storage object and a fileio volume of the same geometry on the lab's
destination target, logs in as the migrator and compares what the host sees.
"""

import contextlib
import errno
import os
import signal
import subprocess
import time

import pytest
from blockio import read_direct, write_direct
from conftest import MIGRATOR_IQN
from workloads import XFS_SMALL_ENV, XFS_SMALL_SIZE, RawWriter, file_reader

from blockmig import lab
from blockmig.array import lio
from blockmig.array.tcmu import client
from blockmig.host import iscsi, udev

MIB = 1024 * 1024
THIRD_IQN = "iqn.2026-12.lab.blockmig:third"
THIRD_IFACE = "blockmig-test-third"


def _rtslib():
    import rtslib_fb

    return rtslib_fb


def _so(name):
    return next((so for so in _rtslib().RTSRoot().storage_objects if so.name == name), None)


def export_storage_object(name: str, initiators, lun: int, target_iqn: str = lab.DESTINATION_IQN) -> None:
    """What an admin does with targetcli: a LUN of the target on the object, mapped to each initiator."""
    rtslib = _rtslib()
    tpg = rtslib.TPG(rtslib.Target(rtslib.FabricModule("iscsi"), target_iqn, mode="lookup"), 1, mode="lookup")
    tpg_lun = rtslib.LUN(tpg, lun, storage_object=_so(name))
    for initiator in initiators:
        acl = rtslib.NodeACL(tpg, initiator)
        rtslib.MappedLUN(acl, lun, tpg_lun)


@pytest.fixture
def served(lab_env, backing_dir, tmp_path):
    """Start handlers with `serve(name, ...)`; all are stopped (SIGTERM) at the end, leftovers removed."""
    started = []

    def serve(name, size=None, **options):
        if "backing_device" not in options:
            options.setdefault("backing_file", os.path.join(backing_dir, f"{name}.img"))
        if options.get("backing_file"):
            options["size"] = size
        volume = client.start_served_volume(
            name, state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"), **options
        )
        started.append(volume)
        return volume

    try:
        yield serve
    finally:
        for volume in started:
            with contextlib.suppress(Exception):
                client.stop_served_volume(volume)
            for suffix in ("", "-migrator"):
                so = _so(volume.name + suffix)
                if so is not None:
                    so.delete()


def session_disk_of(iface, lun, target_iqn=lab.DESTINATION_IQN, portal=lab.DESTINATION_PORTAL):
    """/dev/sdX of `lun` as `iface` sees it (logging in the first time; the ACL must exist by then)."""
    session = iscsi.find_session(target_iqn, *portal, iface=iface)
    session = session or iscsi.login(target_iqn, *portal, iface=iface)
    iscsi.rescan_session(session)
    name = iscsi.wait_for_session_disk(session, lun)
    udev.wait_for_path(f"/sys/block/{name}/queue")
    return name


@pytest.fixture
def migrator_disks(migrator_iface):
    """`disk(lun)` -> the migrator's /dev/sdX of that destination LUN."""
    return lambda lun: session_disk_of(migrator_iface, lun)


def fileio_twin(name, size, backing_dir, lun, geometry, serial):
    volume = lab.add_source_volume(name, size, backing_dir, lun=lun, initiators=(MIGRATOR_IQN,),
                                   geometry=geometry, serial=serial, target_iqn=lab.DESTINATION_IQN,
                                   block_size=int(geometry.get("block_size", 512)))
    return volume


def sg(tool, *args, device):
    return subprocess.run([tool, *args, f"/dev/{device}"], check=True, capture_output=True, text=True).stdout


def host_identity(device):
    """What a host learns of a LU from INQUIRY and READ CAPACITY, as sg3_utils prints it."""
    return {
        "inq": sg("sg_inq", device=device),
        "vpd83": sg("sg_vpd", "-p", "0x83", device=device),
        "vpd80": sg("sg_vpd", "-p", "0x80", device=device),
        "vpdb0": sg("sg_vpd", "-p", "0xb0", device=device),
        "vpdb1": sg("sg_vpd", "-p", "0xb1", device=device),
        "vpdb2": sg("sg_vpd", "-p", "0xb2", device=device),
        "readcap": sg("sg_readcap", "-l", device=device),
        "block": "".join(f"{n}={open(f'/sys/block/{device}/queue/{n}').read()}" for n in
                         ("logical_block_size", "physical_block_size", "max_hw_sectors_kb", "rotational",
                          "discard_max_bytes", "write_cache")),
    }


@pytest.mark.parametrize("block_size,size", [(512, 16 * MIB), (4096, 16 * MIB), (512, 16 * MIB + 7 * 512)])
def test_handler_lun_looks_like_a_fileio_lun(served, migrator_disks, backing_dir, block_size, size):
    if size % block_size:
        pytest.fail("test shape error")
    geometry = {"block_size": str(block_size), "emulate_3pc": "0", "emulate_caw": "0"}
    twin_serial, handler_serial = "b10c0aa" + "0" * 25, "b10c0bb" + "0" * 25  # NAAs differ: two maps
    fileio_twin("twin", size, backing_dir, 1, geometry, serial=twin_serial)
    volume = served("handled", size, serial=handler_serial, geometry_from="twin")
    assert "handled" in volume.line and "/dev/uio" in volume.line
    export_storage_object("handled", [MIGRATOR_IQN], lun=2)
    kernel, handler = host_identity(migrator_disks(1)), host_identity(migrator_disks(2))
    for key in kernel:
        assert handler[key] == kernel[key].replace("b10c0aa", "b10c0bb"), key


def test_handler_lun_carries_ext4_and_xfs(served, migrator_disks):
    served("fs", XFS_SMALL_SIZE)
    export_storage_object("fs", [MIGRATOR_IQN], lun=1)
    device = f"/dev/{migrator_disks(1)}"
    mount = "/mnt/blockmig-backstore"
    os.makedirs(mount, exist_ok=True)
    for mkfs, check, env in (
        (["mkfs.ext4", "-q", "-F", device], ["fsck.ext4", "-f", "-n", device], None),
        (["mkfs.xfs", "-q", "-f", device], ["xfs_repair", "-n", "-o", "force_geometry", device],
         {**os.environ, **XFS_SMALL_ENV}),
    ):
        subprocess.run(mkfs, check=True, capture_output=True, env=env)
        subprocess.run(["mount", device, mount], check=True)
        try:
            payload = os.urandom(3 * MIB + 123)
            with open(f"{mount}/data", "wb") as f:
                f.write(payload)
                os.fsync(f.fileno())
        finally:
            subprocess.run(["umount", mount], check=True)
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        subprocess.run(check, check=True, capture_output=True)
        subprocess.run(["mount", device, mount], check=True)
        try:
            with open(f"{mount}/data", "rb") as f:
                assert f.read() == payload, mkfs[0]
        finally:
            subprocess.run(["umount", mount], check=True)


@pytest.fixture
def third_iface(lab_env):
    iscsi.create_iface(THIRD_IFACE, THIRD_IQN)
    try:
        yield THIRD_IFACE
    finally:
        for session in [s for s in iscsi.sessions() if s.iface == THIRD_IFACE]:
            iscsi.logout_safely(session)
        iscsi.remove_iface(THIRD_IFACE)


def backing_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def sense_of_write(device, lba):
    """sg_raw WRITE(10) of one block at `lba`: what the host's SCSI layer was answered."""
    result = subprocess.run(
        ["sg_raw", "-s", "512", "-i", "/dev/zero", f"/dev/{device}", "2a", "00",
         *(f"{b:02x}" for b in lba.to_bytes(4, "big")), "00", "00", "01", "00"],
        capture_output=True, text=True,
    )
    return result.returncode, result.stdout + result.stderr


def test_guard_in_the_array_refuses_misplaced_and_foreign_writes(served, migrator_disks, third_iface,
                                                                  backing_dir):
    volume = served("guarded", 16 * MIB, guard_initiator=MIGRATOR_IQN)
    backing = os.path.join(backing_dir, "guarded.img")
    export_storage_object("guarded-migrator", [MIGRATOR_IQN], lun=1)
    export_storage_object("guarded", [THIRD_IQN], lun=2)
    migrator, third = migrator_disks(1), session_disk_of(third_iface, 2)
    volume.client.arm_sequential(0)
    first = os.urandom(MIB)
    write_direct(f"/dev/{migrator}", 0, first)
    assert volume.client.state()["reserved"] == MIB
    with pytest.raises(OSError) as refused:
        write_direct(f"/dev/{migrator}", 4 * MIB, os.urandom(MIB))
    assert refused.value.errno == errno.EREMOTEIO  # Linux's errno for DATA PROTECT (BLK_STS_TARGET)
    code, said = sense_of_write(migrator, 3 * MIB // 512)
    assert code != 0 and "Data Protect" in said and "Write protected" in said, said
    assert backing_bytes(backing, 3 * MIB, 2 * MIB) == bytes(2 * MIB), "a refused write reached the backing"
    assert volume.client.state()["reserved"] == MIB
    write_direct(f"/dev/{migrator}", MIB, first)
    assert volume.client.state()["reserved"] == 2 * MIB
    with pytest.raises(OSError):  # the third initiator (here: the host's view) while receiving
        write_direct(f"/dev/{third}", 8 * MIB, os.urandom(4096))
    assert backing_bytes(backing, 8 * MIB, 4096) == bytes(4096)
    assert read_direct(f"/dev/{third}", 0, MIB) == first  # reads are served to it
    # the delta mode: only the next declared chunk, whole
    volume.client.arm_delta([(4 * MIB, 2 * MIB), (10 * MIB, MIB)])
    with pytest.raises(OSError):
        write_direct(f"/dev/{migrator}", 10 * MIB, os.urandom(MIB))
    write_direct(f"/dev/{migrator}", 4 * MIB, os.urandom(2 * MIB))
    write_direct(f"/dev/{migrator}", 10 * MIB, os.urandom(MIB))
    assert volume.client.state()["reserved"] is None
    volume.client.disarm()
    volume.client.hand_over()
    write_direct(f"/dev/{third}", 8 * MIB, b"\x5a" * 4096)
    assert backing_bytes(backing, 8 * MIB, 4096) == b"\x5a" * 4096


def test_kill_9_of_the_handler_loses_no_acknowledged_write(served, migrator_disks, backing_dir):
    size = 16 * MIB
    victim = served("crashy", size, guard_initiator=MIGRATOR_IQN)
    export_storage_object("crashy-migrator", [MIGRATOR_IQN], lun=1)
    disk = f"/dev/{migrator_disks(1)}"
    backing = os.path.join(backing_dir, "crashy.img")
    with RawWriter(disk, size, region=(0, 8 * MIB)) as writer:
        time.sleep(3)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        before = writer.writes
        time.sleep(2)
        restarted = served("crashy", size, guard_initiator=MIGRATOR_IQN)
        time.sleep(5)
    assert writer.writes > before, "the writer made no progress after the handler was restarted"
    writer.check(file_reader(backing))
    # the guard's reserved address survives a kill -9 too
    restarted.client.arm_sequential(8 * MIB)
    write_direct(disk, 8 * MIB, os.urandom(MIB))
    os.kill(restarted.process.pid, signal.SIGKILL)
    restarted.process.wait()
    again = served("crashy", size, guard_initiator=MIGRATOR_IQN)
    assert again.client.state()["reserved"] == 9 * MIB
    with pytest.raises(OSError):
        write_direct(disk, 12 * MIB, os.urandom(MIB))
    write_direct(disk, 9 * MIB, os.urandom(MIB))
    assert again.client.state()["reserved"] == 10 * MIB


def test_multipath_groups_the_handler_lun_with_the_source_lun_as_one_map(served, lab_env):
    """The handler's LUN with the source's serial, on the destination target, is a second path of the
    source's map (same NAA from the same serial), not a map of its own."""
    from blockmig.host import multipath

    host_iqn = iscsi.read_initiator_name()
    source = lio.find_volume(lab.SOURCE_VOLUME)
    served("mp", source.size, serial=lab.SOURCE_SERIAL, geometry_from=lab.SOURCE_VOLUME)
    export_storage_object("mp", [host_iqn], lun=1)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    try:
        disk = iscsi.wait_for_session_disk(session, 1)
        found = multipath.wait_for_map(lab.SOURCE_WWID, 2)
        topology = multipath.multipathd("show", "topology")
        assert [m for m in multipath.maps() if m.wwid == found.wwid] == [found], topology
        assert disk in {p.dev for p in multipath.paths_of_map(found.name)}, topology
    finally:
        iscsi.logout_safely(session)
