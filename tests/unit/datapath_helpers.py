"""Helpers for the data path tests: random images, O_DIRECT reads, loop devices, the CLI in a child."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from blockmig.datapath.blockdev import allocate_aligned_buffer

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def write_random_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def read_volume(path: str, length: int | None = None) -> bytes:
    """Read with O_DIRECT on block devices, so no stale page cache can hide a difference."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if path.startswith("/dev/") else 0))
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        length = size if length is None else length
        buffer = allocate_aligned_buffer(max(length, 4096) + 4096)
        view = memoryview(buffer)[: -(-length // 4096) * 4096]
        done = 0
        while done < length:
            count = os.preadv(fd, [view[done:]], done)
            if count == 0:
                break
            done += count
        return bytes(view[:length])
    finally:
        os.close(fd)


def volume_sha256(path: str) -> str:
    return hashlib.sha256(read_volume(path)).hexdigest()


# Imports as root, then drops to `uid` before running the CLI: the interpreter and the
# checkout may live where an unprivileged user cannot read (e.g. under /root).
RUN_AS_USER = """
import os, sys
import blockmig.cli, blockmig.datapath
args = blockmig.cli.build_parser().parse_args(sys.argv[2:])
os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
raise SystemExit(blockmig.cli.run(args))
"""


def run_blockmig(*args: str, user: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process, optionally as an unprivileged `user`."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "blockmig"] if user is None else [sys.executable, "-c", RUN_AS_USER, str(user)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd="/",
    )


def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def attach_loop_device(image: str, *options: str) -> str:
    """`losetup --find` races with other users of this machine; a lost race is EBUSY, so retry."""
    for attempt in range(10):
        result = subprocess.run(["losetup", "--direct-io=on", *options, "--find", "--show", image],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.strip()
        time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"losetup {image}: {result.stderr.strip()}")


class LoopDevices:
    """Attaches loop devices over image files with direct IO; detaches every one at teardown."""

    def __init__(self, directory: Path):
        self._directory = directory
        self._attached: list[str] = []

    def attach(self, name: str, size: int, seed: int | None = None, sector_size: int = 512) -> str:
        image = self._directory / f"{name}.img"
        if seed is None:
            with open(image, "wb") as handle:
                handle.truncate(size)
        else:
            write_random_file(image, size, seed)
        device = attach_loop_device(str(image), "--sector-size", str(sector_size))
        self._attached.append(device)
        return device

    def adopt(self, device: str) -> None:
        """Detach `device` at teardown too."""
        self._attached.append(device)

    def detach_all(self) -> None:
        for device in reversed(self._attached):
            subprocess.run(["losetup", "--detach", device], capture_output=True)
        self._attached.clear()
