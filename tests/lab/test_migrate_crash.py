"""Interrupted migrations on the real stack: kill -9, a failing source path; then resume or rollback."""

import signal
import threading
import time

from migrate_support import (  # noqa: F401  (migration_lab is a fixture)
    HostReader,
    blockmig,
    copied_bytes,
    journal,
    migration_lab,
    report_of,
    start_blockmig,
    wait_for_journal,
)

from blockmig import lab

SLOW = ("--max-rate", "2M")  # 16 MiB in about 8 s: time to strike during the copy


def _kill(process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def _in_copy(migration_id):
    return lambda data: copied_bytes(migration_id) >= 3 * 1024 * 1024


def test_kill_during_copy_then_resume(migration_lab):
    with HostReader(migration_lab.device, migration_lab.data) as reader:
        process = start_blockmig(*migration_lab.migrate_args("--id", "kc", *SLOW))
        wait_for_journal("kc", _in_copy("kc"))
        _kill(process)
        assert journal("kc")["steps"]["copy"]["state"] == "started"
        result = blockmig("resume", "kc", "--json")
    assert result.returncode == 0, result.stderr
    reader.check()
    report = report_of(result)
    assert report["id"] == "kc" and report["size"] == migration_lab.size
    migration_lab.assert_host_on_destination()


# kill -9 inside the switch, its hold included: test_switch_crash.py, at each of the switch's named points
# with a writer running (here once were two kills at a moment found by polling the journal).


def test_kill_during_copy_then_rollback(migration_lab):
    process = start_blockmig(*migration_lab.migrate_args("--id", "kr", *SLOW))
    wait_for_journal("kr", _in_copy("kr"))
    _kill(process)
    other = blockmig(*migration_lab.migrate_args("--id", "other"))
    assert other.returncode != 0 and "migration kr of this volume is unfinished" in other.stderr, other.stderr
    result = blockmig("rollback", "kr")
    assert result.returncode == 0, result.stderr
    assert journal("kr")["state"] == "rolled_back"
    migration_lab.assert_host_on_source_only()
    # resume refuses a rolled-back migration; a new one may start
    assert blockmig("resume", "kr").returncode != 0
    assert blockmig(*migration_lab.migrate_args("--id", "again"), check=True).returncode == 0


def test_source_path_failure_during_copy(migration_lab):
    """The source portal goes away for a few seconds mid-copy: the copy waits or stops, never writes wrong data."""
    import rtslib_fb

    copied_when_cut = []

    def disable_source_portal_for_a_while():
        wait_for_journal("pf", _in_copy("pf"))
        tpg = next(iter(next(t for t in rtslib_fb.FabricModule("iscsi").targets if t.wwn == lab.SOURCE_IQN).tpgs))
        tpg.enable = False
        copied_when_cut.append(copied_bytes("pf"))
        time.sleep(8)  # longer than the lab's replacement_timeout (5 s): reads fail, not just wait
        tpg.enable = True

    flapper = threading.Thread(target=disable_source_portal_for_a_while)
    flapper.start()
    result = blockmig(*migration_lab.migrate_args("--id", "pf", *SLOW))
    flapper.join()
    assert copied_when_cut and copied_when_cut[0] < migration_lab.size, "the path did not fail during the copy"
    events = [line for line in result.stdout.splitlines() if '"copy_retry"' in line]
    print(f"path cut at byte {copied_when_cut[0]}; exit {result.returncode}; {len(events)} copy retries")
    if result.returncode != 0:
        # It stopped: the error says how to go on, and resume finishes the job.
        assert "blockmig resume pf" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        result = blockmig("resume", "pf", "--json")
    assert result.returncode == 0, result.stderr
    migration_lab.assert_host_on_destination()
