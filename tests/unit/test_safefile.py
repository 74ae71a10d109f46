"""The safe writer, the bounded reader and the volume lock, on real files, links, FIFOs and other users."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import pytest
from datapath_helpers import REPO

from blockmig.errors import JournalError, MigrationError
from blockmig.safefile import ensure_private_dir, read_bounded, write_atomically
from blockmig.state import MigrationJournal, VolumeLock

NOBODY = 65534


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask():
    """The writer must not take its modes from the umask: the most permissive one shows it."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_state_files_are_0600_in_0700_directories_whatever_the_umask(tmp_path, open_umask):
    path = tmp_path / "state" / "deeper" / "journal.json"
    write_atomically(str(path), b"{}")
    assert path.read_bytes() == b"{}"
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700 and mode_of(path.parent.parent) == 0o700
    assert os.listdir(path.parent) == ["journal.json"], "a temp file was left"


def test_a_link_planted_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "journal.json").symlink_to(victim)
    write_atomically(str(state / "journal.json"), b"new")
    assert victim.read_text() == "precious"
    assert not os.path.islink(state / "journal.json") and (state / "journal.json").read_bytes() == b"new"


def test_a_planted_fixed_temp_name_is_neither_followed_nor_in_the_way(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "journal.json.tmp").symlink_to(victim)  # the old writer's fixed temp name
    write_atomically(str(state / "journal.json"), b"new")
    assert victim.read_text() == "precious" and (state / "journal.json").read_bytes() == b"new"


@pytest.mark.parametrize("problem", ["symlink", "group-writable", "world-writable", "other owner", "a file"])
def test_an_unsafe_state_directory_is_refused_with_one_line(tmp_path, problem):
    state = tmp_path / "state"
    if problem == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        state.symlink_to(tmp_path / "elsewhere")
    elif problem == "a file":
        state.write_text("")
    else:
        state.mkdir(mode=0o700)
        os.chmod(state, {"group-writable": 0o770, "world-writable": 0o1777, "other owner": 0o700}[problem])
        if problem == "other owner":
            os.chown(state, NOBODY, NOBODY)
    with pytest.raises(JournalError) as refused:
        write_atomically(str(state / "journal.json"), b"{}")
    assert str(refused.value).startswith(f"refusing state directory {state}: it ")
    assert "\n" not in str(refused.value)
    assert not os.path.lexists(tmp_path / "elsewhere" / "journal.json")


