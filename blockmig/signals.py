"""One signal policy for every phase: SIGINT, SIGTERM and SIGHUP stop blockmig at a safe point.

A signal that lands anywhere can leave the host's IO frozen (a suspend fence, the
switch's hold) or resume a map that has no path. So, once `install()` has run (the CLI
does, in the main thread):

- the first signal asks every thread to stop (`stop_requested()`); in the main thread it
  raises `Interrupted` at once, unless the main thread is inside a `deferred()` block
  (the switch, a rollback, the cleanup after a failure, a plan waiting for its members),
  which then raises it on leaving, at its safe point;
- threads cannot be interrupted: a plan's members call `check()` at step and chunk
  boundaries, where stopping is safe and the journal says where to resume;
- later signals never raise (they would abort the very cleanup the first one started):
  they only make the CLI say, once, what blockmig is finishing before it exits.

Plain Python code (library use, tests) without `install()` keeps KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from blockmig.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NOT_DEFERRED = "blockmig is already stopping at a safe point"

_stop = threading.Event()
_received: list[int] = []  # the first signal's number
_local = threading.local()  # each thread's stack of deferred() reasons
_notice: Callable[[str], None] | None = None
_told = False


def install(notice: Callable[[str], None] | None = None) -> None:
    """Handle SIGINT, SIGTERM and SIGHUP as above; `notice` tells the admin, once, why a later signal
    waits."""
    global _notice
    _notice = notice
    for signum in HANDLED:
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame) -> None:
    global _told
    if _stop.is_set():
        if _notice is not None and not _told:
            _told = True
            reasons = _reasons()
            _notice(f"{signal.Signals(signum).name} again: {reasons[0] if reasons else NOT_DEFERRED}; "
                    "blockmig exits when it is done")
        return
    _received.append(signum)
    _stop.set()
    if not _reasons():  # the handler runs in the main thread: these are its reasons
        raise Interrupted(signum)


def only_the_main_thread_receives() -> None:
    """For worker threads (and the threads they start): the kernel then delivers the three signals to the main
    thread, whose blocking wait (a plan joining its members) they interrupt; a worker receiving one would not
    wake it, and its Python handler would run only when that wait ends."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def _reasons() -> list[str]:
    if not hasattr(_local, "reasons"):
        _local.reasons = []
    return _local.reasons


@contextlib.contextmanager
def deferred(reason: str, stopped: str = "", then_stop: bool = True) -> Iterator[None]:
    """A critical section: a signal inside it only asks for the stop, raised (`then_stop`) when it ends.

    `reason` says what goes on (told on a second signal: "the switch goes on until ...");
    `stopped` is what the Interrupted raised at the end says about where things stand. Only the
    main thread's outermost block raises (other threads stop at their own check()), and never
    when the block ends by an exception: that one goes on. `then_stop=False`: the caller's next
    check() stops it (e.g. right after the step is journaled done).
    """
    reasons = _reasons()
    reasons.append(reason)
    try:
        yield
    finally:
        reasons.pop()
    if then_stop and not reasons and threading.current_thread() is threading.main_thread():
        check(stopped)


def stop_requested() -> bool:
    return _stop.is_set()


def pause(seconds: float) -> None:
    """time.sleep that a stop request ends early (a throttled copy still stops at once)."""
    _stop.wait(seconds)


def check(detail: str = "") -> None:
    """A safe point: raise Interrupted if a signal asked to stop (in any thread)."""
    if _stop.is_set():
        raise Interrupted(_received[0], detail)


def received() -> int | None:
    """The number of the first signal that asked to stop, if any."""
    return _received[0] if _received else None


def reset() -> None:
    """Forget a stop (tests, or a long-lived process that handled one)."""
    global _told
    _stop.clear()
    _received.clear()
    _told = False
