"""WWID <-> serial conversion (the real kernel's answer is checked in tests/lab/test_arrays_and_paths.py)."""

import pytest

from blockmig.array.lio import check_serial, normalize_wwid, wwid_for_serial
from blockmig.errors import ArrayError, HostError
from blockmig.host.udev import wwid_from_sysfs


def test_wwid_takes_the_first_25_hex_digits_of_the_serial():
    assert wwid_for_serial("b10c0000000000000000000000000001") == "36001405" + "b10c000000000000000000000"


def test_wwid_skips_non_hex_characters_of_a_uuid_serial():
    serial = "0b6ea0b4-5a3f-4e3c-9f5a-29c2f1e0d7a8"
    assert wwid_for_serial(serial) == "36001405" + "0b6ea0b45a3f4e3c9f5a29c2f"


def test_wwid_zero_fills_a_short_serial_and_lowers_case():
    assert wwid_for_serial("ABC-xyz") == "36001405" + "abc".ljust(25, "0")


def test_normalize_wwid_accepts_the_forms_tools_print():
    wwid = "36001405b10c000000000000000000000"
    assert normalize_wwid("naa.6001405B10C000000000000000000000") == wwid
    assert normalize_wwid("0x6001405b10c000000000000000000000") == wwid
    assert normalize_wwid(" " + wwid + "\n") == wwid


def test_sysfs_designator_becomes_udev_wwid():
    assert wwid_from_sysfs("naa.6001405abc") == "36001405abc"
    with pytest.raises(HostError):
        wwid_from_sysfs("t10.LIO-ORG something")


@pytest.mark.parametrize("serial", ["", "has space", "x" * 253, "tab\there"])
def test_bad_serials_are_refused(serial):
    with pytest.raises(ArrayError):
        check_serial(serial)
