"""Online mode's choice (online is pass-through on any multipath map), and journals of the removed era mode.

The pass-through itself runs on the real stack in tests/lab/test_pass_through_*.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from blockmig.errors import MigrationError, UsageError
from blockmig.orchestrator import migration, online
from blockmig.state import MigrationJournal

MAP = ("mpatha", "/dev/mapper/mpatha")


@pytest.fixture
def host(monkeypatch):
    """The host's map: what is stacked on it and who uses it (set by each test)."""
    seen = SimpleNamespace(holders=[], mounts=[], writers=[])
    monkeypatch.setattr(online, "holder_maps", lambda name: seen.holders)
    monkeypatch.setattr(online.usage, "volume_users",
                        lambda device: SimpleNamespace(mounts=seen.mounts, writers=seen.writers))
    return seen


def test_online_is_refused_for_a_bare_disk_in_one_line():
    for requested in ("online", "pass-through"):
        with pytest.raises(UsageError) as refused:
            online.choose_mode(requested, False, None, "/dev/sdb")
        message = str(refused.value)
        assert "\n" not in message and "bare disk" in message and "--mode offline" in message, message
        assert "relogin" in message


@pytest.mark.parametrize("stacked", [[], ["blockmigvg-data", "blockmigvg-raw"]], ids=["used-directly", "lvm"])
@pytest.mark.parametrize("requested", ["online", "pass-through"])
def test_online_on_any_map_is_a_pass_through(host, requested, stacked):
    host.holders = stacked
    assert online.choose_mode(requested, False, *MAP) == online.PASS_THROUGH
    with pytest.raises(UsageError, match="--fence is for --mode offline"):
        online.choose_mode(requested, True, *MAP)


def test_the_default_for_a_map_with_lvm_or_partitions_stacked_is_a_pass_through(host):
    host.holders = ["blockmigvg-data"]
    assert online.choose_mode(None, False, *MAP) == online.PASS_THROUGH
    assert online.choose_mode(None, True, *MAP) == "offline"  # a fence given means offline
    assert online.choose_mode("offline", False, *MAP) == "offline"


def test_the_default_for_a_map_used_directly_and_for_a_bare_disk_stays_offline(host):
    assert online.choose_mode(None, False, *MAP) == "offline"  # nothing stacked: a filesystem on the map
    host.holders = ["mpatha1"]
    host.mounts = [SimpleNamespace(device="mpatha", mountpoint="/srv")]  # and a mount on the map itself
    assert online.choose_mode(None, False, *MAP) == "offline"
    host.mounts, host.writers = [], [SimpleNamespace(device="mpatha", pid=7, name="db")]
    assert online.choose_mode(None, False, *MAP) == "offline"
    assert online.choose_mode(None, False, None, "/dev/sdb") == "offline"


def test_an_unknown_mode_and_max_hold_bounds():
    with pytest.raises(UsageError, match="--mode must be one of online, offline, pass-through"):
        online.choose_mode("live", False, *MAP)
    with pytest.raises(UsageError, match="--max-hold"):
        online.new_pass_through_state(0)


def test_a_journal_of_the_removed_era_mode_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "migrations"))
    monkeypatch.setenv("BLOCKMIG_LOCK_DIR", str(tmp_path / "locks"))
    MigrationJournal.create("old-era", mode="online", state="failed", source={"wwid": "36001405aa"},
                            destination={}, migrator={}, online={"holders": ["vg-lv"], "trackings": {}})
    for action in (migration.run_migration, migration.rollback_migration, migration.migration_status):
        with pytest.raises(MigrationError) as refused:
            action("old-era")
        message = str(refused.value)
        assert "\n" not in message and "dm-era online mode" in message, message
        assert "the blockmig version that started it" in message
    assert [summary["id"] for summary in migration.migration_status()] == ["old-era"]  # still listed
    assert MigrationJournal.load("old-era").data["state"] == "failed"  # and left as it was
