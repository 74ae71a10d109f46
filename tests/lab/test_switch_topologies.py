"""Host shapes beyond one volume: several volumes of one host, other LUNs in use, LUN numbers that differ."""

import os

import pytest
from migrate_support import (  # noqa: F401  (migration_lab is a fixture)
    KERNEL_BACKSTORE,
    SLOW_LAB,
    HostReader,
    add_host_volume,
    blockmig,
    migration_lab,
    report_of,
)
from workloads import RawWriter

from blockmig import lab
from blockmig.array import lio
from blockmig.host import iscsi


def _host_sessions(target: str) -> list[iscsi.Session]:
    return [s for s in iscsi.sessions() if s.target_iqn == target and s.iface == "default"]


def test_two_volumes_moved_one_after_another_to_one_destination(migration_lab, backing_dir):
    """The second switch reuses the host's session to the destination (a targeted scan, no login); then the
    source's session, carrying nothing, goes. (A third volume took 100 s more under TCG and showed nothing
    the second does not.)"""
    volumes = [migration_lab, add_host_volume(backing_dir, "vol1", lun=1)]
    for number, volume in enumerate(volumes):
        others = [v for v in volumes if v is not volume]
        readers = [HostReader(v.device, v.data) for v in others]
        for reader in readers:
            reader.__enter__()
        try:
            with RawWriter(volume.device, volume.size, region=(volume.size // 2, volume.size // 2)) as writer:
                result = blockmig(*volume.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", f"three-{number}"))
        finally:
            for reader in readers:
                reader.__exit__(None, None, None)
        assert result.returncode == 0, result.stderr
        report = report_of(result)
        print(f"volume {number + 1} of 2: host IO held {report['io_held_seconds'] * 1000:.0f} ms")
        for reader in readers:
            reader.check()  # the other volumes, on either array, never noticed
        volume.assert_host_on_destination(writer_region=(volume.size // 2, volume.size), report=report,
                                          other_source_volumes=number < 1)
        writer.check(volume.read_through_map)
        assert len(_host_sessions(lab.DESTINATION_IQN)) == 1
        volume.data = volume.read_through_map(0, volume.size)  # what the later checks expect from it now
    assert _host_sessions(lab.SOURCE_IQN) == [], "the source session stays although it carries nothing"
    source = lio.list_volumes(lab.SOURCE_IQN)
    assert all(lio.list_mappings(v) == [] for v in source), "a source volume is still mapped to the host"


def test_host_lun_numbers_that_differ_from_the_array(migration_lab, backing_dir):
    """Array LUN 3 is the host's LUN 7; the array's LUN 7 is another volume the host uses as its LUN 3."""
    moving = add_host_volume(backing_dir, "moving", lun=3, mapped_lun=7)
    bystander = add_host_volume(backing_dir, "bystander", lun=7, mapped_lun=3)
    with HostReader(bystander.device, bystander.data) as reader:
        result = blockmig(*moving.migrate_args(*KERNEL_BACKSTORE, "--id", "luns"))
    assert result.returncode == 0, result.stderr
    reader.check()
    report = report_of(result)
    assert report["source"]["host_lun"] == 7
    moving.assert_host_on_destination(report=report, other_source_volumes=True)
    destination_session = _host_sessions(lab.DESTINATION_IQN)[0]
    assert iscsi.session_disks(destination_session) == {report["destination"]["host_lun"]: report["host_disk"]}
    assert bystander.read_through_map(0, bystander.size) == bystander.data
    assert migration_lab.read_through_map(0, migration_lab.size) == migration_lab.data


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_second_initiator_on_the_source_is_refused(migration_lab, mode):
    """Another host mapped to the source could write it behind the copy (offline) or behind the handler's
    dirty map (online), and would be left on the source: refused before anything is made."""
    source = lio.find_volume(lab.SOURCE_VOLUME)
    other = "iqn.2026-11.lab.blockmig:other-host"
    lio.export_volume(source, other)
    try:
        before = lab.lab_status()
        result = blockmig(*migration_lab.migrate_args("--id", "second-initiator", mode=mode))
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and other in result.stderr, result.stderr
        assert lab.lab_status() == before
        assert not os.path.exists(os.path.join(os.environ["BLOCKMIG_STATE_DIR"], "second-initiator"))
    finally:
        lio.unexport_volume(source, other)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_an_existing_host_session_to_the_destination_is_kept(migration_lab, backing_dir, mode):
    """The host already uses another volume of the destination array: the switch (online: the join and
    the hand-over) scans it, the session stays, the resident volume's disk too."""
    resident = lio.create_volume(lab.DESTINATION_IQN, "resident", 16 * 1024 * 1024,
                                 os.path.join(backing_dir, "resident.img"), serial="5e51de27000000000000000000000001")
    lio.export_volume(resident, migration_lab.host_initiator)
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    resident_disk = iscsi.find_session_disk(session, resident.lun, resident.wwid, 30)
    extra = KERNEL_BACKSTORE if mode == "offline" else ("--max-hold", "20") if SLOW_LAB else ()
    result = blockmig(*migration_lab.migrate_args(*extra, "--id", "existing", mode=mode), timeout=900)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["mode"] == ("offline" if mode == "offline" else "pass-through")
    assert [s.sid for s in _host_sessions(lab.DESTINATION_IQN)] == [session.sid]
    disks = iscsi.session_disks(session)
    assert disks[resident.lun] == resident_disk and disks[report["destination"]["host_lun"]] == report["host_disk"]
    migration_lab.assert_host_on_destination(report=report)
