"""`blockmig migrate --backstore handler`: blockmig's own backstore serves the destination during the copy.

These look at the array's side of it: the guard in the
destination refusing a misplaced write of the migrator, the handler outliving a kill -9 of blockmig, a
killed handler started again by `resume`, the kernel's backstore taking over after the copy, and
`--backstore kernel` still doing what blockmig did before.
"""

import json
import os
import signal

import psutil
from blockio import read_file, write_direct
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

from blockmig.array import lio
from blockmig.array.tcmu import client
from blockmig.host import iscsi

SLOW = ("--max-rate", "2M")  # 16 MiB in about 8 s: time to strike during the copy
MiB = 1024 * 1024


def _killed_in_the_copy(migration_lab, migration_id: str) -> dict:
    args = migration_lab.migrate_args("--id", migration_id, "--backstore", "handler", *SLOW)
    process = start_blockmig(*args)
    wait_for_journal(migration_id, lambda data: copied_bytes(migration_id) >= 3 * MiB)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return journal(migration_id)


def _migrator_disk(data: dict) -> str:
    session = iscsi.find_portal_session(data["destination"]["target"], data["destination"]["portal"],
                                        data["migrator"]["iface"])
    assert session is not None, "the migrator's session went with blockmig"
    disks = list(iscsi.session_disks(session).values())
    assert len(disks) == 1, disks
    return f"/dev/{disks[0]}"


def _handler_pids(name: str) -> list[int]:
    return [process.pid for process in client.handler_processes(name)]


def test_the_destination_array_refuses_a_misplaced_write_of_the_migrator(migration_lab):
    data = _killed_in_the_copy(migration_lab, "sg")
    name = data["destination"]["volume"]
    assert len(_handler_pids(name)) == 1, "the handler must outlive blockmig"
    state = client.BackstoreClient(name).state()
    assert state["mode"] == "sequential" and state["receiving"], state
    reserved = state["reserved"]
    assert 3 * MiB <= reserved < migration_lab.size, state
    assert [v.plugin for v in lio.list_volumes() if v.name == name + "-migrator"] == ["user"]
    backing = data["destination"]["backing"]
    ahead, behind = reserved + MiB, reserved - MiB
    before = {offset: read_file(backing, offset, 4096) for offset in (ahead, behind)}
    disk = _migrator_disk(data)
    for offset in (ahead, behind):  # the migrator's own disk, its own session: still refused
        try:
            write_direct(disk, offset, os.urandom(4096))
        except OSError:
            pass
        else:
            raise AssertionError(f"the array executed a write at {offset}, not at its reserved {reserved}")
        assert read_file(backing, offset, 4096) == before[offset], f"a refused write changed byte {offset}"
    assert client.BackstoreClient(name).state()["reserved"] == reserved
    with HostReader(migration_lab.device, migration_lab.data) as reader:
        result = blockmig("resume", "sg", "--json")
    assert result.returncode == 0, result.stderr
    reader.check()
    report = report_of(result)
    assert report["destination"]["copy_backstore"] == "handler"
    assert report["destination"]["array_guard"] == {"mode": "sequential", "reserved": migration_lab.size}
    assert lio.find_volume(name).plugin == "fileio"  # what the host uses is the kernel's backstore
    migration_lab.assert_host_on_destination()


def test_a_killed_handler_is_started_again_by_resume(migration_lab):
    data = _killed_in_the_copy(migration_lab, "hk")
    name = data["destination"]["volume"]
    (pid,) = _handler_pids(name)
    handler = psutil.Process(pid)
    handler.kill()  # the array host's handler dies too: the kernel keeps its objects and rings
    handler.wait(timeout=30)
    assert [v.plugin for v in lio.list_volumes() if v.name in (name, name + "-migrator")] == ["user", "user"]
    with HostReader(migration_lab.device, migration_lab.data) as reader:
        result = blockmig("resume", "hk", "--json")
    assert result.returncode == 0, result.stderr
    reader.check()
    serving = [e for e in map(json.loads, result.stdout.splitlines()) if e.get("event") == "backstore"
               and e.get("state") == "serving"]
    assert len(serving) == 1 and serving[0]["pid"] != pid, serving
    assert report_of(result)["destination"]["array_guard"]["reserved"] == migration_lab.size
    migration_lab.assert_host_on_destination()


def test_the_kernel_backstore_from_the_start(migration_lab):
    with HostReader(migration_lab.device, migration_lab.data) as reader:
        result = blockmig(*migration_lab.migrate_args("--id", "kb", "--backstore", "kernel"))
    assert result.returncode == 0, result.stderr
    reader.check()
    destination = report_of(result)["destination"]
    assert destination["copy_backstore"] == "kernel" and destination["array_guard"] is None
    migration_lab.assert_host_on_destination()
