"""kill -9 at random moments, resume each time: the destination ends byte-identical to the source."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from datapath_helpers import REPO, MiB, read_volume, write_random_file

from blockmig.datapath import copy_volume, load_manifest, verify_volume
from blockmig.datapath.journal import CopyJournal
from blockmig.errors import UsageError

KILLS = 12


def journaled_address(journal: str) -> int:
    return CopyJournal.load(journal).reserved_address if os.path.exists(journal) else 0


def start_copy(source: str, destination: str, journal: str, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "blockmig", "copy", source, destination, "--journal", journal,
               "--resume", "--json", "--chunk-size", "512K", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_kill_9_at_random_points_then_resume_gives_an_identical_device(loops, tmp_path):
    seed = int(os.environ.get("BLOCKMIG_KILL_SEED", time.time()))
    rng = random.Random(seed)
    size = 48 * MiB
    source = loops.attach("src", size, seed=21)
    destination = loops.attach("dst", size)
    journal = str(tmp_path / "journal.json")
    kill_points = []  # (journaled address before the run, how the run was killed, journaled address after)
    while len(kill_points) < KILLS:
        before = journaled_address(journal)
        # Alternate: journal after every chunk or every 50 ms (then acknowledged chunks are
        # rewritten on resume); slow runs (16 MB/s) killed after a random delay, fast runs
        # (64 MB/s: the whole copy would take 0.75 s, so a loaded machine cannot let it finish
        # before the kill) killed as soon as a random number of chunk events has been read.
        interval = ["--journal-interval", "0" if len(kill_points) % 2 else "0.05"]
        throttled = len(kill_points) % 3 != 2
        process = start_copy(source, destination, journal, interval + ["--max-rate", "16M" if throttled else "64M"])
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0, 0.15))  # while starting up: imports, checks, opening the journal
            how = "startup"
        else:
            start = json.loads(process.stdout.readline())
            assert start["event"] == "start" and start["resume_from"] == before
            if throttled:
                time.sleep(rng.uniform(0, 0.25))
                how = "delay"
            else:
                for _ in range(rng.randint(1, 12)):
                    process.stdout.readline()
                how = "chunks"
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL, f"the copy finished before kill point {len(kill_points) + 1}"
        after = journaled_address(journal)
        assert before <= after < size
        kill_points.append((before, how, after))
    final = start_copy(source, destination, journal, [])
    stdout, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[0])["resume_from"] == kill_points[-1][2]
    assert read_volume(destination) == read_volume(source), f"seed {seed}, kill points {kill_points}"
    assert subprocess.run(["cmp", source, destination]).returncode == 0
    manifest = load_manifest(journal)
    assert verify_volume(destination, manifest) == manifest.volume_digest
    assert len({after for _, _, after in kill_points}) >= 5, f"kills did not land at distinct places: {kill_points}"


def test_resume_rewrites_chunks_acknowledged_but_not_journaled(tmp_path):
    """Simulates the crash window between the guard's ack and the journal write."""
    data = write_random_file(tmp_path / "src", 4 * MiB, seed=22)
    (tmp_path / "dst").write_bytes(bytes(4 * MiB))
    journal = str(tmp_path / "j.json")

    class Crash(Exception):
        pass

    def crash_after_third_chunk(guard, ack):
        if ack.reserved_address == 3 * MiB:
            raise Crash

    with pytest.raises(Crash):
        copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), journal, chunk_size=MiB,
                    allow_regular_files=True, journal_interval=3600, after_chunk=crash_after_third_chunk)
    assert journaled_address(journal) == 0  # three chunks durable on the device, none journaled
    events = []
    manifest = copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), journal, resume=True,
                           allow_regular_files=True, on_event=events.append)
    assert events[0]["resume_from"] == 0 and len([e for e in events if e["event"] == "chunk"]) == 4
    assert (tmp_path / "dst").read_bytes() == data
    assert manifest.complete


def test_resume_keeps_the_journal_chunk_size(tmp_path):
    write_random_file(tmp_path / "src", 2 * MiB, seed=23)
    (tmp_path / "dst").write_bytes(bytes(2 * MiB))
    journal = str(tmp_path / "j.json")

    def stop_after_first_chunk(guard, ack):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), journal, chunk_size=512 * 1024,
                    allow_regular_files=True, after_chunk=stop_after_first_chunk)
    with pytest.raises(UsageError, match="chunk size 1048576 differs from the journal's 524288"):
        copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), journal, chunk_size=MiB, resume=True,
                    allow_regular_files=True)
    manifest = copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), journal, resume=True, allow_regular_files=True)
    assert manifest.chunk_size == 512 * 1024 and manifest.complete
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()
