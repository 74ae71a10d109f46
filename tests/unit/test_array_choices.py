"""Pure choices of the array side: host LUN numbers, lab serials, block sizes (LIO itself: tests/lab)."""

import pytest

from blockmig.array.lio import MAX_MAPPED_LUN, _check_block_size, choose_mapped_lun, wwid_for_serial
from blockmig.errors import ArrayError
from blockmig.lab import SOURCE_SERIAL, lab_serial


def test_the_tpg_lun_number_is_kept_when_the_initiator_has_it_free():
    assert choose_mapped_lun({0, 1, 2}, 5) == 5
    assert choose_mapped_lun(set(), 0) == 0


def test_a_taken_number_gives_the_lowest_free_one():
    assert choose_mapped_lun({0, 1, 3}, 1) == 2
    assert choose_mapped_lun({1, 2}, 2) == 0
    assert choose_mapped_lun({0}, None) == 1


def test_a_number_out_of_range_is_not_kept():
    assert choose_mapped_lun({0}, MAX_MAPPED_LUN + 1) == 1
    assert choose_mapped_lun(set(), -1) == 0


def test_an_initiator_with_every_number_taken_is_refused():
    with pytest.raises(ArrayError, match="no free mapped LUN"):
        choose_mapped_lun(set(range(MAX_MAPPED_LUN + 1)), 3)


def test_lab_serials_are_hex_and_give_distinct_wwids():
    names = ["lab-source", "lab-4k", "lab-block-512", "lab-block-4096", "lab-mapped", "a", "b"]
    serials = [lab_serial(name) for name in names]
    assert all(set(s) <= set("0123456789abcdef") and len(s) == 32 for s in serials)
    assert serials == [lab_serial(name) for name in names]  # the same name, the same WWID every run
    wwids = {wwid_for_serial(s) for s in serials} | {wwid_for_serial(SOURCE_SERIAL)}
    assert len(wwids) == len(names) + 1


@pytest.mark.parametrize("block_size", [512, 1024, 2048, 4096])
def test_lio_block_sizes_are_accepted(block_size):
    _check_block_size(block_size, 8 * 4096)


def test_other_block_sizes_and_sizes_not_a_multiple_are_refused():
    with pytest.raises(ArrayError, match="not one LIO offers"):
        _check_block_size(8192, 8 * 8192)
    with pytest.raises(ArrayError, match="not a multiple of its 4096-byte blocks"):
        _check_block_size(4096, 4096 + 512)
