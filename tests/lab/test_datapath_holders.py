"""Inside the lab VM: a destination held by a real device-mapper map is refused.

The unit suite shows this refusal with a stand-in sysfs tree because the build
machine has no device-mapper; this is the same check against the real kernel.
Needs root, losetup and dmsetup; it fails (never skips) when they are missing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_copy_refuses_a_destination_held_by_a_dm_map(tmp_path):
    (tmp_path / "src.img").write_bytes(os.urandom(4 * MiB))
    (tmp_path / "dst.img").write_bytes(b"\x5a" * 4 * MiB)
    source = run("losetup", "--direct-io=on", "--find", "--show", str(tmp_path / "src.img"))
    destination = run("losetup", "--direct-io=on", "--find", "--show", str(tmp_path / "dst.img"))
    map_name = f"blockmig-holder-{os.getpid()}"
    try:
        run("dmsetup", "create", map_name, "--table", f"0 {4 * MiB // 512} linear {destination} 0")
        dm_device = os.path.basename(os.path.realpath(f"/dev/mapper/{map_name}"))
        result = subprocess.run(
            [sys.executable, "-m", "blockmig", "copy", source, destination, "--journal", str(tmp_path / "j.json")],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        major_minor = f"{os.major(os.stat(destination).st_rdev)}:{os.minor(os.stat(destination).st_rdev)}"
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"blockmig: error: destination {destination} is held by {dm_device} (/sys/dev/block/{major_minor}/holders)"
        ]
    finally:
        subprocess.run(["dmsetup", "remove", map_name], capture_output=True)
        subprocess.run(["losetup", "--detach", source], capture_output=True)
        subprocess.run(["losetup", "--detach", destination], capture_output=True)
    assert hashlib.sha256((tmp_path / "dst.img").read_bytes()).digest() == hashlib.sha256(b"\x5a" * 4 * MiB).digest()
    assert not (tmp_path / "j.json").exists()
