"""The copy engine on regular files and real loop devices: identical data, digests, events, verify."""

from __future__ import annotations

import hashlib
import subprocess
import threading

import pytest
from datapath_helpers import MiB, json_events, read_volume, run_blockmig, write_random_file

from blockmig.datapath import copy_volume, load_manifest, verify_volume
from blockmig.datapath.digest import Manifest
from blockmig.datapath.journal import CopyJournal
from blockmig.errors import GuardRefusedWrite, JournalError, VerifyError


def test_copy_between_files_with_odd_size_gives_identical_bytes_and_digests(tmp_path):
    size = 5 * MiB + 512 * 3  # not a multiple of the chunk: the last chunk is short
    data = write_random_file(tmp_path / "src", size, seed=1)
    (tmp_path / "dst").write_bytes(b"\xaa" * (size + 4096))
    events = []
    manifest = copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "journal.json"),
                           chunk_size=1 * MiB, allow_regular_files=True, on_event=events.append)
    copied = (tmp_path / "dst").read_bytes()
    assert copied[:size] == data
    assert copied[size:] == b"\xaa" * 4096, "bytes past the source's size must stay untouched"
    assert subprocess.run(["cmp", "-n", str(size), str(tmp_path / "src"), str(tmp_path / "dst")]).returncode == 0
    chunks = [data[i:i + MiB] for i in range(0, size, MiB)]
    assert manifest.chunk_digests == [hashlib.sha256(c).hexdigest() for c in chunks]
    hash_list = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()
    assert manifest.volume_digest == hash_list
    chunk_events = [e for e in events if e["event"] == "chunk"]
    assert [e["address"] for e in chunk_events] == [i * MiB for i in range(6)]
    assert chunk_events[-1]["length"] == 512 * 3
    assert events[0]["event"] == "start" and events[-1] == {**events[-1], "event": "done", "volume_digest": hash_list}
    journal = CopyJournal.load(str(tmp_path / "journal.json"))
    assert journal.reserved_address == size and journal.manifest.complete


def test_writes_are_strictly_ordered_and_each_follows_the_previous_ack(tmp_path):
    write_random_file(tmp_path / "src", 3 * MiB, seed=2)
    (tmp_path / "dst").write_bytes(bytes(3 * MiB))
    acks = []
    copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "j.json"), chunk_size=256 * 1024,
                allow_regular_files=True, after_chunk=lambda guard, ack: acks.append((ack, guard.reserved_address)))
    addresses = [ack.address for ack, _ in acks]
    assert addresses == list(range(0, 3 * MiB, 256 * 1024))
    for ack, reserved in acks:
        assert ack.reserved_address == reserved == ack.address + ack.length



def test_copies_on_threads_of_one_process_keep_their_own_guard_order_and_journal(tmp_path):
    """As a multi-volume migration (and scripts/bench --parallel) runs them: one copy_volume per thread."""
    volumes = range(4)
    data = {n: write_random_file(tmp_path / f"src{n}", (3 + n) * MiB + 512, seed=10 + n) for n in volumes}
    for n in volumes:
        (tmp_path / f"dst{n}").write_bytes(bytes(len(data[n])))
    acks = {n: [] for n in volumes}
    failures = []

    def copy(n):
        try:
            copy_volume(str(tmp_path / f"src{n}"), str(tmp_path / f"dst{n}"), str(tmp_path / f"j{n}.json"),
                        chunk_size=256 * 1024, allow_regular_files=True,
                        after_chunk=lambda guard, ack: acks[n].append((ack, guard.reserved_address)))
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=copy, args=(n,)) for n in volumes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for n in volumes:
        assert (tmp_path / f"dst{n}").read_bytes() == data[n]
        assert [ack.address for ack, _ in acks[n]] == list(range(0, len(data[n]), 256 * 1024))
        assert all(ack.reserved_address == reserved == ack.address + ack.length for ack, reserved in acks[n])
        journal = CopyJournal.load(str(tmp_path / f"j{n}.json"))
        assert journal.manifest.complete and journal.reserved_address == len(data[n])

def test_wrong_address_write_during_copy_is_refused_and_copy_still_identical(tmp_path):
    data = write_random_file(tmp_path / "src", 2 * MiB, seed=3)
    (tmp_path / "dst").write_bytes(bytes(2 * MiB))
    refusals = []

    def tamper(guard, ack):
        if ack.address == 512 * 1024:
            with pytest.raises(GuardRefusedWrite) as refused:
                guard.write(0, b"\xff" * 512)  # an attempt to overwrite already-copied data
            refusals.append(refused.value)

    copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "j.json"), chunk_size=512 * 1024,
                allow_regular_files=True, after_chunk=tamper)
    assert [(r.designated, r.reserved) for r in refusals] == [(0, 1024 * 1024)]
    assert (tmp_path / "dst").read_bytes() == data


