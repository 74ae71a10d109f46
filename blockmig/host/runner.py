"""The one way blockmig runs an external command: bounded in time, failures as one-line HostErrors.

Every call has a timeout. A phase that must finish by a deadline (the
switch's hold: host IO waits while it runs) sets one with `phase_deadline`,
and every command run inside it, however deep, gets at most the time left:
callers need no timeout parameters of their own. The deadline lives in a
context variable, so it is per thread (each member of a plan runs its own
hold) and a nested phase (the resume at the end of a hold) gets a budget of
its own instead of the one the hold has already spent.

A command that outlives its timeout is killed with its whole process group
(a shell script's children too), so the caller is not kept waiting on a pipe
a grandchild still holds; one in uninterruptible sleep is left behind.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from blockmig.errors import HostError

DEFAULT_COMMAND_TIMEOUT = 120.0
_REAP_TIMEOUT = 2.0  # after the kill: how long to wait for the pipes to close


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic()
    phase: str  # "the switch's hold": named in the error when a command is cut


_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "blockmig_phase_deadline", default=None
)


@contextlib.contextmanager
def phase_deadline(seconds: float, phase: str):
    """Every command run in this block (this thread) must end within `seconds` from now.

    Replaces an enclosing phase's deadline for the block's duration: a cleanup
    phase (resume, thaw, revert) gets its own budget even when the phase it
    cleans up after has run out.
    """
    token = _deadline.set(Deadline(time.monotonic() + seconds, phase))
    try:
        yield
    finally:
        _deadline.reset(token)


def extend_phase_deadline(seconds: float) -> None:
    """Move the current phase's deadline to `seconds` from now, if that is later (a phase whose bound
    restarts at a step: the switch's join gets the whole switch timeout from the destination's mapping).
    The enclosing phase_deadline still restores what was before it."""
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() + seconds > deadline.at:
        _deadline.set(Deadline(time.monotonic() + seconds, deadline.phase))


def current_deadline() -> Deadline | None:
    return _deadline.get()


def time_left(timeout: float) -> tuple[float, str]:
    """The timeout a command started now gets (at most `timeout`, at most the phase's time left) and why."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout, ""
    left = deadline.at - time.monotonic()
    if left >= timeout:
        return timeout, ""
    return left, f" (the time left in {deadline.phase})"


def run_command(args: list[str], what: str, timeout: float = DEFAULT_COMMAND_TIMEOUT,
                missing: str = "") -> subprocess.CompletedProcess:
    """Run `args` with a bound; return the finished process whatever its exit code (the caller judges that).

    `what`: the start of the error line ("cannot suspend map X"); `missing`: what to install when the
    program does not exist. A timeout, or a phase deadline already passed, is a HostError naming both.
    """
    command = " ".join(args)
    bound, why = time_left(timeout)
    if bound <= 0:
        raise HostError(f"{what}: {command} not started: no time left in {_deadline.get().phase}")
    try:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
    except FileNotFoundError:
        hint = f": install {missing}" if missing else ""
        raise HostError(f"{what}: {args[0]} not found{hint}") from None
    except OSError as exc:
        raise HostError(f"{what}: cannot run {command}: {exc.strerror}") from None
    try:
        stdout, stderr = process.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise HostError(f"{what}: {command} did not finish within {bound:.3g} s{why}; killed") from None
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def run(args: list[str], what: str, timeout: float = DEFAULT_COMMAND_TIMEOUT, missing: str = "") -> str:
    """run_command, and a non-zero exit is a HostError with the command's last line of output;
    returns stdout."""
    result = run_command(args, what, timeout, missing)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}").splitlines()
        raise HostError(f"{what}: {' '.join(args)}: {lines[-1]}")
    return result.stdout


def succeeds(args: list[str], what: str, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> bool:
    """Whether the command exits 0 (a question like `dmsetup info NAME`); a hang is still a HostError."""
    return run_command(args, what, timeout).returncode == 0


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.communicate(timeout=_REAP_TIMEOUT)
    except subprocess.TimeoutExpired:  # stuck in the kernel (D state): leave it, do not wait with it
        for pipe in (process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                pipe.close()


def start_daemon(args: list[str], what: str, log_path: str | None = None,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """A long-lived helper process (the array-side backstore handler): no timeout, its owner stops it.

    Here so that every process blockmig starts is started in this module. Without `log_path` the caller
    reads its pipes; with it, the process writes there and runs in a session of its own, so it outlives
    blockmig (a kill -9, a Ctrl-C in blockmig's terminal): a migration's destination must not vanish with
    the process that started it.
    """
    # cwd "/": a process that outlives blockmig must not hold the directory it was run from (a filesystem
    # the admin will unmount: perhaps the very volume it moves)
    try:
        if log_path is None:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd="/", env=env)
        with open(log_path, "ab") as log:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, cwd="/", env=env)
    except OSError as exc:
        raise HostError(f"{what}: cannot start {args[0]}: {exc.strerror}") from None
