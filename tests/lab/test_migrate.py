"""`blockmig migrate` on the real stack: a host reads its map while its volume moves under it."""

import json
import os
import signal
import subprocess

import pytest
from blockio import read_direct, read_file
from migrate_support import (  # noqa: F401  (migration_lab is a fixture)
    HostReader,
    add_host_volume,
    blockmig,
    copied_bytes,
    destination_backing_file,
    journal,
    migration_lab,
    report_of,
    start_blockmig,
    wait_for_journal,
)

from blockmig import lab
from blockmig.errors import GuardRefusedWrite, HostError
from blockmig.host import iscsi, multipath
from blockmig.host.udev import wait_until
from blockmig.migration import MigrationRequest, migrate


# The suspend fence moves under writers: test_switch_matrix (a flooding raw writer, ext4 and xfs appenders).
@pytest.mark.parametrize("fence", ["writeprotect", "none"])
def test_multipath_switch_under_a_reading_host(migration_lab, fence):
    with HostReader(migration_lab.device, migration_lab.data) as reader:
        result = blockmig(*migration_lab.migrate_args("--fence", fence, "--id", f"mp-{fence}"))
    assert result.returncode == 0, result.stderr
    reader.check()
    report = report_of(result)
    assert report["map"] == migration_lab.map_name and report["wwid"] == migration_lab.wwid
    assert report["size"] == migration_lab.size and report["fence"] == fence
    assert 0 < report["io_held_seconds"] < 30
    print(f"fence {fence}: host IO held {report['io_held_seconds'] * 1000:.0f} ms at the switch "
          f"({os.environ.get('BLOCKMIG_LAB_RUNNER', '?')})")
    migration_lab.assert_host_on_destination()
    events = [json.loads(line) for line in result.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "chunk"]
    assert progress and progress[-1]["bytes"] == migration_lab.size and progress[-1]["rate"] > 0
    assert "eta" in progress[0]
    status = json.loads(blockmig("status", f"mp-{fence}", "--json", check=True).stdout)
    assert status["state"] == "done" and status["report"]["volume_digest"] == report["volume_digest"]


def test_relogin_switch_under_a_reading_host(migration_lab):
    with HostReader(migration_lab.device, migration_lab.data) as reader:
        result = blockmig(*migration_lab.migrate_args("--switch", "relogin", "--id", "relogin"))
    assert result.returncode == 0, result.stderr
    reader.check()
    report = report_of(result)
    assert report["switch"] == "relogin" and 0 < report["io_held_seconds"] < 30
    print(f"relogin: host IO held {report['io_held_seconds'] * 1000:.0f} ms at the switch "
          f"({os.environ.get('BLOCKMIG_LAB_RUNNER', '?')})")
    migration_lab.assert_host_on_destination()


def _loop_device(image, size: int, block_size: int = 512) -> str:
    image.write_bytes(b"")
    os.truncate(image, size)
    loop = subprocess.run(["losetup", "--find", "--show", "--sector-size", str(block_size), str(image)],
                          capture_output=True, text=True, check=True)
    return loop.stdout.strip()


def test_destination_on_a_block_device(migration_lab, tmp_path):
    """A fileio source's geometry does not fit a loop device (refused in plan); a block-backed one does."""
    refused_device = _loop_device(tmp_path / "refused.img", migration_lab.size)
    volume = add_host_volume(migration_lab.backing_dir, "blk", migration_lab.size, lun=1, backstore="block")
    device = _loop_device(tmp_path / "destination.img", volume.size)
    try:
        args = migration_lab.migrate_args("--id", "refused")
        where = args.index("--backing-dir")
        args[where:where + 2] = ["--backing-device", refused_device]
        refused = blockmig(*args)
        assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "optimal_sectors" in refused.stderr and refused_device in refused.stderr, refused.stderr

        args = volume.migrate_args("--id", "blockdev")
        where = args.index("--backing-dir")
        args[where:where + 2] = ["--backing-device", device]
        result = blockmig(*args)
        assert result.returncode == 0, result.stderr
        assert report_of(result)["destination"]["backing"] == device
        assert (tmp_path / "destination.img").read_bytes() == volume.data
        human = blockmig("status", "blockdev", check=True).stdout
        assert human.startswith("blockdev: done") and device in human
    finally:
        lab.lab_down(migration_lab.backing_dir)  # releases the loop devices before they are detached
        subprocess.run(["losetup", "--detach", device], check=True)
        subprocess.run(["losetup", "--detach", refused_device], check=True)


