"""Online migration's pure parts: mode choice, era blocks -> chunks, a delta copy on loop devices.

The tracking, the hold and the switch run on the real stack in tests/lab/test_online.py.
"""

from __future__ import annotations

import pytest
from datapath_helpers import read_volume
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmig.datapath.digest import Manifest, digest_chunk
from blockmig.errors import HostError, UsageError
from blockmig.orchestrator import online

SECTOR = 512


def test_linear_segments_of_an_lvm_table():
    table = "0 49152 linear 254:0 16384\n49152 8192 linear 254:0 114688"
    assert online.linear_segments(table, "254:0") == [
        online.Segment(0, 49152, 16384), online.Segment(49152, 8192, 114688)]


@pytest.mark.parametrize("table", ["0 100 striped 2 128 254:0 0 254:1 0", "0 100 linear 254:7 0",
                                   "0 100 era 7:0 /dev/mapper/x 128"])
def test_linear_segments_refuse_what_cannot_be_mapped(table):
    with pytest.raises(HostError, match="not linear on 254:0"):
        online.linear_segments(table, "254:0")


def test_era_block_is_the_largest_power_of_two_dividing_the_chunk():
    assert online.era_block_sectors(1 << 20) == 2048
    assert online.era_block_sectors(4 << 20) == 8192
    assert online.era_block_sectors(3 << 20) == 2048
    assert online.era_block_sectors(12288) == 8


@st.composite
def holders(draw):
    """A holder of up to 3 linear segments at arbitrary (sector) offsets of a map, an era block size, blocks."""
    map_sectors = draw(st.integers(64, 4096))
    lengths = draw(st.lists(st.integers(1, 512), min_size=1, max_size=3))
    segments, start = [], 0
    for length in lengths:
        length = min(length, map_sectors)
        offset = draw(st.integers(0, map_sectors - length))
        segments.append(online.Segment(start, length, offset))
        start += length
    block = draw(st.sampled_from([8, 16, 64, 256]))
    blocks = draw(st.lists(st.integers(0, start // block + 1), max_size=20))
    chunk = draw(st.sampled_from([4096, 8192, 65536]))
    return map_sectors * SECTOR, segments, block, sorted(set(blocks)), chunk


@settings(max_examples=300, deadline=None)
@given(holders())
def test_era_blocks_map_to_exactly_the_chunks_they_touch(case):
    size, segments, block, blocks, chunk = case
    expected = set()
    for b in blocks:  # sector by sector, the slow obvious way
        for sector in range(b * block, (b + 1) * block):
            for segment in segments:
                if segment.start <= sector < segment.start + segment.length:
                    expected.add((segment.offset + sector - segment.start) * SECTOR // chunk)
    assert online.chunks_of_blocks(blocks, block, segments, chunk, size) == expected


def test_online_is_refused_for_a_bare_disk_in_one_line():
    with pytest.raises(UsageError) as refused:
        online.choose_mode("online", False, None, "/dev/sdb")
    message = str(refused.value)
    assert "\n" not in message and "bare disk" in message and "--mode offline" in message and "relogin" in message
    with pytest.raises(UsageError, match="not one"):
        online.choose_mode("pass-through", False, None, "/dev/sdb")


def test_online_on_a_map_used_directly_is_a_pass_through(monkeypatch):
    monkeypatch.setattr(online, "holder_maps", lambda name: [])  # nothing stacked: a filesystem on the map
    assert online.choose_mode("online", False, "mpatha", "/dev/mapper/mpatha") == online.PASS_THROUGH
    assert online.choose_mode("pass-through", False, "mpatha", "/dev/mapper/mpatha") == online.PASS_THROUGH
    assert online.choose_mode(None, False, "mpatha", "/dev/mapper/mpatha") == "offline"  # the default stays
    with pytest.raises(UsageError, match="--fence is for --mode offline"):
        online.choose_mode("pass-through", True, "mpatha", "/dev/mapper/mpatha")


def test_mode_defaults():
    assert online.choose_mode(None, False, None, "/dev/sdb") == "offline"
    assert online.choose_mode("offline", False, "mpatha", "/dev/mapper/mpatha") == "offline"
    assert online.choose_mode(None, True, "mpatha", "/dev/mapper/mpatha") == "offline"  # a fence means offline
    with pytest.raises(UsageError, match="--fence is for --mode offline"):
        online.choose_mode("online", True, "mpatha", "/dev/mapper/mpatha")


def test_max_hold_bounds():
    with pytest.raises(UsageError, match="--max-hold"):
        online.new_state("mpatha", 0)


def test_copy_delta_copies_the_listed_chunks_only_and_updates_their_digests(loops):
    chunk, chunks = 65536, 16
    source = loops.attach("source", chunk * chunks, seed=1)
    destination = loops.attach("destination", chunk * chunks)
    before = read_volume(destination)
    data = read_volume(source)
    manifest = Manifest(chunk * chunks, chunk, [digest_chunk(before[i * chunk:(i + 1) * chunk]) for i in range(chunks)])
    listed = [1, 5, 6, 15]
    online.copy_delta(source, destination, listed, manifest)
    after = read_volume(destination)
    for index in range(chunks):
        part = slice(index * chunk, (index + 1) * chunk)
        assert after[part] == (data[part] if index in listed else before[part]), index
        assert manifest.chunk_digests[index] == digest_chunk(after[part])


def test_head_chunks_cover_what_lies_before_the_first_segment():
    lvm = [online.Segment(0, 2048, 2048 + 65536), online.Segment(0, 2048, 2048)]  # pe_start 1 MiB
    assert online.head_chunks(lvm, 1 << 20) == {0}
    assert online.head_chunks(lvm, 512 << 10) == {0, 1}
    assert online.head_chunks(lvm, 4 << 20) == {0}  # the chunk also holds the first extents: copied whole
    assert online.head_chunks([online.Segment(0, 2048, 0)], 1 << 20) == set()
    assert online.head_chunks([], 1 << 20) == set()
