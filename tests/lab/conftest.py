"""Fixtures for tests on the real lab stack (LIO, open-iscsi, dm-multipath), run as root in the lab VM.

Nothing here skips: where the stack is missing, the fixtures raise and the tests fail.
Every fixture that builds something tears it down again, also when the test failed.
"""

import pytest
from file_queue import pytest_runtestloop  # noqa: F401  (guests side by side share the files)
from workloads import mounts_under, unmount_filesystem

from blockmig import lab
from blockmig.host import iscsi, multipath

LAB_SIZE = 16 * 1024 * 1024


def pytest_runtest_logreport(report):
    """A failure's traceback in the guest's log at once, not only at the end of a run of an hour: the log is
    what one reads while the other tests still run (and all that is left of a guest killed by its timeout)."""
    if report.failed:
        print(f"\n-- {report.nodeid} failed in {report.when}:\n{report.longreprtext[-6000:]}\n", flush=True)
    elif report.when == "call":  # what each test cost, also in the log of a guest killed by its timeout
        print(f"\n-- {report.nodeid} {report.outcome} in {report.duration:.0f} s", flush=True)


@pytest.fixture(autouse=True)
def no_mount_left_by_an_earlier_test(tmp_path_factory):
    """A filesystem an earlier test left mounted on a lab map (that test's teardown failed, and said so)
    would fail every later test's lab_down ("map in use"): one failure, not the rest of the guest's."""
    for mountpoint in mounts_under(str(tmp_path_factory.getbasetemp())):
        print(f"\n-- unmounting {mountpoint}, left mounted by an earlier test", flush=True)
        unmount_filesystem(mountpoint)


MIGRATOR_IFACE = "blockmig-test-migrator"
MIGRATOR_IQN = "iqn.2026-11.lab.blockmig:test-migrator"


@pytest.fixture
def backing_dir(tmp_path):
    path = tmp_path / "backing"
    path.mkdir()
    return str(path)


@pytest.fixture
def lab_env(backing_dir):
    """The lab, up: source array + volume used by the host through a multipath map, empty destination."""
    lab.lab_down(backing_dir)  # leftovers of an aborted earlier run
    status = lab.lab_up(LAB_SIZE, backing_dir)
    try:
        yield status
    finally:
        lab.lab_down(backing_dir)


@pytest.fixture
def migrator_iface(lab_env):
    """An open-iscsi iface that logs in as the migrator, removed again with its sessions."""
    iscsi.create_iface(MIGRATOR_IFACE, MIGRATOR_IQN)
    try:
        yield MIGRATOR_IFACE
    finally:
        for session in [s for s in iscsi.sessions() if s.iface == MIGRATOR_IFACE]:
            multipath.flush_maps_on(list(iscsi.session_disks(session).values()))
            iscsi.logout_safely(session)
        iscsi.remove_iface(MIGRATOR_IFACE)
