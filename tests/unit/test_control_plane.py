"""The host-wide control-plane lock: re-entrant in a thread, exclusive across threads and processes, root-only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest

from blockmig.errors import HostError
from blockmig.host.control_plane import HostControlPlane

HOLDER = """
import sys
from blockmig.host.control_plane import HostControlPlane
with HostControlPlane(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def lock_path(tmp_path):
    return str(tmp_path / "run" / "control-plane.lock")


def test_the_lock_file_is_root_only(lock_path):
    with HostControlPlane(lock_path):
        pass
    assert stat.S_IMODE(os.stat(lock_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(lock_path)).st_mode) == 0o700


def test_a_planted_symlink_is_not_followed(lock_path, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.makedirs(os.path.dirname(lock_path), mode=0o700)
    os.symlink(victim, lock_path)
    with pytest.raises(HostError, match=f"cannot open lock file {lock_path}"):
        with HostControlPlane(lock_path):
            pass
    assert victim.read_text() == "precious\n"


def test_a_world_writable_lock_directory_is_refused(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o1777)
    with pytest.raises(HostError, match="is not a directory of uid"):
        with HostControlPlane(str(directory / "control-plane.lock")):
            pass


def test_reentrant_in_a_thread_exclusive_across_threads(lock_path):
    outcome = []

    def other_thread():
        try:
            with HostControlPlane(lock_path, wait=0.2):
                outcome.append("got it")
        except HostError as exc:
            outcome.append(str(exc))

    plane = HostControlPlane(lock_path)
    with plane:
        with HostControlPlane(lock_path):  # another instance for the same file is the same lock
            with plane:
                assert plane.held_here()
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
    assert not plane.held_here()
    assert outcome == ["the host's control plane is still held by another thread of this blockmig after 0.2 s; "
                       "retry when it is done"]
    other_thread()
    assert outcome[-1] == "got it"


def test_exclusive_across_processes(lock_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock_path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(HostError) as refused:
            with HostControlPlane(lock_path, wait=0.3):
                pass
        assert f"still held by blockmig pid {holder.pid} since " in str(refused.value)
        assert "after 0.3 s" in str(refused.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with HostControlPlane(lock_path, wait=5):  # the kernel dropped the holder's flock
        pass
