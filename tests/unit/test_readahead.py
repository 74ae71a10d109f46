"""The read-ahead's contract: address order, digests, bounded buffers, errors in order, no thread left behind;
and the start-up savings of the copy path (populated buffers, no host stack imported by `blockmig copy`)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import subprocess
import sys

import pytest
from datapath_helpers import REPO, MiB, write_random_file

from blockmig import cli, lab
from blockmig.datapath import copy_volume, readahead
from blockmig.datapath.blockdev import allocate_aligned_buffer, open_source
from blockmig.errors import DeviceError

CHUNK = 256 * 1024


@pytest.fixture
def source(tmp_path):
    data = write_random_file(tmp_path / "src", 10 * CHUNK + 512, seed=31)
    volume = open_source(str(tmp_path / "src"), allow_regular_file=True)
    yield volume, data
    volume.close()


@pytest.mark.parametrize("readers", [1, 2, 3])
def test_chunks_come_in_address_order_with_their_digests(source, readers):
    volume, data = source
    with readahead.ReadAhead(volume, 2 * CHUNK, len(data), CHUNK, depth=3, readers=readers) as chunks:
        seen = []
        for chunk in chunks:
            assert chunk.index == chunk.address // CHUNK
            assert chunk.digest == hashlib.sha256(data[chunk.address:chunk.address + CHUNK]).hexdigest()
            assert bytes(chunk.data) == data[chunk.address:chunk.address + CHUNK]
            seen.append(chunk.address)
            chunks.release(chunk)
    assert seen == list(range(2 * CHUNK, len(data), CHUNK))


def test_reads_never_run_more_than_depth_chunks_ahead_of_the_consumer(source, monkeypatch):
    volume, data = source
    issued = []
    real_preadv = os.preadv
    monkeypatch.setattr(readahead.os, "preadv", lambda fd, buffers, offset: issued.append(offset) or
                        real_preadv(fd, buffers, offset))
    with readahead.ReadAhead(volume, 0, len(data), CHUNK, depth=3, readers=2) as chunks:
        for chunk in chunks:
            # Chunks index..index+2 may be in buffers; nothing past them can have been read.
            assert max(issued) <= chunk.address + 2 * CHUNK
            chunks.release(chunk)
    assert sorted(issued) == list(range(0, len(data), CHUNK))


def test_a_read_error_reaches_the_consumer_after_the_chunks_before_it(source, monkeypatch):
    volume, data = source
    real_preadv = os.preadv

    def failing_preadv(fd, buffers, offset):
        if offset == 4 * CHUNK:
            raise OSError(5, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(readahead.os, "preadv", failing_preadv)
    delivered = []
    with pytest.raises(DeviceError, match=rf"read at byte {4 * CHUNK} of .*src failed: Input/output error"):
        with readahead.ReadAhead(volume, 0, len(data), CHUNK, depth=4, readers=2) as chunks:
            for chunk in chunks:
                delivered.append(chunk.address)
                chunks.release(chunk)
    assert delivered == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]


def test_leaving_early_stops_every_reader_thread(source):
    volume, data = source
    with readahead.ReadAhead(volume, 0, len(data), CHUNK, depth=4, readers=3) as chunks:
        threads = list(chunks._threads)
        next(iter(chunks))
    assert threads and not any(thread.is_alive() for thread in threads)


def test_aligned_buffers_are_populated_when_allocated():
    """Page by page, faulting a buffer in costs as much CPU as copying it in the lab VM."""
    buffer = allocate_aligned_buffer(MiB)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert start % 4096 == 0
    with open("/proc/self/pagemap", "rb") as pagemap:  # one 64-bit entry per page; bit 63: present in RAM
        pagemap.seek(start // 4096 * 8)
        entries = struct.unpack(f"{MiB // 4096}Q", pagemap.read(MiB // 4096 * 8))
    assert all(entry >> 63 for entry in entries), f"{sum(entry >> 63 for entry in entries)} of {len(entries)} pages present"


def test_copy_command_line_does_not_import_the_host_stack():
    code = ("import sys, blockmig.cli; blockmig.cli.build_parser().parse_args(['copy', 'a', 'b']); "
            "print(sorted(m for m in sys.modules if m.startswith(('blockmig.host', 'blockmig.lab', 'blockmig.array', "
            "'pyudev', 'tenacity', 'asyncio', 'concurrent'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.stdout.strip() == "[]"


def test_lab_up_and_down_keep_their_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(lab, "lab_up", lambda size, backing_dir, on_step: calls.append((size, backing_dir)) or
                        {"up": True, "arrays": [], "sessions": [], "maps": []})
    monkeypatch.setattr(lab, "lab_down", lambda backing_dir, on_step: calls.append(backing_dir) or [])
    parser = cli.build_parser()
    cli.run(parser.parse_args(["lab", "up"]))
    cli.run(parser.parse_args(["lab", "up", "--size", "8M", "--backing-dir", "/x"]))
    cli.run(parser.parse_args(["lab", "down"]))
    assert calls == [(lab.DEFAULT_SIZE, lab.DEFAULT_BACKING_DIR), (8 * MiB, "/x"), lab.DEFAULT_BACKING_DIR]


def test_done_event_reports_the_copy_loops_cpu_seconds(tmp_path):
    write_random_file(tmp_path / "src", 2 * MiB, seed=32)
    (tmp_path / "dst").write_bytes(bytes(2 * MiB))
    events = []
    copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "j.json"), chunk_size=CHUNK,
                allow_regular_files=True, on_event=events.append)
    assert events[-1]["event"] == "done" and 0 <= events[-1]["cpu_seconds"] < 60


def test_default_depth_keeps_the_read_ahead_within_24_mib_and_readers_within_buffers(source, monkeypatch):
    assert [readahead.default_depth(size) for size in (256 * 1024, 4 * MiB, 8 * MiB, 64 * MiB)] == [6, 6, 3, 2]
    volume, data = source
    allocated = []
    monkeypatch.setattr(readahead, "allocate_aligned_buffer", lambda length: allocated.append(length) or
                        allocate_aligned_buffer(length))
    with readahead.ReadAhead(volume, 0, len(data), CHUNK, readers=3) as chunks:
        assert (allocated, len(chunks._threads)) == ([CHUNK] * 6, 3)
    with readahead.ReadAhead(volume, 0, len(data), CHUNK, depth=1, readers=3) as chunks:
        assert len(chunks._threads) == 1
        assert [c.address for c in chunks if not chunks.release(c)] == list(range(0, len(data), CHUNK))
