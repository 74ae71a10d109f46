"""The guest stack blockmig relies on is there and answering (scripts/labvm's guest contract).

These run inside the lab VM (`scripts/labvm run -- python3 -m pytest tests/lab`). Outside it
they fail: a lab test that cannot reach the real stack must not pass.
"""

import os
import subprocess
from pathlib import Path

ISCSIADM_NO_SESSIONS = 21  # iscsiadm's ISCSI_ERR_NO_OBJS_FOUND


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_runs_on_a_lab_host():
    # uml or qemu: the lab VM of scripts/labvm; vagrant: the box of vagrant/Vagrantfile
    assert os.environ.get("BLOCKMIG_LAB_RUNNER") in ("uml", "qemu", "vagrant")
    assert Path("/proc/sys/kernel/hostname").read_text().strip() == "blockmig-lab"


def test_configfs_is_mounted_with_the_lio_target_core():
    mounts = Path("/proc/mounts").read_text().split("\n")
    assert any(line.split()[1:3] == ["/sys/kernel/config", "configfs"] for line in mounts if line)
    target = Path("/sys/kernel/config/target")
    assert (target / "core").is_dir()
    assert (target / "version").read_text().startswith("Target Engine Core")


def test_rtslib_creates_and_deletes_an_iscsi_target():
    script = """
import rtslib_fb
target = rtslib_fb.Target(rtslib_fb.FabricModule("iscsi"), "iqn.2026-11.lab.blockmig:stack-test", mode="create")
print(target.exists, target.path)
target.delete()
print(target.exists)
"""
    proc = run("python3", "-c", script)
    assert proc.returncode == 0, proc.stderr
    created, deleted = proc.stdout.splitlines()
    assert created == "True /sys/kernel/config/target/iscsi/iqn.2026-11.lab.blockmig:stack-test"
    assert deleted == "False"


def test_lab_modules_are_loaded():
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    expected = {
        line.strip()
        for line in Path("/etc/modules-load.d/blockmig-lab.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing_from_kernel = set(os.environ.get("BLOCKMIG_LAB_MISSING_MODULES", "").split())
    # Built into the kernel (UML has ext4 and xfs built in): present, but not in /proc/modules.
    builtin = {Path(line.strip()).name.split(".ko")[0].replace("-", "_")
               for line in Path(f"/usr/lib/modules/{os.uname().release}/modules.builtin").read_text().splitlines()}
    # Debian's UML kernel has no SCSI device handlers; every other module must be there.
    assert missing_from_kernel <= {"scsi_dh_alua"}
    assert expected - missing_from_kernel - loaded - builtin == set()
    for filesystem in ("ext4", "xfs"):
        assert filesystem in Path("/proc/filesystems").read_text().split()


def test_iscsid_answers():
    proc = run("iscsiadm", "-m", "session")
    assert proc.returncode in (0, ISCSIADM_NO_SESSIONS), proc.stderr
    if proc.returncode == ISCSIADM_NO_SESSIONS:
        assert "No active sessions" in proc.stderr


def test_initiator_name_is_the_fixed_lab_name():
    text = Path("/etc/iscsi/initiatorname.iscsi").read_text()
    assert "InitiatorName=iqn.2026-11.lab.blockmig:host" in text.splitlines()


def test_multipathd_answers():
    proc = run("multipathd", "show", "daemon")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pid ")
    config = run("multipathd", "show", "config")
    assert "find_multipaths \"off\"" in config.stdout or "find_multipaths \"no\"" in config.stdout


def test_loop_device_and_device_mapper_work():
    proc = run("dmsetup", "version")
    assert proc.returncode == 0, proc.stderr
    assert "Driver version" in proc.stdout
    assert Path("/dev/loop-control").exists()


def test_udev_is_running_and_answers():
    proc = run("udevadm", "control", "--ping")
    assert proc.returncode == 0, proc.stderr


def test_project_is_the_code_under_test():
    here = Path(__file__).resolve()
    assert Path.cwd() == here.parent.parent.parent
    if os.environ.get("BLOCKMIG_LAB_RUNNER") != "vagrant":  # labvm shares it at the host's path
        assert os.environ["PYTHONPATH"] == str(Path.cwd())
    import blockmig

    assert Path(blockmig.__file__).resolve().parent == Path.cwd() / "blockmig"
