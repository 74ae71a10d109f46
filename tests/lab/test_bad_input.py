"""Bad input: one clear error line, and nothing half made or changed (arrays, host, state, named files).

Also another user of the host against blockmig's lock and state."""

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
from migrate_support import REPO, blockmig, migration_lab, start_blockmig, wait_until_stopped  # noqa: F401

from blockmig import lab
from blockmig.array import lio
from blockmig.errors import ArrayError, HostError
from blockmig.host import iscsi
from blockmig.state import VolumeLock

CONFIGFS = "/sys/kernel/config/target"
MIB = 1024 * 1024


def storage_object_names():
    return {os.path.basename(p) for p in glob.glob(f"{CONFIGFS}/core/*_*/*") if os.path.isdir(p)}


def test_unknown_wwid_is_one_array_error(lab_env):
    with pytest.raises(ArrayError, match="no volume .* WWID 36001405f{25}"):
        lio.find_volume_by_wwid("naa.6001405" + "F" * 25)


def test_volume_on_a_missing_target_leaves_nothing(lab_env, backing_dir):
    backing = os.path.join(backing_dir, "orphan.img")
    with pytest.raises(ArrayError, match="no iSCSI target iqn.2026-11.lab.blockmig:nowhere"):
        lio.create_volume("iqn.2026-11.lab.blockmig:nowhere", "orphan", 16 * MIB, backing)
    assert "orphan" not in storage_object_names()
    assert not os.path.exists(backing)


