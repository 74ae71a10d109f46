"""era_invalidate's XML and the era metadata size, without a kernel."""

import pytest

from blockmig.errors import HostError
from blockmig.host import era


def test_blocks_and_ranges_become_one_ascending_list():
    xml = '<blocks>\n  <block block="9"/>\n  <range begin="2" end="5"/>\n  <block block="0"/>\n</blocks>\n'
    assert era.parse_invalidate(xml) == [0, 2, 3, 4, 9]


def test_no_blocks():
    assert era.parse_invalidate("<blocks>\n</blocks>\n") == []


def test_unreadable_output_is_one_line_host_error():
    with pytest.raises(HostError, match="unreadable XML"):
        era.parse_invalidate("syscall 'open' failed")


def test_metadata_size_is_whole_4k_blocks_and_grows_with_the_volume():
    assert era.metadata_size(1024) % 4096 == 0
    assert era.metadata_size(16 * 1024 * 1024) > era.metadata_size(1024) + 100 * 1024 * 1024


def test_tracking_round_trips_through_json_data():
    tracking = era.Tracking("lv", "0 8 linear 254:0 0", "blockmig-era-origin-lv", "/j/era-lv.meta", 128, "/dev/loop3")
    assert era.Tracking.from_dict(tracking.to_dict()) == tracking
