"""The host side hardened (issue 16) on the real stack: bind mounts, other mount namespaces, a used bare disk
under relogin, IPv6 and host-name portals, a creation killed half way, two processes on one control
plane, a command that hangs inside the hold.

Each case asserts what an admin cares about: the migration finishes (or is refused, or reverts) with the
host on one side with its data, the filesystem clean, nothing of blockmig left behind where it says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from migrate_support import (  # noqa: F401  (migration_lab is a fixture)
    KERNEL_BACKSTORE,
    MiB,
    add_host_volume,
    blockmig,
    blockmig_env,
    journal,
    migration_lab,
    report_of,
    start_blockmig,
    wait_for_journal,
    wait_until_stopped,
)
from workloads import FsAppender

from blockmig import lab
from blockmig.array import lio
from blockmig.errors import HostError
from blockmig.host import iscsi, multipath, udev
from blockmig.host.control_plane import HostControlPlane

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _is_frozen(path: str) -> bool:
    """A second FIFREEZE of a frozen filesystem fails with EBUSY; one that succeeds is undone at once."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            if exc.errno == 16:
                return True
            raise
        fcntl.ioctl(fd, FITHAW, 0)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def _in_another_mount_namespace(device: str, mountpoint: str, *options: str):
    """A process in a mount namespace of its own mounts `device` there alone, as a container would."""
    os.makedirs(mountpoint, exist_ok=True)
    script = f"mount {' '.join(options)} {device} {mountpoint} && echo ready && read line; umount {mountpoint}"
    process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready", "the namespace's mount failed"
        yield process.pid
    finally:
        process.stdin.close()
        process.wait(timeout=60)


