"""The API the rest of blockmig uses for a served volume: start, stop, state, arm/disarm the guard.

Everything goes through the handler's command line and its unix socket, so
the same calls could reach a handler on the destination array's own machine
(over ssh, or with the socket forwarded); the state file stays the truth
when the handler is down.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import site
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

import blockmig
from blockmig.array.tcmu.guard import load_state
from blockmig.array.tcmu.service import RUN_DIR, STATE_DIR, socket_path, state_path
from blockmig.errors import ArrayError
from blockmig.host.runner import start_daemon


@dataclass
class ServedVolume:
    """A running `blockmig array serve`; `line` is what it printed once it served."""

    name: str
    process: subprocess.Popen
    line: str
    run_dir: str = RUN_DIR
    state_dir: str = STATE_DIR

    @property
    def client(self) -> "BackstoreClient":
        return BackstoreClient(self.name, self.run_dir)


def start_served_volume(
    name: str,
    *,
    backing_file: str | None = None,
    size: int | None = None,
    backing_device: str | None = None,
    serial: str | None = None,
    geometry_from: str | None = None,
    guard_initiator: str | None = None,
    pass_through_source: str | None = None,
    chunk_size: int | None = None,
    state_dir: str = STATE_DIR,
    run_dir: str = RUN_DIR,
) -> ServedVolume:
    """Start the handler process and wait until it serves (or fails with its own one-line error)."""
    argv = _serve_argv(name, state_dir, run_dir, backing_file, size, backing_device,
                       {"--serial": serial, "--geometry-from": geometry_from,
                        "--guard-initiator": guard_initiator, "--pass-through-source": pass_through_source,
                        "--chunk-size": str(chunk_size) if chunk_size else None})
    process = start_daemon(argv, f"the backstore handler for {name}", env=_serve_env())
    line = process.stdout.readline().strip()
    if not line:
        error = process.stderr.read().strip().splitlines()
        process.wait()
        raise ArrayError(error[-1] if error else f"the backstore handler for {name} exited without serving")
    return ServedVolume(name, process, line, run_dir, state_dir)


def serve_detached(
    name: str,
    *,
    backing: str,
    size: int,
    serial: str,
    geometry: dict,
    guard_initiator: str,
    state_dir: str,
    log_path: str,
    run_dir: str = RUN_DIR,
    timeout: float = 60,
    migrator_serial: str | None = None,
    pass_through_source: str | None = None,
    chunk_size: int | None = None,
    min_rate: int | None = None,
) -> dict:
    """Start the handler in a session of its own (it outlives blockmig), its output appended to `log_path`;
    return its state once it answers on its socket. The backing file must exist (prepare_backing_file)."""
    backing_file, backing_device = (backing, None) if os.path.isfile(backing) else (None, backing)
    argv = _serve_argv(name, state_dir, run_dir, backing_file, size, backing_device,
                       {"--serial": serial, "--geometry": json.dumps(geometry),
                        "--guard-initiator": guard_initiator, "--migrator-serial": migrator_serial,
                        "--pass-through-source": pass_through_source,
                        "--chunk-size": str(chunk_size) if chunk_size else None,
                        "--min-rate": str(min_rate) if min_rate else None})
    process = start_daemon(argv, f"the backstore handler for {name}", log_path=log_path, env=_serve_env())
    client = BackstoreClient(name, run_dir)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ArrayError(_last_line(log_path) or f"the backstore handler for {name} exited, not serving")
        try:
            state = client.state()
        except ArrayError:
            state = None
        if state is not None and state.get("pid") == process.pid:
            return state
        if time.monotonic() > deadline:
            process.kill()
            raise ArrayError(f"the backstore handler for {name} did not serve in {timeout:.0f} s")
        time.sleep(0.2)


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as log:
            lines = log.read()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def handler_processes(name: str | None = None) -> list[psutil.Process]:
    """Every running `blockmig array serve --name NAME` (also one that no longer answers its socket); every
    handler's without `name`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        serving = "blockmig" in cmdline and cmdline[cmdline.index("blockmig") + 1:][:2] == ["array", "serve"]
        if serving and "--name" in cmdline and name in (None, served_name(cmdline)):
            found.append(process)
    return found


def served_name(cmdline: list[str]) -> str | None:
    """The volume a handler's command line serves."""
    after = cmdline[cmdline.index("--name") + 1:] if "--name" in cmdline else []
    return after[0] if after else None


