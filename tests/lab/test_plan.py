"""Several volumes of one host in one plan, on the real stack: run, refuse, kill -9 and resume, roll back.

Every plan is a TOML file run by the CLI as an admin would (`blockmig migrate --plan FILE --json`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import time
from datetime import datetime

import pytest
from blockio import read_direct, read_file
from migrate_support import (
    GROUP_SWITCH_TIMEOUT,
    KERNEL_BACKSTORE,
    LAB_MIN_RATE,
    MiB,
    MigrationLab,
    add_host_volume,
    blockmig,
    copied_bytes,
    host_disks_by_target,
    journal,
    release_held_io_and_migrator,
    report_of,
    start_blockmig,
    wait_until_stopped,
)
from workloads import (
    XFS_MIGRATION_ENV,
    XFS_MIGRATION_SIZE,
    FsAppender,
    OrderedPairWriter,
    RawReader,
    RawWriter,
    device_reader,
    lab_of_size,
    run_during,
)

from blockmig import lab, plan, timeline
from blockmig import report as migration_report
from blockmig.array import lio
from blockmig.host import iscsi, multipath
from blockmig.state import MigrationJournal, VolumeLock

VOLUME = 32 * MiB


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    path = tmp_path / "state"
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(path / "migrations"))
    return path


@pytest.fixture
def host_volumes(backing_dir, state_dir):
    """Factory: the lab with a first source volume of `first_size` and `more` volumes of VOLUME bytes, each its
    own map on the host (random data through the map); torn down after the test."""
    with contextlib.ExitStack() as stack:
        stack.callback(release_held_io_and_migrator)

        def make(more: int, first_size: int = VOLUME) -> list:
            stack.enter_context(lab_of_size(first_size, backing_dir))
            first = MigrationLab(backing_dir) if first_size <= VOLUME else _MapOnly(backing_dir)
            return [first] + [add_host_volume(backing_dir, f"vol{n}", VOLUME, lun=n) for n in range(1, more + 1)]

        yield make


class _MapOnly:
    """A large volume the test formats itself (no random fill of 320 MiB through the map)."""

    def __init__(self, backing_dir: str):
        found = multipath.wait_for_map(lab.SOURCE_WWID)
        self.wwid, self.map_name, self.device = lab.SOURCE_WWID, found.name, found.device
        self.source_backing = lab.source_backing_file(backing_dir)


def write_plan(tmp_path, devices: list[str], backing_dir: str, plan_id: str, parallel: int = 2,
               extra_defaults: str = "", per_volume: dict | None = None, backstore: str | None = "kernel",
               mode: str = "offline") -> str:
    """A TOML plan: the lab's destination, `backing_dir`, 1 MiB chunks, `mode` (offline here; the
    pass-through plan is test_pass_through_shapes'), `backstore` for an offline move (None: blockmig's
    default, the handler); `per_volume` adds lines to a volume."""
    if backstore is not None and mode == "offline":
        extra_defaults += f'\nbackstore = "{backstore}"'
    if mode == "online" and "max_rate" not in extra_defaults + "".join((per_volume or {}).values()):
        extra_defaults += f'\nmin_rate = "{LAB_MIN_RATE}"'  # a floor above a test's own max_rate is refused
    volumes = "".join(f'\n[[volumes]]\ndevice = "{device}"\n' + (per_volume or {}).get(device, "")
                      for device in devices)
    text = f"""id = "{plan_id}"
parallel = {parallel}

