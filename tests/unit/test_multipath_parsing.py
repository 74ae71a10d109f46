"""Parsing multipathd's raw listings, and what a refused flush says. This fakes multipathd's output; the
lab tests (tests/lab/) run the same parsers and flushes against the real daemon."""

import pytest

from blockmig.errors import HostError
from blockmig.host import multipath
from blockmig.host.multipath import MAP_FORMAT, PATH_FORMAT, parse_maps, parse_paths


def test_formats_put_the_only_field_with_spaces_last():
    assert MAP_FORMAT == "%n %w %d"
    assert PATH_FORMAT.endswith("%T")


def test_parse_maps():
    text = "mpatha 36001405b10c000000000000000000000 dm-0\nmpathb 36001405aaaa000000000000000000000 dm-3\n"
    maps = parse_maps(text)
    assert [(m.name, m.wwid, m.dm) for m in maps] == [
        ("mpatha", "36001405b10c000000000000000000000", "dm-0"),
        ("mpathb", "36001405aaaa000000000000000000000", "dm-3"),
    ]
    assert maps[0].device == "/dev/mapper/mpatha"


def test_parse_maps_ignores_empty_and_foreign_lines():
    assert parse_maps("") == []
    assert parse_maps("ok\n\n") == []


def test_parse_paths_with_orphan_and_pending_checker():
    text = (
        "sda 36001405b10c000000000000000000000 mpatha active running ready\n"
        "sdb 36001405b10c000000000000000000000 mpatha failed running i/o pending\n"
        "sdc 36001405cccc000000000000000000000 [orphan] undef running faulty\n"
    )
    paths = parse_paths(text)
    assert [p.dev for p in paths] == ["sda", "sdb", "sdc"]
    assert paths[0].usable and not paths[1].usable and not paths[2].usable
    assert paths[1].checker_state == "i/o pending"
    assert paths[2].map_name == ""


@pytest.mark.parametrize("mounted", [True, False], ids=["a mount", "nothing the host shows"])
def test_a_map_that_stays_in_use_is_refused_naming_what_holds_it(monkeypatch, mounted):
    from blockmig.host import usage

    def refuse(argv, what):
        raise HostError(f"{what}: mpatha: map in use")

    mounts = (usage.Mount("dm-0", "/srv/db", "xfs", True),) if mounted else ()
    monkeypatch.setattr(multipath, "_run", refuse)
    monkeypatch.setattr(multipath, "settle", lambda timeout: None)
    users = usage.VolumeUsers("dm-0", ("dm-0",), mounts, ())
    monkeypatch.setattr(usage, "volume_users", lambda device: users)
    with pytest.raises(HostError) as refused:
        multipath.flush_map("mpatha", timeout=0.2)
    message = str(refused.value)
    assert "map in use" in message and "\n" not in message
    expected = "xfs on /srv/db mounted read-write" if mounted else "lazily unmounted"
    assert expected in message, message
