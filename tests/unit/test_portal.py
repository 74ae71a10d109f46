"""parse_portal and the portal spellings the host side compares (IPv4, IPv6, host names)."""

from __future__ import annotations

import pytest

from blockmig.errors import UsageError
from blockmig.host.iscsi import format_portal, normal_address, parse_portal


@pytest.mark.parametrize("portal, expected", [
    ("10.0.0.1:3260", ("10.0.0.1", 3260)),
    ("10.0.0.1", ("10.0.0.1", 3260)),
    ("127.0.0.2:3261", ("127.0.0.2", 3261)),
    ("[fd00::1]:3260", ("fd00::1", 3260)),
    ("[::1]", ("::1", 3260)),
    ("[FD00:0:0::1]:860", ("fd00::1", 860)),
    ("fd00::1", ("fd00::1", 3260)),  # bare: the whole is the address (its last group is not a port)
    ("fd00::1:3260", ("fd00::1:3260", 3260)),
    ("localhost:3260", ("127.0.0.1", 3260)),
    ("localhost", ("127.0.0.1", 3260)),
])
def test_portals_parse_to_the_address_lio_and_iscsiadm_know(portal, expected):
    assert parse_portal(portal) == expected


@pytest.mark.parametrize("portal, message", [
    ("", "is not IP[:PORT]"),
    ("10.0.0.1:", "port '' is not a number"),
    ("10.0.0.1:abc", "port 'abc' is not a number"),
    ("10.0.0.1:0", "port '0' is not a number from 1 to 65535"),
    ("10.0.0.1:65536", "from 1 to 65535"),
    ("[fd00::1", "an IPv6 portal is [ADDRESS] or [ADDRESS]:PORT"),
    ("[fd00::1]3260", "an IPv6 portal is [ADDRESS] or [ADDRESS]:PORT"),
    ("[10.0.0.1]:3260", "in brackets is not an IPv6 address"),
    ("no-such-host.invalid:3260", "cannot resolve 'no-such-host.invalid'"),
    ("10.0.0.1 :3260", "is not IP[:PORT]"),
])
def test_bad_portals_are_one_line_usage_errors(portal, message):
    with pytest.raises(UsageError) as refused:
        parse_portal(portal)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_host_name_resolves_to_a_portal_the_target_offers():
    assert parse_portal("localhost", among=[("127.0.0.1", 3260), ("[::1]", 3260)]) == ("127.0.0.1", 3260)
    with pytest.raises(UsageError, match=r"localhost resolves to 127\.0\.0\.1, none of them a portal of the "
                                         r"target \(127\.0\.0\.2:3260, \[::1\]:3260\)"):
        parse_portal("localhost:3260", among=[("127.0.0.2", 3260), ("::1", 3260)])


def test_spellings_of_one_address_compare_equal_and_format_for_iscsiadm():
    assert normal_address("[FD00:0::1]") == normal_address("fd00::1") == "fd00::1"
    assert normal_address("10.0.0.1") == "10.0.0.1"
    assert format_portal("fd00::1", 3260) == format_portal("[fd00::1]", 3260) == "[fd00::1]:3260"
    assert format_portal("10.0.0.1", 3260) == "10.0.0.1:3260"
    ip, port = parse_portal(format_portal(*parse_portal("[fd00::1]:3261")))
    assert (ip, port) == ("fd00::1", 3261)
