"""The group switch (`--switch together`): several verified volumes switched in one hold, or none.

The members are brought to the switch by real migrations stopped (kill -9) right after the
switch's prepare; the group switch then runs over their journals, as a plan's resume does.
"""

import signal

from migrate_support import (  # noqa: F401  (migration_lab is a fixture)
    KERNEL_BACKSTORE,
    add_host_volume,
    blockmig,
    journal,
    migration_lab,
    start_blockmig,
    wait_until_stopped,
)
from workloads import OrderedPairWriter

from blockmig.array import lio
from blockmig.errors import MigrationError
from blockmig.host import multipath
from blockmig.state import MigrationJournal
from blockmig.switch import HostSwitch, switch_group


def _kill_at(stop_at: str, *args: str) -> None:
    process = start_blockmig(*args, stop_at=stop_at)
    wait_until_stopped(process)
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def _bring_to_the_switch(volumes: list, migration_ids: list[str]) -> None:
    """Copied and verified, prepared for the switch, then killed: their maps stay held by the suspend fence.

    Every destination is made first: making one reconfigures multipathd (the migrator's disk is
    blacklisted), which blockmig refuses while another volume's suspend fence holds its map.
    """
    for volume, migration_id in zip(volumes, migration_ids):
        _kill_at("create:migrator-disk-ready", *volume.migrate_args(*KERNEL_BACKSTORE, "--fence", "suspend", "--id", migration_id))
    for migration_id in migration_ids:
        _kill_at("switch:prepared", "resume", migration_id)


def _two_volumes_with_an_ordered_writer(migration_lab, backing_dir):
    data = migration_lab
    log = add_host_volume(backing_dir, "log", lun=1)
    writer = OrderedPairWriter(log.device, data.device, bases=(log.size // 2, data.size // 2))
    return log, data, writer


def test_two_volumes_switch_in_one_hold_under_an_ordered_writer(migration_lab, backing_dir):
    log, data, writer = _two_volumes_with_an_ordered_writer(migration_lab, backing_dir)
    events = []
    with writer:
        _bring_to_the_switch([log, data], ["g-log", "g-data"])
        results = switch_group([HostSwitch(MigrationJournal.load(m), events.append) for m in ("g-log", "g-data")])
        for member in ("g-log", "g-data"):
            assert blockmig("resume", member).returncode == 0
    facts = [journal(member)["steps"]["switch"]["facts"] for member in ("g-log", "g-data")]
    held = [round(f["io_held_seconds"] * 1000) for f in facts]
    print(f"\ngroup of 2: host IO held {held} ms; {writer.summary()}")
    print("phases (s since the hold began): " + ", ".join(
        f"{e['phase']} {e['seconds_since_hold']}" for e in events if e["event"] == "switch_phase"))
    assert [r["io_held_seconds"] for r in results] == [f["io_held_seconds"] for f in facts]
    # One hold: every map was held before the first one let IO flow again.
    assert max(f["suspended_at"] for f in facts) < min(f["io_flowing_at"] for f in facts)
    for volume, member in ((log, "g-log"), (data, "g-data")):
        volume.assert_host_on_destination(writer_region=(volume.size // 2, volume.size),
                                          report={"destination": journal(member)["destination"]})
        assert not multipath.is_suspended(volume.map_name)
    writer.check()  # no acknowledged write lost on either, the data volume never ahead of the log
    assert all(journal(member)["state"] == "done" for member in ("g-log", "g-data"))


def test_one_member_that_cannot_switch_reverts_the_group(migration_lab, backing_dir):
    log, data, writer = _two_volumes_with_an_ordered_writer(migration_lab, backing_dir)
    with writer:
        _bring_to_the_switch([log, data], ["r-log", "r-data"])
        # The log's destination disappears: it fails first, before the data volume's LUN is mapped.
        lio.remove_volume(lio.find_volume(journal("r-log")["destination"]["volume"]))
        try:
            switch_group([HostSwitch(MigrationJournal.load(m), lambda event: None) for m in ("r-log", "r-data")])
        except MigrationError as exc:
            message = str(exc)
        else:
            raise AssertionError("the group switch went on without one of its members")
        assert "r-log" in message and "on the destination: none" in message, message
        for volume in (log, data):
            volume.assert_host_on_source(writer_region=(volume.size // 2, volume.size))
    writer.check()
    for member in ("r-log", "r-data"):
        state = journal(member)
        assert state["switch_reverts"] == 1 and "copy" not in state["steps"], state["steps"].keys()
        assert blockmig("rollback", member).returncode == 0
    data.assert_host_on_source_only(writer_region=(data.size // 2, data.size))