def test_volume_without_room_leaves_nothing(lab_env, backing_dir):
    st = os.statvfs(backing_dir)
    too_big = (st.f_bavail * st.f_frsize // MIB + 1) * MIB
    backing = os.path.join(backing_dir, "huge.img")
    with pytest.raises(ArrayError, match="not enough room"):
        lio.create_volume(lab.DESTINATION_IQN, "huge", too_big, backing)
    assert "huge" not in storage_object_names() and not os.path.exists(backing)
    assert os.listdir(f"{CONFIGFS}/iscsi/{lab.DESTINATION_IQN}/tpgt_1/lun") == []


def test_duplicate_names_and_luns_are_refused_without_damage(lab_env, backing_dir):
    with pytest.raises(ArrayError, match="already exists"):
        lio.create_array(lab.SOURCE_IQN, "127.0.0.1")
    with pytest.raises(ArrayError, match="already exists"):
        lio.create_volume(lab.DESTINATION_IQN, lab.SOURCE_VOLUME, 16 * MIB, os.path.join(backing_dir, "x.img"))
    with pytest.raises(ArrayError, match="already has a LUN 0"):
        lio.create_volume(lab.SOURCE_IQN, "second", 16 * MIB, os.path.join(backing_dir, "second.img"), lun=0)
    source = lio.find_volume(lab.SOURCE_VOLUME)
    with pytest.raises(ArrayError, match="already exported"):
        lio.export_volume(source, "iqn.2026-11.lab.blockmig:host")
    with pytest.raises(ArrayError, match="not exported to"):
        lio.set_mapping_write_protect(source, "iqn.2026-11.lab.blockmig:stranger", True)
    assert sorted(os.listdir(backing_dir)) == ["lab-source.img"]
    assert storage_object_names() == {lab.SOURCE_VOLUME}
    assert lio.list_mappings(source) == [lio.Mapping("iqn.2026-11.lab.blockmig:host", 0, False)]
    assert lab.lab_status()["up"]


def test_array_whose_portal_cannot_listen_is_not_half_made():
    iqn = "iqn.2026-11.lab.blockmig:busy"
    with socket.socket() as squatter:  # another program already listens on the portal's address
        squatter.bind(("127.0.0.3", 3262))
        squatter.listen()
        with pytest.raises(ArrayError, match=f"cannot create array {iqn}"):
            lio.create_array(iqn, "127.0.0.3", 3262)
    assert not os.path.exists(f"{CONFIGFS}/iscsi/{iqn}")
    with pytest.raises(ArrayError, match="not an IP address"):
        lio.create_array(iqn, "no-such-host")
    assert not os.path.exists(f"{CONFIGFS}/iscsi/{iqn}")


def test_login_to_a_missing_target_is_one_host_error(lab_env):
    missing = "iqn.2026-11.lab.blockmig:nowhere"
    with pytest.raises(HostError, match=f"portal 127.0.0.1:3260 offers no target {missing}"):
        iscsi.login(missing, *lab.SOURCE_PORTAL)
    assert iscsi.find_session(missing, *lab.SOURCE_PORTAL) is None
    assert iscsi.run_iscsiadm(["-m", "node", "-T", missing], ok=(0, 21)).returncode == 21
    with pytest.raises(HostError, match="exit 21"):
        iscsi.logout(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)  # the host has no session there


def test_removing_a_missing_array_is_one_array_error():
    with pytest.raises(ArrayError, match="no iSCSI target"):
        lio.remove_array("iqn.2026-11.lab.blockmig:nowhere")


# ---------------------------------------------------------------------------
# The bad-input matrix: the real CLI against the real stack, one line, nothing changed.


def stack_snapshot(*named_files: str) -> dict:
    """What bad input must not change: LIO (rtslib's dump), the host's sessions, ifaces and dm tables, blockmig's
    state and lock directories, the multipath drop-ins and the files the input names (bytes, or absent)."""
    from rtslib_fb import RTSRoot

    def tree(top: str, contents: bool = True) -> dict:
        found = {}
        for directory, _, files in os.walk(top):
            found[directory] = oct(os.lstat(directory).st_mode)
            for name in files:
                path = os.path.join(directory, name)
                digest = None
                if contents and os.path.isfile(path):
                    with open(path, "rb") as handle:
                        digest = hashlib.file_digest(handle, "sha256").hexdigest()
                found[path] = (digest, oct(os.lstat(path).st_mode))
        return found

    def run(*command: str) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return f"{result.returncode}\n{result.stdout}"

    files = {}
    for path in named_files:
        files[path] = open(path, "rb").read() if os.path.isfile(path) else os.path.lexists(path)
    return {
        "lio": json.dumps(RTSRoot().dump(), sort_keys=True),
        "sessions": run("iscsiadm", "-m", "session"),
        "ifaces": run("iscsiadm", "-m", "iface"),
        "dm": run("dmsetup", "table"),
        "state": tree(os.path.dirname(os.environ["BLOCKMIG_STATE_DIR"])),
        "locks": tree("/run/blockmig", contents=False),  # a lock file's text is its last holder's note
        "multipath_conf": tree("/etc/multipath/conf.d"),
        "files": files,
    }


def assert_refused_changing_nothing(args: list[str], named_files: tuple[str, ...], expected: str, exit_code: int):
    before = stack_snapshot(*named_files)
    result = blockmig(*args, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == exit_code, (args, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("blockmig: error: "), (args, result.stderr)
    assert re.search(expected, lines[0]), (args, lines[0])
    assert "Traceback" not in result.stderr and result.stdout == ""
    after = stack_snapshot(*named_files)
    for part in before:
        assert after[part] == before[part], f"{' '.join(args)} changed {part}"


@pytest.fixture
def bad_input_lab(migration_lab, tmp_path):
    """The lab volume, a plan of it, a state directory with one migration done, and files a careless admin names."""
    lab_ = migration_lab
    dest = ["--to-target", lab.DESTINATION_IQN, "--to-portal", "{}:{}".format(*lab.DESTINATION_PORTAL),
            "--backing-dir", lab_.backing_dir]
    files = {"nested": tmp_path / "nested.json", "plan_3g": tmp_path / "plan-3g.toml",
             "plan_nul": tmp_path / "plan-nul.json", "journal_0": tmp_path / "copy.json", "fifo": tmp_path / "fifo"}
    os.mkfifo(files["fifo"])
    files["nested"].write_text("[" * 5000 + "]" * 5000)
    files["plan_3g"].write_text(f'[defaults]\nto_target = "{lab.DESTINATION_IQN}"\nto_portal = "127.0.0.2:3260"\n'
                                f'chunk_size = "3G"\n[[volumes]]\ndevice = "{lab_.device}"\n')
    files["plan_nul"].write_text(json.dumps({"defaults": {"to_target": lab.DESTINATION_IQN,
                                                          "to_portal": "127.0.0.2:3260"},
                                             "volumes": [{"device": lab_.device + "\0"}]}))
    (tmp_path / "src.img").write_bytes(os.urandom(2 * MIB))
    (tmp_path / "dst.img").write_bytes(bytes(2 * MIB))
    copied = blockmig("copy", str(tmp_path / "src.img"), str(tmp_path / "dst.img"), "--allow-files",
                      "--chunk-size", "1M", "--journal", str(files["journal_0"]))
    assert copied.returncode == 0, copied.stderr
    document = json.loads(files["journal_0"].read_text())
    document["manifest"]["chunk_size"] = 0
    files["journal_0"].write_text(json.dumps(document))
    return lab_, dest, {name: str(path) for name, path in files.items()}, tmp_path


def test_bad_input_matrix_is_one_line_and_changes_nothing(bad_input_lab):
    lab_, dest, files, tmp_path = bad_input_lab
    device = lab_.device
    migrate = ["migrate", device, *dest]
    cases = [
        ([*migrate, "--chunk-size", "1T"], (), r"--chunk-size: chunk size 1099511627776 is larger than", 2),
        ([*migrate, "--chunk-size", "3G"], (), r"--chunk-size: chunk size 3221225472 is larger than", 2),
        ([*migrate, "--chunk-size", "inf"], (), r"--chunk-size: not a size: 'inf'", 2),
        ([*migrate, "--chunk-size=-4M"], (), r"--chunk-size: not a size: .-4M.", 2),
        ([*migrate, "--chunk-size", "6K"], (), r"not a multiple of 4096", 2),
        ([*migrate, "--max-rate", "0.5"], (), r"--max-rate: not a whole number of bytes", 2),
        ([*migrate, "--max-rate", "100"], (), r"--max-rate: max rate 100 bytes/s is below the minimum", 2),
        ([*migrate, "--switch-timeout", "nan"], (), r"--switch-timeout: 'nan' seconds", 2),
        ([*migrate, "--id", "../../../tmp/x"], ("/tmp/x",), r"--id: id: '../../../tmp/x' is not an id", 2),
        ([*migrate, "--id", "x" * 42], (), r"is not an id", 2),
        (["migrate", device, *dest[:4], "--backing-device", files["fifo"]], (files["fifo"],),
         r"--backing-device .*fifo is not a block device", 2),
        (["status", "../../../etc"], (), r"argument ID: id: '../../../etc' is not an id", 2),
        (["resume", "/tmp/x"], ("/tmp/x",), r"argument ID: id: '/tmp/x' is not an id", 2),
        (["rollback", ".."], (), r"argument ID: id: '..' is not an id", 2),
        (["migrate", "--plan", "/dev/zero", *dest], (), r"cannot read plan /dev/zero: not a regular file", 2),
        (["migrate", "--plan", files["nested"], *dest], (files["nested"],), r"nested too deeply", 2),
        (["migrate", "--plan", files["plan_3g"]], (files["plan_3g"],),
         r"defaults: chunk_size: chunk size 3221225472 is larger than", 2),
        (["migrate", "--plan", files["plan_nul"]], (files["plan_nul"],), r"device: contains a control character", 2),
        (["verify", device, "--manifest", "/dev/zero"], (), r"cannot read manifest /dev/zero: not a regular file", 1),
        (["copy", str(tmp_path / "src.img"), str(tmp_path / "dst.img"), "--allow-files", "--resume",
          "--journal", files["journal_0"]], (files["journal_0"], str(tmp_path / "dst.img")),
         r"chunk size 0 is not a number of bytes", 1),
    ]
    for args, named, expected, exit_code in cases:
        assert_refused_changing_nothing(args, named, expected, exit_code)


def test_a_damaged_journal_is_listed_and_blocks_only_a_volume_it_may_be(bad_input_lab):
    lab_, dest, _, _ = bad_input_lab
    state = os.environ["BLOCKMIG_STATE_DIR"]
    os.makedirs(f"{state}/torn", mode=0o700)
    with open(f"{state}/torn/journal.json", "w") as handle:  # what a hand edit leaves: the WWID, then garbage
        handle.write(f'{{"format": "blockmig-migration/1", "id": "torn", "source": {{"wwid": "{lab_.wwid}"')
    status = blockmig("status")
    assert status.returncode == 0, status.stderr
    assert "migration torn: unreadable (" in status.stdout
    VolumeLock(lab_.wwid, "earlier").acquire().release()  # the lock file is left by design; it may exist already
    assert_refused_changing_nothing(["migrate", lab_.device, *dest, "--id", "after-torn"], (),
                                    r"torn/journal.json is unreadable .* names this volume's WWID", 1)


# ---------------------------------------------------------------------------
# Another user on the host: cannot hold blockmig's lock, make it follow a link, or read its state.


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    """Python as the unprivileged user nobody (setpriv, as an admin would test it)."""
    return subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                           sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


NOBODY_TRIES = """
import fcntl, os, sys
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            fcntl.flock(os.open(path, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
        print(path, "OPENED")
    except OSError as exc:
        print(path, exc.strerror)
"""


@pytest.fixture
def reachable_state(monkeypatch):
    """State under a 0755 directory, as /var/lib is: only blockmig's own modes keep another user out."""
    top = tempfile.mkdtemp(prefix="blockmig-state-", dir="/var/tmp")
    os.chmod(top, 0o755)
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", f"{top}/lib/migrations")
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_another_user_cannot_hold_the_lock_plant_a_link_or_read_state(migration_lab, tmp_path, reachable_state):
    lab_ = migration_lab
    victim = "/etc/blockmig-victim"
    with open(victim, "w") as handle:
        handle.write("precious\n")
    old_lock = f"/run/lock/blockmig-{lab_.wwid}.lock"  # where blockmig kept it, in a directory anyone writes
    run_lock_mode = stat.S_IMODE(os.stat("/run/lock").st_mode)
    os.chmod("/run/lock", 0o1777)  # as on a Debian host (the guest's minimal /run has it 0755)
    try:
        planted = as_nobody("import os, sys; os.symlink(sys.argv[1], sys.argv[2]); print('planted')", victim, old_lock)
        assert planted.stdout == "planted\n", planted.stderr
        plan_file = tmp_path / "one.toml"
        plan_file.write_text(f'id = "unpriv"\n[defaults]\nto_target = "{lab.DESTINATION_IQN}"\n'
                             f'to_portal = "127.0.0.2:3260"\nbacking_dir = "{lab_.backing_dir}"\nchunk_size = "1M"\n'
                             'mode = "offline"\n'
                             f'[[volumes]]\ndevice = "{lab_.device}"\n')
        running = start_blockmig("migrate", "--plan", str(plan_file), "--json", stop_at="plan:destinations-created")
        try:
            wait_until_stopped(running)  # the volume's lock is held, the journals are written
            lock = f"/run/blockmig/locks/blockmig-{lab_.wwid}.lock"
            state = f"{reachable_state}/lib/migrations"
            journal = f"{state}/unpriv-1/journal.json"
            for path, mode in ((lock, 0o600), ("/run/blockmig/locks", 0o700), (state, 0o700),
                               (f"{state}/unpriv-1", 0o700), (journal, 0o600)):
                assert stat.S_IMODE(os.lstat(path).st_mode) == mode, path
            control = f"{reachable_state}/readable"
            open(control, "w").close()
            tried = as_nobody(NOBODY_TRIES, control, lock, "/run/blockmig/locks", state, journal)
            assert tried.stdout.splitlines() == [f"{control} OPENED"] + [
                f"{path} Permission denied" for path in (lock, "/run/blockmig/locks", state, journal)], tried.stderr
            nobody_blockmig = as_nobody(f"import sys; sys.path.insert(0, {str(REPO)!r}); import blockmig.cli;"
                                        "sys.exit(blockmig.cli.main(sys.argv[1:]))", "status")
            assert nobody_blockmig.returncode == 1 and len(nobody_blockmig.stderr.splitlines()) == 1, \
                nobody_blockmig.stderr
        finally:
            running.send_signal(signal.SIGCONT)
        out, err = running.communicate(timeout=600)
        assert running.returncode == 0, err
        lab_.assert_host_on_destination(report=json.loads(out.splitlines()[-1])["volumes"][0]["report"])
        with open(victim) as handle:
            assert handle.read() == "precious\n"
        assert os.path.islink(old_lock)  # not touched either: blockmig no longer looks there
    finally:
        os.unlink(victim)
        if os.path.lexists(old_lock):
            os.unlink(old_lock)
        os.chmod("/run/lock", run_lock_mode)
