"""The host's control-plane lock: one blockmig step at a time changes LIO, iscsiadm's records,
multipathd, udev.

A threading lock covers the threads of one process (a plan's members); two
blockmig processes on one host race the same way (a `multipathd reconfigure`
of one reloads, and so resumes, the map another holds suspended in its switch).
So the lock is also an flock on a root-only file: re-entrant within a thread,
exclusive across threads and processes; the kernel drops it when the process dies.

Every HostControlPlane() for the same file is the same lock (the process's
flock is per open file, so two instances with two descriptors would lock each
other out in one thread).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from blockmig.errors import HostError

DEFAULT_PATH = "/run/blockmig/control-plane.lock"
PATH_ENV = "BLOCKMIG_CONTROL_PLANE_LOCK"  # moves it (several labs on one box, unit tests)
WAIT = 600.0  # seconds a step waits for another process's control-plane step before giving up
POLL = 0.05


@dataclass
class _State:
    thread_lock: threading.RLock = field(default_factory=threading.RLock)
    depth: int = 0  # nesting of the thread that holds thread_lock
    fd: int | None = None


_states: dict[str, _State] = {}
_states_guard = threading.Lock()


class HostControlPlane:
    """`with CONTROL_PLANE:` around every step that changes the host's or the arrays' configuration."""

    def __init__(self, path: str | None = None, wait: float = WAIT):
        self._path = path
        self.wait = wait

    @property
    def path(self) -> str:
        return self._path or os.environ.get(PATH_ENV) or DEFAULT_PATH

    def _state(self) -> _State:
        with _states_guard:
            return _states.setdefault(os.path.abspath(self.path), _State())

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting at most `wait` seconds); `blocking=False`: only if it is free now."""
        state = self._state()
        began = time.monotonic()
        taken = state.thread_lock.acquire(timeout=self.wait) if blocking else state.thread_lock.acquire(False)
        if not taken:
            if not blocking:
                return False
            raise HostError(f"the host's control plane is still held by another thread of this blockmig "
                            f"after {self.wait:g} s; retry when it is done")
        try:
            if state.depth == 0:
                state.fd = _lock_file(self.path, began + self.wait if blocking else None, self.wait)
                if state.fd is None:  # another process holds it, and we were not to wait
                    state.thread_lock.release()
                    return False
            state.depth += 1
        except BaseException:
            state.thread_lock.release()
            raise
        return True

    def release(self) -> None:
        state = self._state()
        state.depth -= 1
        if state.depth == 0 and state.fd is not None:
            os.close(state.fd)  # drops the flock; the file stays (removing it would race)
            state.fd = None
        state.thread_lock.release()

    def held_here(self) -> bool:
        """Whether this process holds the host-wide lock now (some thread of it)."""
        return self._state().fd is not None

    def __enter__(self) -> "HostControlPlane":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def open_private_file(path: str) -> int:
    """Open (creating) a root-only lock file: directory 0700, file 0600, no symlink followed, ours alone."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise HostError(f"lock directory {directory} is not a directory of uid {os.geteuid()} that only it "
                        "can write; fix or remove it")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise HostError(f"cannot open lock file {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise HostError(f"lock file {path} is not a regular file of uid {os.geteuid()}; remove it")
    if info.st_mode & 0o777 != 0o600:
        os.fchmod(fd, 0o600)
    return fd


def _lock_file(path: str, deadline: float | None, wait: float) -> int | None:
    """flock the lock file by `deadline` (None: now or never, and None back if it is held)."""
    fd = open_private_file(path)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is None:
                os.close(fd)
                return None
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise HostError(f"the host's control plane is still held by {holder} after {wait:g} s "
                                f"(lock {path}); retry when it is done") from None
            time.sleep(POLL)
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"blockmig pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
    return fd
