"""The one command runner: bounded calls, phase deadlines, one-line errors (real processes, nothing faked)."""

from __future__ import annotations

import os
import threading

import pytest

from blockmig.errors import HostError
from blockmig.host import runner
from blockmig.host.udev import wait_until


def test_output_and_a_failure_in_one_line():
    assert runner.run(["sh", "-c", "echo out"], "cannot echo") == "out\n"
    with pytest.raises(HostError) as failed:
        runner.run(["sh", "-c", "echo first >&2; echo the reason >&2; exit 3"], "cannot do it")
    assert str(failed.value) == "cannot do it: sh -c echo first >&2; echo the reason >&2; exit 3: the reason"
    assert runner.succeeds(["true"], "asking") and not runner.succeeds(["false"], "asking")


def test_a_missing_program_names_what_to_install():
    with pytest.raises(HostError, match=r"^cannot flush: no-such-blockdev not found: install util-linux$"):
        runner.run(["no-such-blockdev"], "cannot flush", missing="util-linux")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie waiting for init is dead
    except FileNotFoundError:
        return True


def test_a_hanging_command_is_killed_with_its_children(tmp_path):
    """The shell's child keeps the pipe open: killing the shell alone would leave the caller waiting on it."""
    pid_file = tmp_path / "child.pid"
    with pytest.raises(HostError) as cut:
        runner.run(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], "cannot flush buffers of map m",
                   timeout=3)
    assert str(cut.value) == (f"cannot flush buffers of map m: sh -c sleep 300 & echo $! > {pid_file}; wait "
                              "did not finish within 3 s; killed")
    child = int(pid_file.read_text())
    wait_until(lambda: _gone(child), "the killed shell's child to die", 10)


def test_a_phase_deadline_bounds_every_command_inside_it():
    with runner.phase_deadline(0.5, "the switch timeout of map m"):
        assert runner.current_deadline().phase == "the switch timeout of map m"
        with pytest.raises(HostError) as cut:
            runner.run(["sleep", "300"], "cannot suspend map m")  # its own default timeout is 120 s
        message = str(cut.value)
        assert message.startswith("cannot suspend map m: sleep 300 did not finish within ")
        assert message.endswith(" s (the time left in the switch timeout of map m); killed")
        with pytest.raises(HostError, match=r"^cannot resume map m: true not started: no time left in the switch "
                                            r"timeout of map m$"):
            runner.run(["true"], "cannot resume map m")
        with runner.phase_deadline(30, "the end of the hold of map m"):  # a cleanup gets a budget of its own
            assert runner.run(["echo", "resumed"], "cannot resume map m") == "resumed\n"
        assert runner.current_deadline().phase == "the switch timeout of map m"
        runner.extend_phase_deadline(30)  # the join's own bound: commands run again
        assert runner.run(["echo", "joined"], "cannot add path") == "joined\n"
    assert runner.current_deadline() is None
    assert runner.run(["true"], "after the phase") == ""


def test_a_deadline_is_per_thread():
    seen = []
    with runner.phase_deadline(0.001, "the hold of another member"):
        thread = threading.Thread(target=lambda: seen.append((runner.current_deadline(),
                                                              runner.run(["echo", "ok"], "member"))))
        thread.start()
        thread.join()
    assert seen == [(None, "ok\n")]


def test_no_subprocess_call_outside_the_runner():
    """Every external command of blockmig goes through host/runner.py (so each has a bound)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "blockmig")
    offenders = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and not path.endswith(os.path.join("host", "runner.py")):
                text = open(path).read()
                if any(call in text for call in ("subprocess.run(", "subprocess.Popen(", "subprocess.call(",
                                                 "subprocess.check_", "os.system(", "os.popen(")):
                    offenders.append(os.path.relpath(path, root))
    assert offenders == []