@pytest.fixture
def fs_volume(lab_env, backing_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    return add_host_volume(backing_dir, "fs-hardening", 64 * MiB, lun=1)


# -- bind mounts and other mount namespaces -------------------------------------------------------------


def test_a_bind_mounted_filesystem_migrates_with_the_suspend_fence(fs_volume, tmp_path):
    """The container layout: the filesystem mounted, and bind-mounted elsewhere; every freeze used to fail EBUSY."""
    mountpoint, bind = tmp_path / "mnt", tmp_path / "bind"
    bind.mkdir()
    appender = FsAppender(fs_volume.device, "ext4", str(mountpoint))
    try:
        with appender:
            subprocess.run(["mount", "--bind", str(mountpoint), str(bind)], check=True)
            result = blockmig(*fs_volume.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", "bind"))
            assert result.returncode == 0, result.stderr
            subprocess.run(["umount", str(bind)], check=True)
        print(appender.summary())
        appender.check()  # no IO error, every acknowledged line there, fsck clean
    finally:
        subprocess.run(["umount", str(bind)], capture_output=True)
        appender.close()
    assert journal("bind")["steps"]["switch"]["facts"]["mountpoints"] == [str(mountpoint)]
    assert report_of(result)["destination"]["target"] == lab.DESTINATION_IQN


def test_a_mount_in_another_namespace_is_a_user_and_is_frozen(fs_volume, tmp_path):
    subprocess.run(["mkfs.ext4", "-q", "-F", fs_volume.device], check=True)
    mountpoint = str(tmp_path / "container")
    with _in_another_mount_namespace(fs_volume.device, mountpoint) as pid:
        refused = blockmig(*fs_volume.migrate_args(*KERNEL_BACKSTORE, "--id", "ns-wp"))
        line = _one_line(refused.stderr)
        assert refused.returncode == 2 and "--fence writeprotect would fail every write" in line, line
        assert f"ext4 on {mountpoint} in the mount namespace of pid {pid} mounted read-write" in line, line
        assert not os.path.exists(os.path.join(os.environ["BLOCKMIG_STATE_DIR"], "ns-wp"))
        process = start_blockmig(*fs_volume.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", "ns", "--switch-timeout", "60"),
                                 stop_at="switch:held")
        try:
            wait_until_stopped(process)
            frozen = journal("ns")["frozen"]
            assert frozen == [f"/proc/{pid}/root{mountpoint}"]
            assert _is_frozen(frozen[0])
        finally:
            process.send_signal(signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert not _is_frozen(f"/proc/{pid}/root{mountpoint}")
        with open(f"/proc/{pid}/root{mountpoint}/after-the-switch", "w") as handle:
            handle.write("written through the container's mount\n")
    fsck = subprocess.run(["e2fsck", "-fn", fs_volume.device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# -- relogin of a bare disk ---------------------------------------------------------------------------


@contextlib.contextmanager
def _bare_source_disk(migration_lab):
    """The host uses the bare SCSI disk (its WWID blacklisted for multipathd)."""
    drop_in = "/etc/multipath/conf.d/test-hardening-no-multipath.conf"
    os.makedirs(os.path.dirname(drop_in), exist_ok=True)
    with open(drop_in, "w") as handle:
        handle.write(f'blacklist {{\n    wwid "{migration_lab.wwid}"\n}}\n')
    try:
        udev.settle()  # udev's probe after the fixture's writes holds the map: multipathd would keep it
        multipath.reconfigure()
        try:
            udev.wait_until(lambda: multipath.map_for_wwid(migration_lab.wwid) is None, "the map to go", 10)
        except HostError:  # it was in use at the reconfigure: multipathd does not try again by itself
            found = multipath.map_for_wwid(migration_lab.wwid)
            if found is not None:
                multipath.flush_map(found.name, timeout=30)
        yield next(disk for s in iscsi.sessions() if s.target_iqn == lab.SOURCE_IQN
                   for disk in iscsi.session_disks(s).values())
    finally:
        os.unlink(drop_in)
        multipath.reconfigure()


def _nothing_made(migration_lab, migration_id: str) -> None:
    assert not os.path.exists(os.path.join(os.environ["BLOCKMIG_STATE_DIR"], migration_id))
    destination = lio.find_array(lab.DESTINATION_IQN)
    assert [v for v in lio.list_volumes() if v.target_iqn == destination.target_iqn] == []
    assert glob.glob(os.path.join(migration_lab.backing_dir, "blockmig-*")) == []
    assert not [i for i in iscsi.list_ifaces() if i.startswith("blockmig-")]


def test_relogin_of_a_used_bare_disk_is_refused_at_plan(migration_lab, tmp_path):
    with _bare_source_disk(migration_lab) as disk:
        device = f"/dev/{disk}"
        args = [a if a != migration_lab.device else device
                for a in migration_lab.migrate_args(*KERNEL_BACKSTORE, "--switch", "relogin", "--id", "used")]
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        mountpoint = tmp_path / "ro"
        mountpoint.mkdir()
        subprocess.run(["mount", "-o", "ro", device, str(mountpoint)], check=True)
        try:
            refused = blockmig(*args)
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
        line = _one_line(refused.stderr)
        assert refused.returncode == 2 and f"ext4 on {mountpoint} mounted read-only" in line, line
        assert "--switch relogin" in line and "I/O errors" in line, line
        _nothing_made(migration_lab, "used")
        reader = subprocess.Popen(["sh", "-c", f"exec 3<{device}; echo open; read line"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "open"
            refused = blockmig(*args)
        finally:
            reader.stdin.close()
            reader.wait(timeout=30)
        line = _one_line(refused.stderr)
        assert refused.returncode == 2 and f"pid {reader.pid} (sh) has it open for reading" in line, line
        _nothing_made(migration_lab, "used")
        result = blockmig(*args)  # unused now: it moves
        assert result.returncode == 0, result.stderr


# -- portals --------------------------------------------------------------------------------------------


IPV6_IQN = "iqn.2026-11.lab.blockmig:destination-v6"


@pytest.fixture
def ipv6_destination(migration_lab):
    """A third array whose only portal is [::1]:3260 (::1 put on lo if the guest has none)."""
    addresses = subprocess.run(["ip", "-6", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    if "::1/128" not in addresses:
        subprocess.run(["sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=0"], capture_output=True)
        subprocess.run(["ip", "-6", "addr", "add", "::1/128", "dev", "lo"], check=True)
    lio.create_array(IPV6_IQN, "::1", 3260)
    try:
        yield IPV6_IQN
    finally:
        for session in [s for s in iscsi.sessions() if s.target_iqn == IPV6_IQN]:
            multipath.flush_maps_on(list(iscsi.session_disks(session).values()))
            iscsi.logout_safely(session)
        with contextlib.suppress(Exception):
            lio.remove_array(IPV6_IQN)


def test_an_ipv6_portal(migration_lab, ipv6_destination):
    array = lio.find_array(ipv6_destination)
    assert array.portals == (("::1", 3260),)
    args = migration_lab.migrate_args(*KERNEL_BACKSTORE, "--id", "v6")
    args[args.index("--to-target") + 1] = ipv6_destination
    args[args.index("--to-portal") + 1] = "[::1]:3260"
    result = blockmig(*args)
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["destination"]["portal"] == "[::1]:3260"
    sessions = [s for s in iscsi.sessions() if s.target_iqn == ipv6_destination]
    assert [(iscsi.normal_address(s.portal_ip), s.port) for s in sessions] == [("::1", 3260)]
    assert multipath.map_for_wwid(migration_lab.wwid).name == migration_lab.map_name
    with open(migration_lab.device, "rb") as handle:
        assert handle.read(1 * MiB) == migration_lab.data[:1 * MiB]


def test_a_host_name_portal(migration_lab):
    name = "blockmig-lab-destination"
    hosts = None
    if os.path.exists("/etc/hosts"):  # the lab guest has none
        with open("/etc/hosts") as handle:
            hosts = handle.read()
    with open("/etc/hosts", "a") as handle:
        handle.write(f"\n{lab.DESTINATION_PORTAL[0]} {name}\n")
    try:
        refused = blockmig(*[a if a != "{}:{}".format(*lab.DESTINATION_PORTAL) else "no-such-host.invalid:3260"
                             for a in migration_lab.migrate_args(*KERNEL_BACKSTORE, "--id", "bad-name")])
        line = _one_line(refused.stderr)
        assert refused.returncode == 2 and "cannot resolve 'no-such-host.invalid'" in line, line
        result = blockmig(*[a if a != "{}:{}".format(*lab.DESTINATION_PORTAL) else f"{name}:3260"
                            for a in migration_lab.migrate_args(*KERNEL_BACKSTORE, "--id", "by-name")])
    finally:
        if hosts is None:
            os.unlink("/etc/hosts")
        else:
            with open("/etc/hosts", "w") as handle:
                handle.write(hosts)
    assert result.returncode == 0, result.stderr
    assert report_of(result)["destination"]["portal"] == "{}:{}".format(*lab.DESTINATION_PORTAL)
    migration_lab.assert_host_on_destination()


# -- a creation killed half way -------------------------------------------------------------------------


@pytest.mark.parametrize("point, then, backstore", [
    ("create:backing-file-made", "resume", "kernel"),
    ("create:backing-file-made", "rollback", "kernel"),
    ("create:storage-object-made", "resume", "kernel"),
    ("create:storage-object-made", "rollback", "kernel"),
    ("export:acl-made", "rollback", "kernel"),
    ("create:handler-serving", "resume", "handler"),
    ("create:handler-serving", "rollback", "handler"),
    ("export:acl-made", "resume", "handler"),
    ("copy:handing-to-kernel", "resume", "handler"),
    ("copy:handing-to-kernel", "rollback", "handler"),
])
def test_kill_inside_create_destination(migration_lab, point, then, backstore):
    """Killed while the destination is made (or, with blockmig's handler, handed to the kernel's backstore)."""
    process = start_blockmig(*migration_lab.migrate_args("--id", "half", "--backstore", backstore), stop_at=point)
    wait_until_stopped(process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    result = blockmig(then, "half")
    assert result.returncode == 0, result.stderr
    if then == "resume":
        migration_lab.assert_host_on_destination()
    else:
        migration_lab.assert_host_on_source_only()  # no backing file, no volume, no session, no iface
        assert journal("half")["state"] == "rolled_back"
        migrator = journal("half")["migrator"]["initiator"]
        assert migrator not in lio.list_acls(lab.DESTINATION_IQN), "the migrator's ACL was left"


# -- the control plane across processes -------------------------------------------------------------------


def test_another_process_waits_for_the_control_plane_and_never_resumes_a_held_map(migration_lab):
    """blockmig stopped inside its hold holds the host-wide lock; a suspend fence's map refuses a reconfigure."""
    process = start_blockmig(*migration_lab.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", "cp", "--switch-timeout", "60"),
                             stop_at="switch:held")
    try:
        wait_until_stopped(process)
        assert multipath.is_suspended(migration_lab.map_name)
        with pytest.raises(HostError) as waited:
            with HostControlPlane(wait=1):
                pass
        assert f"still held by blockmig pid {process.pid} since" in str(waited.value)
    finally:
        process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    migration_lab.assert_host_on_destination()


def test_reconfigure_is_refused_while_a_suspend_fence_holds_a_map(migration_lab):
    """The suspend fence holds the map through the copy (no control-plane lock then): another process's
    reconfigure, which would resume it, is refused by name, and the map stays suspended."""
    process = start_blockmig(*migration_lab.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", "fenced", "--max-rate", "2M"))
    try:
        wait_for_journal("fenced", lambda data: "copy" in data["steps"])
        assert multipath.is_suspended(migration_lab.map_name)
        other = subprocess.run(
            [sys.executable, "-c", "from blockmig.host import multipath; multipath.reconfigure(settle_for=1)"],
            capture_output=True, text=True, env=blockmig_env(), timeout=120,
        )
        assert other.returncode != 0
        assert f"not running multipathd reconfigure: map(s) {migration_lab.map_name} suspended" in other.stderr
        assert multipath.is_suspended(migration_lab.map_name)
    finally:
        stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    migration_lab.assert_host_on_destination()


# -- a command that hangs inside the hold -------------------------------------------------------------------


def test_a_hanging_command_in_the_hold_is_cut_and_the_switch_reverts(migration_lab, tmp_path, monkeypatch):
    """A fake multipathd earlier in PATH hangs on the hold's `del path` (once): cut at the switch timeout."""
    real = shutil.which("multipathd")
    marker = tmp_path / "hang-once"
    marker.write_text("")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "multipathd").write_text(
        f'#!/bin/sh\ncase "$*" in "del path"*) if [ -e {marker} ]; then rm {marker}; exec sleep 600; fi;; esac\n'
        f'exec {real} "$@"\n')
    os.chmod(fake / "multipathd", 0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    result = blockmig(*migration_lab.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", "hang", "--switch-timeout", "15"),
                      timeout=300)
    line = _one_line(result.stderr)
    assert result.returncode != 0 and "switch reverted, the host is on the source again" in line, line
    cut = re.search(r"multipathd del path \S+ did not finish within ([0-9.]+) s \(the time left in the switch "
                    rf"timeout of map {migration_lab.map_name}\); killed", line)
    assert cut and float(cut.group(1)) <= 15, line
    assert not marker.exists()
    assert journal("hang")["switch_reverts"] == 1
    migration_lab.assert_host_on_source()
    monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])
    resumed = blockmig("resume", "hang")
    assert resumed.returncode == 0, resumed.stderr
    migration_lab.assert_host_on_destination()