def stop_handler(name: str, timeout: float = 60) -> bool:
    """SIGTERM every handler of `name` and wait: each completes what is in flight and removes its storage
    objects. One that does not stop in `timeout` is killed (its objects stay: remove_volume_leftovers).
    Returns whether one was running."""
    processes = handler_processes(name)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    return bool(processes)


def _serve_env() -> dict[str, str] | None:
    """The handler runs the very blockmig that starts it, not one found in the directory blockmig was run
    from (it starts in "/", and -P keeps its cwd off sys.path): one run from a tree gets that tree on its
    path; an installed one finds itself as its parent did (site-packages on PYTHONPATH would come before
    the standard library). None: the parent's environment as it is."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(blockmig.__file__)))
    if package_root in site.getsitepackages():
        return None
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


def _serve_argv(name: str, state_dir: str, run_dir: str, backing_file: str | None, size: int | None,
                backing_device: str | None, options: dict[str, str | None]) -> list[str]:
    """`blockmig array serve`'s command line; options whose value is None are left out."""
    argv = [sys.executable, "-P", "-m", "blockmig", "array", "serve", "--name", name,
            "--state-dir", os.path.abspath(state_dir), "--run-dir", os.path.abspath(run_dir)]
    if backing_file:  # absolute: the handler runs in "/"
        argv += ["--backing-file", os.path.abspath(backing_file), "--size", str(size)]
    else:
        argv += ["--backing-device", os.path.abspath(backing_device)]
    for option, value in options.items():
        if value:
            argv += [option, value]
    return argv


def stop_served_volume(served: ServedVolume, timeout: float = 60) -> None:
    """SIGTERM: the handler completes what is in flight and removes its storage objects."""
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ArrayError(
                f"the backstore handler for {served.name} did not stop in {timeout:.0f} s"
            ) from exc


class BackstoreClient:
    """Requests to a running handler; `saved_state` reads the state file when it is down."""

    def __init__(self, name: str, run_dir: str = RUN_DIR):
        self.name = name
        self.path = socket_path(name, run_dir)

    def request(self, op: str, timeout: float = 10, **fields) -> dict:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout)
                conn.connect(self.path)
                conn.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
                answer = json.loads(conn.makefile("rb").readline() or b"{}")
        except (OSError, ValueError) as exc:
            raise ArrayError(
                f"the backstore handler of {self.name} does not answer on {self.path}: {exc}"
            ) from exc
        if not answer.get("ok"):
            raise ArrayError(f"the backstore handler of {self.name} refused {op}: {answer.get('error')}")
        return answer

    def state(self) -> dict:
        return self.request("state")

    def arm_sequential(self, reserved: int = 0, window: int = 0) -> dict:
        """Before the copy's first read; `window`: how far past `reserved` it reads ahead."""
        return self.request("arm_sequential", reserved=reserved, window=window)

    def take_dirty(self) -> list[int]:
        """Pass-through: the chunks written where the copy may have read them first (for a delta pass)."""
        return self.request("take_dirty")["taken"]

    def redo(self, chunks: list[int]) -> list[int]:
        """Pass-through: chunks unlike the migrator's manifest are copied again where the host wrote them;
        returns those it never wrote (a real difference)."""
        return self.request("redo", chunks=list(chunks))["clean"]

    def copied(self, chunks: list[int]) -> dict:
        """Pass-through: a delta pass copied these chunks (a later take does not return them again)."""
        return self.request("copied", chunks=list(chunks))

    def commit(self, timeout: float = 300) -> dict:
        """Pass-through ends: the last dirty chunks copied by the array, the host's writes to them held
        meanwhile; then the host's view serves the destination alone. Returns the commit's record."""
        return self.request("commit", timeout=timeout)["commit"]

    def arm_delta(self, chunks) -> dict:
        return self.request("arm_delta", chunks=[list(c) for c in chunks])

    def disarm(self) -> dict:
        return self.request("disarm")

    def hand_over(self) -> dict:
        return self.request("hand_over")


def saved_state(name: str, state_dir: str = STATE_DIR):
    """The guard's journaled state (GuardState), whether or not a handler runs."""
    path = state_path(name, state_dir)
    if not os.path.exists(path):
        raise ArrayError(f"volume {name} has no backstore state file {path}")
    return load_state(path)
