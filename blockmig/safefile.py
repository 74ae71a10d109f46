"""The one way blockmig creates and reads its state files, as a root tool must.

State directories are private: created 0700, and an existing one is used only if
it is a real directory (not a symlink) owned by this user and writable by no one
else; read bits for others are taken away. Files are written through a temp file
with a unique name opened O_CREAT|O_EXCL|O_NOFOLLOW (a planted file or link makes
the open fail instead of being followed), fsynced, renamed over the target (a
rename replaces a link, never writes through it), then the directory is fsynced:
a crash leaves the old file or the new one. Reads use O_NOFOLLOW for state files
and refuse anything but a regular file of a bounded size (a FIFO or /dev/zero
would never end), so the loaders above see bytes, never a hang.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from blockmig.errors import JournalError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def ensure_private_dir(path: str) -> str:
    """Create `path` (and missing parents) 0700, or check an existing one; return its absolute path."""
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            pass  # another blockmig made it at the same time; checked below like any existing one
        except OSError as exc:
            raise JournalError(f"cannot create state directory {directory}: {exc.strerror}") from None
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise JournalError(f"cannot use state directory {path}: {exc.strerror}") from None
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not {os.geteuid()}"
    elif info.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    if problem:
        raise JournalError(f"refusing state directory {path}: it {problem}; blockmig keeps its state in a "
                           "directory only root can use (chown root, chmod 700)")
    if stat.S_IMODE(info.st_mode) != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)  # ours and not writable by others: just no longer readable by them
    return path


def write_atomically(
    path: str, data: bytes, *, mode: int = PRIVATE_FILE_MODE, private_dir: bool = True
) -> None:
    """Replace `path` with `data` durably; `private_dir`: its directory is blockmig's own (checked or made
    0700).

    A file a user names (--manifest, --journal) may live in a shared directory such as /var/tmp: its
    directory is not checked, but the temp file is still exclusive, unfollowed and `mode`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if private_dir:
        ensure_private_dir(directory)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(8).hex()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise JournalError(f"cannot write {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits a reader needs (a multipath drop-in is 0644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise JournalError(f"cannot write {path}: {exc.strerror}") from None
    fsync_directory(directory, path)


def fsync_directory(directory: str, path: str) -> None:
    """The rename is durable only once the directory is."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise JournalError(f"cannot write {path}: {exc.strerror}") from None


def read_bounded(path: str, max_bytes: int, what: str, *, follow_links: bool = False) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; JournalError (one line) for anything else.

    O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused right after, as not a regular file).
    `follow_links`: a file the user names may be a link; blockmig's own state files are never followed.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        reason = "it is a symbolic link (not followed)" if exc.errno == errno.ELOOP else exc.strerror
        raise JournalError(f"cannot read {what} {path}: {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JournalError(f"cannot read {what} {path}: not a regular file")
        if info.st_size > max_bytes:
            raise JournalError(f"cannot read {what} {path}: {info.st_size} bytes, more than the {max_bytes} "
                               f"a {what} can hold")
        chunks, total = [], 0
        while total <= max_bytes:  # the size may grow after fstat: never read past the bound
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise JournalError(
                f"cannot read {what} {path}: more than the {max_bytes} bytes a {what} can hold"
            )
        return b"".join(chunks)
    except OSError as exc:
        raise JournalError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