[defaults]
to_target = "{lab.DESTINATION_IQN}"
to_portal = "{lab.DESTINATION_PORTAL[0]}:{lab.DESTINATION_PORTAL[1]}"
backing_dir = "{backing_dir}"
chunk_size = "1M"
mode = "{mode}"
{extra_defaults}
{volumes}"""
    path = tmp_path / f"{plan_id}.toml"
    path.write_text(text)
    return str(path)


def plan_report(result: subprocess.CompletedProcess) -> dict:
    return report_of(result, "plan_report")


def run_with_a_destination_gone(args: list[str], volume_name: str) -> dict:
    """Runs the plan, takes `volume_name` (a member's destination) away once every destination is made,
    lets the plan go on; returns its report, after checking that it exits 1."""
    process = start_blockmig(*args, stop_at="plan:destinations-created")
    wait_until_stopped(process)
    lio.remove_volume(lio.find_volume(volume_name), remove_backing=False)
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr + _handler_logs()
    return plan_report(subprocess.CompletedProcess(args, 1, stdout, stderr))


def _handler_logs() -> str:
    """What the migrations' backstore handlers logged (why one went on serving, or stopped)."""
    logs = glob.glob(os.path.join(os.environ["BLOCKMIG_STATE_DIR"], "*", "backstore", "handler.log"))
    return "".join(f"\n--- {path}:\n{open(path).read()[-2000:]}" for path in logs)


def plan_journal(state_dir, plan_id: str) -> dict:
    with open(state_dir / "plans" / plan_id / "plan.json") as handle:
        return json.load(handle)


def assert_switched(volume, report: dict) -> None:
    """Same map and WWID, its only path on the destination, the source volume unmapped, bytes as the host sees."""
    found = multipath.map_for_wwid(volume.wwid)
    assert found is not None and found.name == volume.map_name, f"map for {volume.wwid} is now {found}"
    multipath.wait_for_map_paths(volume.map_name, set(host_disks_by_target(volume.map_name)))
    assert list(host_disks_by_target(volume.map_name).values()) == [lab.DESTINATION_IQN]
    source_volumes = [v for v in lio.list_volumes() if v.backing == volume.source_backing]
    assert len(source_volumes) == 1 and lio.list_mappings(source_volumes[0]) == [], "the source volume is still mapped"
    size = report["size"]
    destination = report["report"]["destination"]["backing"]
    for offset in range(0, size, 4 * MiB):
        assert read_direct(volume.device, offset, 4 * MiB) == read_file(destination, offset, 4 * MiB), \
            f"{volume.map_name}: the host reads other bytes than the destination holds at {offset}"


def step_seconds(member_id: str, step: str) -> float:
    entry = journal(member_id)["steps"][step]
    return (datetime.fromisoformat(entry["done"]) - datetime.fromisoformat(entry["started"])).total_seconds()


def assert_verified(member_id: str) -> None:
    data = journal(member_id)
    assert data["state"] == "done"
    assert data["steps"]["verify"]["facts"]["volume_digest"] == data["steps"]["copy"]["facts"]["volume_digest"]


# -- (a) four volumes, four workloads, one plan ------------------------------------------------


def test_four_volumes_with_workloads_in_one_plan(host_volumes, backing_dir, state_dir, tmp_path):
    xfs, ext4, raw, read = host_volumes(3, first_size=XFS_MIGRATION_SIZE)
    workloads = [FsAppender(xfs.device, "xfs", str(tmp_path / "xfs"), mkfs_env=XFS_MIGRATION_ENV),
                 FsAppender(ext4.device, "ext4", str(tmp_path / "ext4"), seed=4),
                 RawWriter(raw.device, VOLUME), RawReader(read.device, read.data)]
    path = write_plan(tmp_path, [v.device for v in (xfs, ext4, raw, read)], backing_dir, "four", parallel=4,
                      extra_defaults=f'fence = "suspend"\nswitch_timeout = {GROUP_SWITCH_TIMEOUT}')
    began = time.monotonic()
    try:
        result = run_during(workloads, lambda: blockmig("migrate", "--plan", path, "--json", timeout=900), settle=1.0)
    finally:
        for appender in workloads[:2]:
            appender.close()  # nothing left mounted for the teardown, also when the plan failed
    wall = time.monotonic() - began
    report = plan_report(result)
    assert result.returncode == 0, [(v["map"], v["outcome"], v.get("error")) for v in report["volumes"]]
    print(f"\nplan of 4 volumes ({report['bytes'] // MiB} MiB), parallel 4: {report['wall_seconds']} s in blockmig, "
          f"{wall:.1f} s with workloads, {report['mb_per_s']} MB/s aggregate")
    for volume in report["volumes"]:
        print(f"  {volume['map']}: {volume['outcome']}, copy {volume['copy_seconds']} s, "
              f"IO held {volume['io_held_seconds'] * 1000:.0f} ms")
    for workload in workloads:
        print(f"  {workload.summary()}" if hasattr(workload, "summary") else f"  {workload.name}")
    print("  steps (s): " + "; ".join(f"{entry['map']} " + ", ".join(
        f"{name} {step_seconds(entry['id'], name):.1f}" for name in ("plan", "create_destination", "fence", "copy",
                                                                     "verify", "switch", "finish"))
        for entry in report["volumes"]))
    assert [v["outcome"] for v in report["volumes"]] == ["done"] * 4
    events = [json.loads(line) for line in result.stdout.splitlines()]
    members = set(plan_journal(state_dir, "four")["members"])
    assert members == {e["id"] for e in events if e["event"] == "chunk"}, "a member's copy sent no events"
    assert all(e.get("id") in members for e in events if e["event"] in ("step", "chunk", "io_resumed"))
    workloads[0].check()
    workloads[1].check()
    workloads[2].check(device_reader(raw.device), expected=raw.data)
    workloads[3].check()
    for volume, entry in zip((xfs, ext4, raw, read), report["volumes"]):
        assert_switched(volume, entry)
        assert_verified(entry["id"])
    assert read_direct(read.device, 0, VOLUME) == read.data
    _check_the_plans_picture("four", [v.map_name for v in (xfs, ext4, raw, read)], report, str(tmp_path / "four.png"))


def _check_the_plans_picture(plan_id: str, maps: list[str], report: dict, png: str) -> None:
    """`blockmig report --plot`'s picture of a plan: a row per volume, its hold, its copy, the waits for the
    control plane where its journal recorded them."""
    shown = blockmig("report", plan_id, "--plot", png)
    assert shown.returncode == 0 and f"plan {plan_id}" in shown.stdout, shown.stderr
    figure = migration_report.draw(migration_report.load(plan_id), png)
    steps_ax, _, delta_ax = figure.axes[:3]

    def drawn(ax, prefix: str) -> list:
        return [a for a in list(ax.patches) + list(ax.texts) if (a.get_gid() or "").startswith(prefix)]

    assert [t.get_text().split("\n")[0] for t in steps_ax.get_yticklabels()] == maps
    holds = sorted(round(p.get_width(), 3) for p in drawn(steps_ax, "hold"))
    assert holds == sorted(round(v["io_held_seconds"], 3) for v in report["volumes"])
    assert len(drawn(steps_ax, "step:copy:done")) == len(maps) and drawn(delta_ax, "no-deltas")
    waits = [r for member in report["volumes"]
             for r in timeline.load_records(MigrationJournal.load(member["id"]).directory)
             if r["e"] == "control_plane_wait" and r["state"] == "done"]
    assert len(drawn(steps_ax, "wait")) == len(waits)
    print(f"  picture {png}: {len(maps)} rows, {len(waits)} control-plane waits "
          f"({sum(w['seconds'] for w in waits):.2f} s in all)")


# -- (b) one bad volume: refused in plan, nothing touched ---------------------------------------


def test_a_plan_with_one_bad_volume_touches_nothing(host_volumes, backing_dir, state_dir, tmp_path):
    volumes = host_volumes(2)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    member_disk = multipath.paths_of_map(volumes[0].map_name)[0].dev
    before = lab.lab_status()
    cases = {
        "backing": ({volumes[2].device: f'backing_device = "{small}"\n'}, [v.device for v in volumes],
                    f"volume 3 ({volumes[2].device}): {small} holds {MiB} bytes: no room"),
        "twice": ({}, [volumes[0].device, volumes[1].device, f"/dev/{member_disk}"],
                  f"volume 3 (/dev/{member_disk}): device: /dev/{member_disk} is the same volume as {volumes[0].device}"),
        "not-a-map": ({}, [volumes[0].device, "/dev/null"], "volume 2 (/dev/null): /dev/null is neither"),
    }
    for name, (per_volume, devices, expected) in cases.items():
        path = write_plan(tmp_path, devices, backing_dir, name, per_volume=per_volume)
        result = blockmig("migrate", "--plan", path)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"{path}: {expected}" in result.stderr, result.stderr
        assert lab.lab_status() == before, f"{name}: the arrays or the host changed"
        assert glob.glob(str(state_dir / "migrations" / "*")) == [], f"{name}: journals left"
        assert not (state_dir / "plans" / name).exists(), f"{name}: a plan journal was left"
        assert glob.glob(os.path.join(backing_dir, "blockmig-*")) == [], f"{name}: destination backing made"
        for volume in volumes:
            VolumeLock(volume.wwid, "test").acquire().release()  # no lock is held


# -- (c) kill -9 mid-copy, resume the plan -----------------------------------------------------


def start_slow_plan(tmp_path, volumes, backing_dir, plan_id: str, slow: list, parallel: int = 2):
    """The plan in the background; the `slow` volumes copy at 4 MB/s so a test can catch them mid-copy."""
    path = write_plan(tmp_path, [v.device for v in volumes], backing_dir, plan_id, parallel=parallel,
                      per_volume={v.device: "max_rate = \"4M\"\n" for v in slow}, backstore=None)
    return start_blockmig("migrate", "--plan", path, "--json")


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_kill_9_mid_plan_then_resume_finishes_every_volume(host_volumes, backing_dir, state_dir, tmp_path):
    volumes = host_volumes(2)
    process = start_slow_plan(tmp_path, volumes, backing_dir, "crash", slow=volumes)
    members = [f"crash-{n}" for n in (1, 2, 3)]
    wait_for(lambda: all(0 < copied_bytes(m) < VOLUME for m in members[:2]), "two members mid-copy")
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    status = json.loads(blockmig("status", "crash", "--json", check=True).stdout)
    assert [m["state"] for m in status["members"]][:2] == ["running", "running"], status
    assert 0 < status["members"][0]["copied"] < VOLUME
    result = blockmig("resume", "crash", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    report = plan_report(result)
    assert [v["outcome"] for v in report["volumes"]] == ["done"] * 3
    for volume, entry in zip(volumes, report["volumes"]):
        assert_switched(volume, entry)
        assert_verified(entry["id"])
        assert read_direct(volume.device, 0, VOLUME) == volume.data
    human = blockmig("status", "crash", check=True).stdout
    assert human.startswith("plan crash: done") and human.count(": done") == 4, human


# -- (d) --from-target names exactly the host's volumes of that target ---------------------------


def test_from_target_names_the_hosts_volumes_of_that_target_only(host_volumes, backing_dir, state_dir):
    volumes = host_volumes(2)
    bystander = lio.create_volume(lab.DESTINATION_IQN, "bystander", 16 * MiB, os.path.join(backing_dir, "by.img"),
                                  serial="5e51de27000000000000000000000002")
    lio.export_volume(bystander, iscsi.read_initiator_name())
    session = iscsi.login(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)
    iscsi.find_session_disk(session, bystander.lun, bystander.wwid, 30)
    bystander_map = multipath.wait_for_map(bystander.wwid)
    named = plan.devices_of_target(lab.SOURCE_IQN, include_bare_disks=False)
    assert sorted(named) == sorted(f"/dev/mapper/{v.map_name}" for v in volumes)
    assert f"/dev/mapper/{bystander_map.name}" not in named
    assert plan.devices_of_target(lab.DESTINATION_IQN, include_bare_disks=False) == [
        f"/dev/mapper/{bystander_map.name}"]
    result = blockmig("migrate", "--from-target", lab.SOURCE_IQN, "--to-target", lab.DESTINATION_IQN,
                      "--to-portal", "{}:{}".format(*lab.DESTINATION_PORTAL), "--backing-dir", backing_dir,
                      "--chunk-size", "1M", "--parallel", "3", "--id", "whole", "--mode", "offline",
                      *KERNEL_BACKSTORE, "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    report = plan_report(result)
    assert sorted(v["map"] for v in report["volumes"]) == sorted(v.map_name for v in volumes)
    assert not any(s.target_iqn == lab.SOURCE_IQN for s in iscsi.sessions()), "the source session stayed"
    assert multipath.map_for_wwid(bystander.wwid).name == bystander_map.name


# -- (e) rollback of a plan before (and after) members switched -----------------------------------


def test_rollback_of_a_plan_removes_what_did_not_switch(host_volumes, backing_dir, state_dir, tmp_path):
    """Parallel 1: the first volume switches, the second is caught mid-copy; rollback leaves the first where it is."""
    first, second, third = host_volumes(2)
    process = start_slow_plan(tmp_path, [first, second, third], backing_dir, "back", slow=[second, third],
                              parallel=1)
    wait_for(lambda: 0 < copied_bytes("back-2") < VOLUME, "the second member mid-copy")
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert journal("back-1")["state"] == "done"
    result = blockmig("rollback", "back", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["on_destination"] == ["back-1"] and summary["rolled_back"] == ["back-2", "back-3"], summary
    assert journal("back-2")["state"] == "rolled_back" and journal("back-3")["state"] == "rolled_back"
    status = lab.lab_status()
    destination = next(a for a in status["arrays"] if a["target"] == lab.DESTINATION_IQN)
    assert [v["name"] for v in destination["volumes"]] == ["blockmig-back-1"], destination["volumes"]
    source = next(a for a in status["arrays"] if a["target"] == lab.SOURCE_IQN)
    assert not any(m["write_protect"] for v in source["volumes"] for m in v["mappings"]), "a fence is left on"
    for volume in (second, third):
        assert list(host_disks_by_target(volume.map_name).values()) == [lab.SOURCE_IQN]
        assert not multipath.is_suspended(volume.map_name)
        assert read_direct(volume.device, 0, VOLUME) == volume.data
    assert list(host_disks_by_target(first.map_name).values()) == [lab.DESTINATION_IQN]
    assert [p for p in glob.glob(os.path.join(backing_dir, "blockmig-*"))] == [
        os.path.join(backing_dir, "blockmig-back-1.img")]


# -- one member failing does not stop the others ------------------------------------------------


def test_one_member_failing_leaves_the_others_to_finish(host_volumes, backing_dir, state_dir, tmp_path):
    """The second member's destination volume is taken away before the copies start: it fails, the others finish,
    the exit code says so, and rolling back the plan puts the failed one back on its source."""
    volumes = host_volumes(2)
    path = write_plan(tmp_path, [v.device for v in volumes], backing_dir, "one-fails", parallel=2)
    report = run_with_a_destination_gone(["migrate", "--plan", path, "--json"], "blockmig-one-fails-2")
    assert [v["outcome"] for v in report["volumes"]] == ["done", "failed", "done"], report["volumes"]
    assert "destination volume blockmig-one-fails-2 is gone" in report["volumes"][1]["error"]
    for volume, entry in zip(volumes, report["volumes"]):
        if entry["outcome"] == "done":
            assert_switched(volume, entry)
    result = blockmig("rollback", "one-fails", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["rolled_back"] == ["one-fails-2"] and summary["on_destination"] == ["one-fails-1", "one-fails-3"]
    assert list(host_disks_by_target(volumes[1].map_name).values()) == [lab.SOURCE_IQN]
    assert read_direct(volumes[1].device, 0, VOLUME) == volumes[1].data


# -- --switch together through the plan --------------------------------------------------------


def together_args(volumes, backing_dir, plan_id: str) -> list[str]:
    return ["migrate", *(v.device for v in volumes), "--switch", "together", "--fence", "suspend", *KERNEL_BACKSTORE,
            "--switch-timeout", GROUP_SWITCH_TIMEOUT,
            "--to-target", lab.DESTINATION_IQN, "--to-portal", "{}:{}".format(*lab.DESTINATION_PORTAL),
            "--backing-dir", backing_dir, "--chunk-size", "1M", "--id", plan_id, "--json"]


def test_a_together_plan_switches_in_one_hold_under_an_ordered_writer(host_volumes, backing_dir, state_dir):
    log, data = host_volumes(1)
    writer = OrderedPairWriter(log.device, data.device, bases=(VOLUME // 2, VOLUME // 2))
    with writer:
        result = blockmig(*together_args([log, data], backing_dir, "grp"), timeout=600)
    report = plan_report(result)
    assert result.returncode == 0, [(v["map"], v["outcome"], v.get("error")) for v in report["volumes"]]
    facts = [journal(member)["steps"]["switch"]["facts"] for member in ("grp-1", "grp-2")]
    print(f"\ntogether plan of 2: IO held {[round(f['io_held_seconds'] * 1000) for f in facts]} ms, "
          f"{report['wall_seconds']} s; {writer.summary()}")
    assert max(f["suspended_at"] for f in facts) < min(f["io_flowing_at"] for f in facts), "not one hold"
    writer.check()
    for volume, entry in zip((log, data), report["volumes"]):
        assert entry["outcome"] == "done"
        assert_switched(volume, entry)
        assert journal(entry["id"])["switch_group"] == "grp"


def test_a_together_member_is_never_switched_alone(host_volumes, backing_dir, state_dir):
    """Killed in the group switch's prepare: `resume MEMBER` stops before the switch; `resume PLAN` finishes."""
    volumes = host_volumes(1)
    process = start_blockmig(*together_args(volumes, backing_dir, "alone"), stop_at="switch:prepared")
    wait_until_stopped(process, timeout=600)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    result = blockmig("resume", "alone-1")
    assert result.returncode == 1 and "switches with its group: blockmig resume alone" in result.stderr, result.stderr
    assert "destination_joined" not in journal("alone-1")["steps"]["switch"].get("facts", {})
    result = blockmig("resume", "alone", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    for volume, entry in zip(volumes, plan_report(result)["volumes"]):
        assert_switched(volume, entry)
        assert read_direct(volume.device, 0, VOLUME) == volume.data


def test_a_together_plan_with_a_failed_member_lifts_every_fence(host_volumes, backing_dir, state_dir):
    volumes = host_volumes(1)
    report = run_with_a_destination_gone(together_args(volumes, backing_dir, "split"), "blockmig-split-2")
    assert [v["outcome"] for v in report["volumes"]] == ["waiting", "failed"], report["volumes"]
    assert "fence lifted" in report["volumes"][0]["error"]
    for volume in volumes:
        assert list(host_disks_by_target(volume.map_name).values()) == [lab.SOURCE_IQN]
        assert not multipath.is_suspended(volume.map_name), "host IO is still held"
        assert read_direct(volume.device, 0, VOLUME) == volume.data
    assert "copy" not in journal("split-1")["steps"], "the waiting member's copy is still trusted"
    result = blockmig("rollback", "split", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["rolled_back"] == ["split-1", "split-2"]
