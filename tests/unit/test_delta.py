"""A delta pass's copy (datapath/delta.py) on loop devices: the listed chunks only, through the guard."""

from __future__ import annotations

from datapath_helpers import read_volume

from blockmig.datapath.delta import changed_chunks, copy_delta
from blockmig.datapath.digest import Manifest, digest_chunk

CHUNK, CHUNKS = 65536, 16


def test_copy_delta_copies_the_listed_chunks_only_and_updates_their_digests(loops):
    source = loops.attach("source", CHUNK * CHUNKS, seed=1)
    destination = loops.attach("destination", CHUNK * CHUNKS)
    before = read_volume(destination)
    data = read_volume(source)
    manifest = Manifest(CHUNK * CHUNKS, CHUNK,
                        [digest_chunk(before[i * CHUNK:(i + 1) * CHUNK]) for i in range(CHUNKS)])
    assert changed_chunks(source, list(range(CHUNKS)), manifest) == set(range(CHUNKS))
    listed = [1, 5, 6, 15]
    copy_delta(source, destination, listed, manifest)
    after = read_volume(destination)
    for index in range(CHUNKS):
        part = slice(index * CHUNK, (index + 1) * CHUNK)
        assert after[part] == (data[part] if index in listed else before[part]), index
        assert manifest.chunk_digests[index] == digest_chunk(after[part])
    assert changed_chunks(destination, list(range(CHUNKS)), manifest) == set()
    assert changed_chunks(source, list(range(CHUNKS)), manifest) == set(range(CHUNKS)) - set(listed)