def test_an_existing_state_directory_readable_by_others_is_tightened(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    assert ensure_private_dir(str(state)) == str(state)
    assert mode_of(state) == 0o700


def test_a_file_the_user_names_may_live_in_a_shared_directory(tmp_path, open_umask):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /var/tmp
    write_atomically(str(shared / "copy.manifest.json"), b"{}", private_dir=False)
    assert mode_of(shared / "copy.manifest.json") == 0o600 and mode_of(shared) == 0o1777


def test_mode_is_kept_for_files_others_must_read(tmp_path):
    write_atomically(str(tmp_path / "blockmig-m1.conf"), b"blacklist {}\n", mode=0o644, private_dir=False)
    assert mode_of(tmp_path / "blockmig-m1.conf") == 0o644


def test_bounded_reader_refuses_fifo_device_link_and_oversize_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    link = tmp_path / "link"
    link.symlink_to(big)
    result = {}

    def read_all():
        for name, path, follow in (("fifo", fifo, True), ("zero", "/dev/zero", True), ("big", big, False),
                                   ("link", link, False)):
            try:
                read_bounded(str(path), 100, "manifest", follow_links=follow)
                result[name] = "read"
            except JournalError as exc:
                result[name] = str(exc)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "the reader hung"
    assert result == {
        "fifo": f"cannot read manifest {fifo}: not a regular file",
        "zero": "cannot read manifest /dev/zero: not a regular file",
        "big": f"cannot read manifest {big}: 101 bytes, more than the 100 a manifest can hold",
        "link": f"cannot read manifest {link}: it is a symbolic link (not followed)",
    }
    assert read_bounded(str(link), 101, "manifest", follow_links=True) == b"x" * 101


@pytest.fixture
def state_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "state" / "migrations"))
    monkeypatch.setenv("BLOCKMIG_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path


def test_lock_lives_root_only_and_refuses_a_planted_link(state_dirs, open_umask):
    lock = VolumeLock("36001405abc", "m1").acquire()
    try:
        assert mode_of(lock.path) == 0o600 and mode_of(os.path.dirname(lock.path)) == 0o700
        assert os.get_inheritable(lock._fd) is False  # O_CLOEXEC: iscsiadm and multipathd do not hold it
    finally:
        lock.release()
    victim = state_dirs / "victim"
    victim.write_text("precious")
    os.symlink(victim, state_dirs / "locks" / "blockmig-36001405def.lock")
    with pytest.raises(JournalError, match="cannot open lock .*blockmig-36001405def.lock"):
        VolumeLock("36001405def", "m2").acquire()
    assert victim.read_text() == "precious"
    with pytest.raises(JournalError, match="not a WWID"):
        VolumeLock("../../etc/passwd", "m3")


def test_lock_in_a_world_writable_directory_is_refused(state_dirs):
    os.mkdir(state_dirs / "locks")
    os.chmod(state_dirs / "locks", 0o1777)  # /run/lock's mode
    with pytest.raises(JournalError, match="refusing state directory .*locks: it is writable by group or others"):
        VolumeLock("36001405abc", "m1").acquire()


def run_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    """Python as uid/gid nobody; the modules are imported first (this machine's Python is root's to read)."""
    return subprocess.run(
        [sys.executable, "-c", f"import os, sys, fcntl; sys.path.insert(0, {str(REPO)!r}); import blockmig.state;"
         "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n" + code, *args],
        capture_output=True, text=True, timeout=60)


@pytest.fixture
def reachable_state(monkeypatch):
    """State under a 0755 directory, so that only blockmig's own modes can keep another user out
    (pytest's tmp_path sits in a 0700 directory, which would hide every mistake)."""
    top = tempfile.mkdtemp(prefix="blockmig-safefile-", dir="/tmp")
    os.chmod(top, 0o755)
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", f"{top}/state/migrations")
    monkeypatch.setenv("BLOCKMIG_LOCK_DIR", f"{top}/locks")
    try:
        yield top
    finally:
        shutil.rmtree(top)


NOBODY_OPENS = (
    "import fcntl\n"
    "for path in sys.argv[1:]:\n"
    "    try:\n"
    "        fd = os.open(path, os.O_RDONLY)\n"
    "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "        print(path, 'OPENED')\n"
    "    except OSError as exc:\n"
    "        print(path, exc.strerror)\n")


def test_another_user_can_neither_hold_the_lock_nor_read_state(reachable_state):
    MigrationJournal.create("m1", source={"wwid": "36001405abc"})
    with VolumeLock("36001405abc", "m1") as lock:
        lock_path = lock.path
    control = os.path.join(reachable_state, "readable")
    with open(control, "w"):
        pass  # proves nobody reaches this far: only blockmig's modes refuse below
    journal = f"{reachable_state}/state/migrations/m1/journal.json"
    result = run_as_nobody(NOBODY_OPENS, control, lock_path, journal, f"{reachable_state}/state/migrations")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{control} OPENED",
        f"{lock_path} Permission denied",
        f"{journal} Permission denied",
        f"{reachable_state}/state/migrations Permission denied",
    ]
    with VolumeLock("36001405abc", "m2"):  # still root's to take
        pass


def test_another_user_running_blockmig_cannot_take_roots_lock(reachable_state):
    with VolumeLock("36001405abc", "m1"):
        pass
    result = run_as_nobody("from blockmig.state import VolumeLock\n"
                           "try:\n"
                           "    VolumeLock('36001405abc', 'intruder').acquire(); print('HELD')\n"
                           "except Exception as exc:\n"
                           "    print(type(exc).__name__, exc)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"JournalError refusing state directory {reachable_state}/locks: it is owned by uid 0, "
                             "not 65534; blockmig keeps its state in a directory only root can use "
                             "(chown root, chmod 700)\n")
    with VolumeLock("36001405abc", "m2"):
        with pytest.raises(MigrationError):  # and root's own lock still excludes root
            VolumeLock("36001405abc", "m3").acquire()
