"""The signal policy (blockmig.signals): real signals sent to this process, and to a real `blockmig copy`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from datapath_helpers import REPO, MiB, read_volume, write_random_file

from blockmig import signals
from blockmig.datapath import copy_volume
from blockmig.errors import BlockmigError, Interrupted


@pytest.fixture
def installed():
    """The handlers installed in this (pytest's main) thread, notices collected; all undone afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in signals.HANDLED}
    notices: list[str] = []
    signals.reset()
    signals.install(notices.append)
    try:
        yield notices
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        signals.reset()


def _send(signum: int) -> None:
    """To this process; the handler runs in the main thread before os.kill returns to it."""
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_outside_any_critical_section_raises_at_once(installed, signum, code):
    with pytest.raises(Interrupted) as raised:
        _send(signum)
        time.sleep(5)  # not reached: the handler raises
    assert raised.value.exit_code == code and raised.value.signum == signum
    assert isinstance(raised.value, BlockmigError)
    assert str(raised.value) == f"interrupted by {signal.Signals(signum).name}"
    assert signals.received() == signum and signals.stop_requested()


def test_a_deferred_signal_is_raised_when_the_section_ends(installed):
    reached_the_end = False
    with pytest.raises(Interrupted, match="interrupted by SIGTERM: stopped after the hold"):
        with signals.deferred("the hold", "stopped after the hold"):
            _send(signal.SIGTERM)
            assert signals.stop_requested()
            reached_the_end = True
    assert reached_the_end


def test_nested_sections_raise_only_when_the_outermost_ends(installed):
    order = []
    with pytest.raises(Interrupted):
        with signals.deferred("outer"):
            with signals.deferred("inner"):
                _send(signal.SIGINT)
            order.append("inner ended without raising")
    assert order == ["inner ended without raising"]


def test_then_stop_false_leaves_the_stop_to_the_next_check(installed):
    with signals.deferred("the switch", then_stop=False):
        _send(signal.SIGINT)
    assert signals.stop_requested()
    with pytest.raises(Interrupted, match="before step finish"):
        signals.check("before step finish")


def test_an_error_inside_a_section_is_not_replaced_by_the_signal(installed):
    with pytest.raises(ValueError, match="the revert failed"):
        with signals.deferred("the revert"):
            _send(signal.SIGHUP)
            raise ValueError("the revert failed")
    assert signals.received() == signal.SIGHUP


def test_a_second_signal_never_raises_and_is_told_once(installed):
    with pytest.raises(Interrupted):
        _send(signal.SIGINT)
    # The cleanup after the first one: neither a second nor a third signal aborts it.
    with signals.deferred("the switch goes on until it has finished or reverted", then_stop=False):
        _send(signal.SIGINT)
        _send(signal.SIGTERM)
    _send(signal.SIGINT)  # outside any section too
    assert installed == ["SIGINT again: the switch goes on until it has finished or reverted; "
                         "blockmig exits when it is done"]
    assert signals.received() == signal.SIGINT  # the first one picks the exit code


def test_threads_stop_at_their_own_checks_and_the_main_thread_waits_for_them(installed):
    """A plan's shape: members in threads check at safe points; the main thread's wait is not cut short."""
    events: list[str] = []
    started = threading.Event()

    def member():
        with signals.deferred("a member's switch"):  # in a thread: never raises on leaving
            started.wait()
            _send(signal.SIGTERM)  # handled in the main thread, which is waiting in join()
            time.sleep(0.2)
        events.append("member's switch ended")
        try:
            signals.check("member stopped")
        except Interrupted as exc:
            events.append(str(exc))

    with pytest.raises(Interrupted, match="plan stopped"):
        with signals.deferred("waiting for the members", "plan stopped"):
            thread = threading.Thread(target=member)
            thread.start()
            started.set()
            thread.join()
            events.append("main thread saw the member end")
    assert events == ["member's switch ended", "interrupted by SIGTERM: member stopped",
                      "main thread saw the member end"]


def test_a_copy_stops_at_a_chunk_boundary_with_its_address_journaled(installed, tmp_path):
    source, destination, journal = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "copy.json"
    data = write_random_file(source, 8 * MiB, seed=3)
    destination.write_bytes(b"\0" * (8 * MiB))

    def signal_after_the_second_chunk(guard, ack):
        if ack.reserved_address == 2 * MiB:
            _send(signal.SIGINT)

    with pytest.raises(Interrupted, match=f"the copy stopped at byte {2 * MiB} of {8 * MiB}"):
        copy_volume(str(source), str(destination), str(journal), chunk_size=MiB, allow_regular_files=True,
                    journal_interval=3600, after_chunk=signal_after_the_second_chunk)
    assert json.loads(journal.read_text())["reserved_address"] == 2 * MiB  # saved though the interval is 1 h
    signals.reset()
    copy_volume(str(source), str(destination), str(journal), resume=True, allow_regular_files=True)
    assert read_volume(str(destination)) == data


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_blockmig_copy_stopped_by_a_signal_exits_with_one_line_and_resumes(tmp_path, signum, code):
    """The real CLI: stopped at the copy's named point, sent the signal, continued; then --resume finishes."""
    source, destination, journal = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "copy.json"
    data = write_random_file(source, 4 * MiB, seed=signum)
    destination.write_bytes(b"\0" * (4 * MiB))
    args = [sys.executable, "-m", "blockmig", "copy", str(source), str(destination), "--allow-files",
            "--chunk-size", "1M", "--journal", str(journal)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "BLOCKMIG_STOP_AT": "copy:chunk"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while psutil.Process(process.pid).status() != psutil.STATUS_STOPPED:
        assert process.poll() is None and time.monotonic() < deadline, "blockmig never reached copy:chunk"
        time.sleep(0.01)
    process.send_signal(signum)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert process.returncode == code
    assert stderr.splitlines() == [f"blockmig: error: interrupted by {name}: the copy stopped at byte {MiB} "
                                   f"of {4 * MiB}, journaled in {journal}"]
    resumed = subprocess.run(args[:-2] + ["--journal", str(journal), "--resume"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert read_volume(str(destination)) == data