def test_worm_write_protects_the_destination_afterwards(migration_lab):
    result = blockmig(*migration_lab.migrate_args("--worm", "--id", "worm"))
    assert result.returncode == 0, result.stderr
    status = lab.lab_status()
    destination = next(a for a in status["arrays"] if a["target"] == lab.DESTINATION_IQN)
    mappings = destination["volumes"][0]["mappings"]
    assert [(m["initiator"], m["write_protect"]) for m in mappings] == [(iscsi.read_initiator_name(), True)]
    fd = os.open(migration_lab.device, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap

        buffer = mmap.mmap(-1, 4096)
        with pytest.raises(OSError):
            os.pwritev(fd, [buffer], 0)
    finally:
        os.close(fd)


def test_guard_refuses_a_write_at_the_wrong_address_during_a_migration(migration_lab):
    """In-process: after the third chunk a stray write is sent to the guard; it is refused, the copy goes on."""
    refusals = []

    def stray_write(guard, ack):
        if len(refusals) == 0 and ack.reserved_address >= 3 * 1024 * 1024:
            wrong = ack.reserved_address + 1024 * 1024
            try:
                guard.write(wrong, b"\xff" * 4096)
            except GuardRefusedWrite as exc:
                refusals.append(exc)

    request = MigrationRequest(
        device=migration_lab.device,
        to_target=lab.DESTINATION_IQN,
        to_portal="{}:{}".format(*lab.DESTINATION_PORTAL),
        backing_dir=migration_lab.backing_dir,
        chunk_size=1024 * 1024,
        migration_id="stray",
        mode="offline",
    )
    report = migrate(request, after_chunk=stray_write)
    assert len(refusals) == 1
    refused = refusals[0]
    assert refused.designated == refused.reserved + 1024 * 1024
    assert str(refused.designated) in str(refused) and str(refused.reserved) in str(refused)
    assert report["volume_digest"]
    migration_lab.assert_host_on_destination()


def _arrays_and_host():
    status = lab.lab_status()
    return status["arrays"], status["sessions"], [(m["name"], len(m["paths"])) for m in status["maps"]]


@pytest.mark.parametrize(
    "case",
    ["unknown device", "unknown target", "wrong portal", "no room", "bad chunk size"],
)
def test_bad_input_is_one_line_and_changes_nothing(migration_lab, tmp_path, case):
    args = migration_lab.migrate_args("--id", "bad")
    if case == "unknown device":
        args[1] = "/dev/mapper/nosuchmap"
    elif case == "unknown target":
        args[args.index("--to-target") + 1] = "iqn.2026-11.lab.blockmig:nowhere"
    elif case == "wrong portal":
        args[args.index("--to-portal") + 1] = "127.0.0.9:3260"
    elif case == "no room":
        small = tmp_path / "small"
        small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], check=True)
        args[args.index("--backing-dir") + 1] = str(small)
    elif case == "bad chunk size":
        args[args.index("--chunk-size") + 1] = "1000"
    before = _arrays_and_host()
    try:
        result = blockmig(*args)
    finally:
        if case == "no room":
            subprocess.run(["umount", str(tmp_path / "small")], check=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockmig: error: "), result.stderr
    assert _arrays_and_host() == before
    assert not os.path.exists(os.path.join(os.environ["BLOCKMIG_STATE_DIR"], "bad"))


def test_refused_login_leaves_both_arrays_as_they_were(migration_lab):
    """The destination refuses the migrator's login (its TPG disabled): one line, nothing left behind."""
    import rtslib_fb

    before = _arrays_and_host()
    tpg = next(t for t in rtslib_fb.FabricModule("iscsi").targets if t.wwn == lab.DESTINATION_IQN).tpgs
    tpg = next(iter(tpg))
    tpg.enable = False
    try:
        result = blockmig(*migration_lab.migrate_args("--id", "refused"))
    finally:
        tpg.enable = True
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lab.DESTINATION_IQN in lines[0], result.stderr
    assert _arrays_and_host() == before
    assert journal("refused")["state"] == "failed"
    assert not [i for i in iscsi.list_ifaces() if i.startswith("blockmig-")]
    # The failed migration can be rolled back (a no-op now), after which a new one may start.
    assert blockmig("rollback", "refused").returncode == 0


def test_second_migration_of_the_same_volume_is_refused(migration_lab):
    first = start_blockmig(*migration_lab.migrate_args("--id", "first", "--max-rate", "1M"))
    try:
        wait_for_journal("first", lambda j: copied_bytes("first") > 0)
        # held still (it keeps its lock), so what changes meanwhile is the refused ones' doing: once a CI
        # run's loaded guest ran the two refused commands slower than the first's 16 s copy went on
        os.kill(first.pid, signal.SIGSTOP)
        before = _arrays_and_host()
        second = blockmig(*migration_lab.migrate_args("--id", "second"))
        assert second.returncode != 0
        assert "already running (migration first" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        resumed = blockmig("resume", "first")
        assert resumed.returncode != 0 and "already running" in resumed.stderr, resumed.stderr
        assert _arrays_and_host() == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    migration_lab.assert_host_on_destination()


def test_host_not_logged_in_to_the_source_is_one_line(migration_lab):
    """The map is still there (held open, queueing) but the host has no session to the source."""
    holder = os.open(migration_lab.device, os.O_RDONLY)
    session = next(s for s in iscsi.sessions() if s.target_iqn == lab.SOURCE_IQN)
    try:
        iscsi.logout_safely(session)
        before = _arrays_and_host()
        result = blockmig(*migration_lab.migrate_args("--id", "nologin"))
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not logged in" in lines[0], result.stderr
        assert _arrays_and_host() == before
    finally:
        session = iscsi.login(lab.SOURCE_IQN, *lab.SOURCE_PORTAL)
        iscsi.wait_for_session_disk(session, lab.SOURCE_LUN)
        os.close(holder)


def test_relogin_of_a_host_without_multipath(migration_lab):
    """The host uses the bare SCSI disk (its WWID blacklisted for multipathd): relogin moves it."""
    drop_in = "/etc/multipath/conf.d/test-no-multipath.conf"
    os.makedirs(os.path.dirname(drop_in), exist_ok=True)
    with open(drop_in, "w") as handle:
        handle.write(f'blacklist {{\n    wwid "{migration_lab.wwid}"\n}}\n')
    try:
        multipath.reconfigure()  # multipathd drops the now blacklisted map by itself, mostly:
        try:
            wait_until(lambda: multipath.map_for_wwid(migration_lab.wwid) is None, "the map to go", 15)
        except HostError:  # its one flush can meet a udev probe of the reloaded map ("in use"; seen under load)
            multipath.flush_map(migration_lab.map_name)
        source_disk = next(
            disk for s in iscsi.sessions() if s.target_iqn == lab.SOURCE_IQN for disk in iscsi.session_disks(s).values()
        )
        refused = blockmig(*[a if a != migration_lab.device else f"/dev/{source_disk}"
                             for a in migration_lab.migrate_args("--id", "nomap-mp")])
        assert refused.returncode == 2 and "use --switch relogin" in refused.stderr, refused.stderr
        args = [a if a != migration_lab.device else f"/dev/{source_disk}" for a in migration_lab.migrate_args(
            "--id", "nomap", "--switch", "relogin")]
        result = blockmig(*args)
        assert result.returncode == 0, result.stderr
        report = report_of(result)
        assert report["map"] is None and report["io_held_seconds"] is None
        new_disk = report["host_disk"]
        sessions = [s for s in iscsi.sessions() if s.target_iqn in (lab.SOURCE_IQN, lab.DESTINATION_IQN)]
        assert [(s.target_iqn, list(iscsi.session_disks(s).values())) for s in sessions] == [
            (lab.DESTINATION_IQN, [new_disk])
        ]
        assert read_direct(f"/dev/{new_disk}", 0, migration_lab.size) == migration_lab.data
        assert read_file(destination_backing_file(migration_lab.backing_dir), 0, migration_lab.size) == migration_lab.data
    finally:
        os.unlink(drop_in)
        multipath.reconfigure()