def test_copy_and_verify_between_loop_devices(loops, tmp_path):
    size = 24 * MiB + 64 * 1024
    source = loops.attach("src", size, seed=4)
    destination = loops.attach("dst", size + MiB)
    manifest = copy_volume(source, destination, str(tmp_path / "j.json"), chunk_size=4 * MiB)
    assert read_volume(destination, size) == read_volume(source)
    assert subprocess.run(["cmp", "-n", str(size), source, destination]).returncode == 0
    assert verify_volume(destination, manifest) == manifest.volume_digest
    assert verify_volume(source, load_manifest(str(tmp_path / "j.json"))) == manifest.volume_digest


def test_copy_on_4096_byte_sector_loop_devices(loops, tmp_path):
    size = 9 * MiB + 4096 * 5
    source = loops.attach("src", size, seed=5, sector_size=4096)
    destination = loops.attach("dst", size, sector_size=4096)
    manifest = copy_volume(source, destination, str(tmp_path / "j.json"), chunk_size=2 * MiB)
    assert len(manifest.chunk_digests) == 5
    assert read_volume(destination) == read_volume(source)
    assert subprocess.run(["cmp", source, destination]).returncode == 0


def test_verify_names_the_chunk_and_byte_range_that_differs(loops, tmp_path):
    source = loops.attach("src", 8 * MiB, seed=6)
    destination = loops.attach("dst", 8 * MiB)
    manifest = copy_volume(source, destination, str(tmp_path / "j.json"), chunk_size=MiB)
    with open(destination, "r+b") as handle:  # damage one byte in chunk 5
        handle.seek(5 * MiB + 1234)
        handle.write(b"\x00" if read_volume(source)[5 * MiB + 1234] else b"\x01")
    with pytest.raises(VerifyError, match=rf"chunk 5 \(bytes {5 * MiB}-{6 * MiB - 1}\)"):
        verify_volume(destination, manifest)
    result = run_blockmig("verify", destination, "--manifest", str(tmp_path / "j.json"))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"blockmig: error: {destination}: chunk 5 (bytes {5 * MiB}-{6 * MiB - 1}) has sha256 ")
    assert line.endswith(f", manifest says {manifest.chunk_digests[5][:16]}...")
    assert verify_volume(source, manifest) == manifest.volume_digest


def test_verify_refuses_an_unfinished_manifest(tmp_path):
    write_random_file(tmp_path / "vol", MiB)
    with pytest.raises(VerifyError, match="covers 1 of 4 chunks"):
        verify_volume(str(tmp_path / "vol"), Manifest(MiB, 256 * 1024, ["00" * 32]), allow_regular_file=True)


def test_cli_copy_json_events_and_manifest_then_verify_with_source(loops, tmp_path):
    source = loops.attach("src", 6 * MiB, seed=7)
    destination = loops.attach("dst", 6 * MiB)
    result = run_blockmig("copy", source, destination, "--chunk-size", "2M", "--json",
                          "--journal", str(tmp_path / "j.json"), "--manifest", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    assert [e["event"] for e in events] == ["start", "chunk", "chunk", "chunk", "done"]
    assert events[-1]["volume_digest"] == load_manifest(str(tmp_path / "m.json")).volume_digest
    result = run_blockmig("verify", destination, "--manifest", str(tmp_path / "m.json"), "--source", source)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [f"verified {destination}", f"verified {source}"]


def test_max_rate_throttles_the_copy(tmp_path):
    write_random_file(tmp_path / "src", 2 * MiB)
    (tmp_path / "dst").write_bytes(bytes(2 * MiB))
    events = []
    copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "j.json"), chunk_size=256 * 1024,
                allow_regular_files=True, max_rate=8 * MiB, on_event=events.append)
    assert events[-1]["seconds"] >= 0.2  # 2 MiB at 8 MiB/s is 0.25 s; unthrottled it takes milliseconds


def test_existing_journal_without_resume_is_refused(tmp_path):
    write_random_file(tmp_path / "src", MiB)
    (tmp_path / "dst").write_bytes(bytes(MiB))
    copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "j.json"), allow_regular_files=True)
    with pytest.raises(JournalError, match="exists \\(copy complete\\): pass --resume"):
        copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), str(tmp_path / "j.json"), allow_regular_files=True)
