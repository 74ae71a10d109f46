"""Online mode's choice (online is pass-through on any multipath map), and journals of the removed era mode.

The pass-through itself runs on the real stack in tests/lab/test_pass_through_*.py.
"""

from __future__ import annotations

import pytest

from blockmig.errors import MigrationError, UsageError
from blockmig.orchestrator import migration, online
from blockmig.state import MigrationJournal

MAP = ("mpatha", "/dev/mapper/mpatha")


def test_online_is_refused_for_a_bare_disk_in_one_line():
    for requested in ("online", "pass-through"):
        with pytest.raises(UsageError) as refused:
            online.choose_mode(requested, False, None, "/dev/sdb")
        message = str(refused.value)
        assert "\n" not in message and "bare disk" in message and "--mode offline" in message, message
        assert "relogin" in message


@pytest.mark.parametrize("requested", ["online", "pass-through"])
def test_online_on_any_map_is_a_pass_through(requested):
    assert online.choose_mode(requested, False, *MAP) == online.PASS_THROUGH
    with pytest.raises(UsageError, match="--fence is for --mode offline"):
        online.choose_mode(requested, True, *MAP)


def test_the_default_for_every_map_is_a_pass_through_and_offline_is_asked_for():
    # whatever uses the map (a filesystem on it, LVM, nothing): the choice does not look at the host's stack
    assert online.choose_mode(None, False, *MAP) == online.PASS_THROUGH
    assert online.choose_mode(None, False, *MAP, "multipath") == online.PASS_THROUGH
    assert online.choose_mode(None, True, *MAP) == "offline"  # a fence given means offline
    assert online.choose_mode(None, False, *MAP, "relogin") == "offline"  # a relogin switch is offline
    assert online.choose_mode("offline", False, *MAP) == "offline"
    assert online.choose_mode(None, False, None, "/dev/sdb") == "offline"  # a bare disk


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
