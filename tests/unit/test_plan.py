"""The plan file and the plan command line: every bad field is one line naming file, volume and field; nothing done.

`blockmig migrate --plan FILE` runs in-process (cli.main); BLOCKMIG_STATE_DIR points into tmp_path, and a
refusal must leave neither the migrations nor the plans folder behind. What needs the real host (the
same WWID under two names, planning that fails half-way, --from-target on real sessions) is in
tests/lab/test_plan.py; where a test here fakes the host side, it says so.
"""

from __future__ import annotations

import json

import pytest

from blockmig import cli, plan
from blockmig.migration import HostDevice

TARGET = "iqn.2026-11.lab.blockmig:destination"
DEFAULTS = {"to_target": TARGET, "to_portal": "127.0.0.2:3260"}


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "state" / "migrations"))
    return tmp_path / "state"


def write_plan(tmp_path, document, suffix=".json") -> str:
    path = tmp_path / f"plan{suffix}"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def refused(capsys, state_dir, argv: list[str]) -> str:
    """Runs the CLI, expects a refusal: exit 2, one line on stderr, nothing on stdout, no state written."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockmig: error: "), captured.err
    assert captured.out == ""
    assert not state_dir.exists(), "a refused plan created journal folders"
    return lines[0]


def plan_document(**changes) -> dict:
    document = {"defaults": dict(DEFAULTS), "volumes": [{"device": "/dev/mapper/mpatha"},
                                                        {"device": "/dev/mapper/mpathb"}]}
    document.update(changes)
    return document


# -- what a good plan means ------------------------------------------------------


def test_json_plan_with_defaults_and_overrides(tmp_path):
    path = write_plan(tmp_path, {
        "id": "host1", "parallel": 3,
        "defaults": {**DEFAULTS, "fence": "suspend", "chunk_size": "4M", "backing_dir": "/srv/a", "worm": True},
        "volumes": [{"device": "/dev/mapper/mpatha"},
                    {"device": "/dev/mapper/mpathb", "id": "db-log", "chunk_size": 1048576,
                     "backing_device": "/dev/vg/log", "max_rate": "100M", "switch_timeout": 20}],
    })
    spec = plan.load_plan_file(path)
    assert (spec.plan_id, spec.parallel, spec.policy) == ("host1", 3, "each")
    first, second = spec.requests
    assert (first.device, first.fence, first.chunk_size, first.backing_dir, first.worm) == (
        "/dev/mapper/mpatha", "suspend", 4 << 20, "/srv/a", True)
    assert first.migration_id is None and first.switch == "multipath"
    # The volume's own backing replaces the default's (both would be refused).
    assert (second.migration_id, second.chunk_size, second.backing_dir, second.backing_device) == (
        "db-log", 1 << 20, None, "/dev/vg/log")
    assert (second.max_rate, second.switch_timeout, second.fence) == (100 << 20, 20.0, "suspend")


def test_toml_plan_is_the_same_plan(tmp_path):
    path = write_plan(tmp_path, f"""
id = "host1"
parallel = 4

[defaults]
to_target = "{TARGET}"
to_portal = "127.0.0.2:3260"
switch = "together"
chunk_size = "1M"

[[volumes]]
device = "/dev/mapper/mpatha"

[[volumes]]
device = "/dev/mapper/mpathb"
fence = "suspend"
""", ".toml")
    spec = plan.load_plan_file(path)
    assert (spec.plan_id, spec.parallel, spec.policy) == ("host1", 4, "together")
    assert [r.switch for r in spec.requests] == ["multipath", "multipath"]
    assert [r.fence for r in spec.requests] == [None, "suspend"]  # None: chosen in plan_migration (none online, writeprotect offline)
    assert [r.chunk_size for r in spec.requests] == [1 << 20, 1 << 20]


def test_command_line_options_beat_the_files_defaults(tmp_path):
    path = write_plan(tmp_path, plan_document())
    spec = plan.load_plan_file(path, {"fence": "none", "to_portal": "127.0.0.3:3260"})
    assert [(r.fence, r.to_portal, r.to_target) for r in spec.requests] == [("none", "127.0.0.3:3260", TARGET)] * 2


# -- every bad field: one line naming the file, the volume and the field -----------------


@pytest.mark.parametrize("change, expected", [
    ({"colour": "red"}, ": colour: unknown key"),
    ({"parallel": 0}, ": parallel: must be a whole number of at least 1"),
    ({"parallel": "2"}, ": parallel: must be a whole number"),
    ({"parallel": True}, ": parallel: must be a whole number"),
    ({"id": "no/slashes"}, ": id: 'no/slashes' is not an id"),
    ({"volumes": []}, ": volumes: a list of at least one volume"),
    ({"volumes": "/dev/mapper/mpatha"}, ": volumes: a list of at least one volume"),
    ({"defaults": ["fence"]}, ": defaults: must be a table"),
    ({"defaults": {**DEFAULTS, "fences": "none"}}, ": defaults: fences: unknown key"),
    ({"defaults": {**DEFAULTS, "fence": "wp"}}, ": defaults: fence: 'wp': must be one of writeprotect, suspend, none"),
    ({"defaults": {**DEFAULTS, "switch": "later"}}, ": defaults: switch: 'later': must be one of"),
    ({"defaults": {**DEFAULTS, "chunk_size": "4X"}}, ": defaults: chunk_size: not a size: '4X'"),
    ({"defaults": {**DEFAULTS, "chunk_size": 1000}}, ": defaults: chunk_size: chunk size 1000 is not a multiple of 4096"),
    ({"defaults": {**DEFAULTS, "chunk_size": -4096}}, ": defaults: chunk_size: size must be positive"),
    ({"defaults": {**DEFAULTS, "max_rate": [1]}}, ": defaults: max_rate: not a size"),
    ({"defaults": {**DEFAULTS, "worm": "yes"}}, ": defaults: worm: 'yes': must be true or false"),
    ({"defaults": {**DEFAULTS, "switch_timeout": 0.5}}, ": defaults: switch_timeout: 0.5: must be a number"),
    ({"defaults": {**DEFAULTS, "switch_timeout": "10"}}, ": defaults: switch_timeout: '10': must be a number"),
    ({"defaults": {**DEFAULTS, "mode": "live"}}, ": defaults: mode: 'live': must be one of online, offline"),
    ({"defaults": {**DEFAULTS, "max_hold": 0}}, ": defaults: max_hold: 0: must be a positive number"),
    ({"defaults": {**DEFAULTS, "backstore": "tcmu"}}, ": defaults: backstore: 'tcmu': must be one of handler, kernel"),
    ({"defaults": {**DEFAULTS, "to_portal": "nowhere"}}, ": defaults: to_portal: 'nowhere' is not IP:PORT"),
    ({"defaults": {**DEFAULTS, "to_target": 7}}, ": defaults: to_target: must be a non-empty string"),
    ({"defaults": {"to_portal": "127.0.0.2:3260"}}, ": volume 1 (/dev/mapper/mpatha): to_target: required"),
    ({"defaults": {**DEFAULTS, "backing_dir": "/a", "backing_device": "/dev/b"}},
     ": volume 1 (/dev/mapper/mpatha): backing_dir and backing_device: give one, not both"),
    ({"volumes": [{"device": "/dev/mapper/mpatha"}, {"fence": "none"}]}, ": volume 2: device: required"),
    ({"volumes": [{"device": "/dev/mapper/mpatha"}, "/dev/mapper/mpathb"]}, ": volume 2: must be a table"),
    ({"volumes": [{"device": "/dev/mapper/mpatha"}, {"device": 5}]}, ": volume 2: device: required"),
    ({"volumes": [{"device": "/dev/mapper/mpatha", "fence": "half"}]},
     ": volume 1 (/dev/mapper/mpatha): fence: 'half': must be one of"),
    ({"volumes": [{"device": "/dev/mapper/mpatha"}, {"device": "/dev/mapper/mpathb", "size": "1G"}]},
     ": volume 2 (/dev/mapper/mpathb): size: unknown key"),
    ({"volumes": [{"device": "/dev/mapper/mpatha", "id": ""}]}, ": volume 1 (/dev/mapper/mpatha): id: '' is not an id"),
    ({"volumes": [{"device": "/dev/mapper/mpatha"}, {"device": "/dev/mapper/mpatha"}]},
     ": volume 2 (/dev/mapper/mpatha): device: /dev/mapper/mpatha is named twice (also "),
    ({"volumes": [{"device": "/dev/mapper/mpatha"}, {"device": "/dev/mapper/mpathb", "switch": "together"}]},
     ": volume 2 (/dev/mapper/mpathb): switch: 'together' is a plan's policy"),
    ({"defaults": {**DEFAULTS, "switch": "together"}, "volumes": [{"device": "/dev/mapper/mpatha"}]},
     ": volume 1 (/dev/mapper/mpatha): switch: 'together' groups several volumes"),
    ({"defaults": {**DEFAULTS, "switch": "together"},
      "volumes": [{"device": "/dev/mapper/mpatha"}, {"device": "/dev/sdc", "switch": "relogin"}]},
     ": volume 2 (/dev/sdc): switch: 'relogin' in a plan that switches together"),
])
def test_bad_plan_field_is_one_line_and_nothing_is_done(tmp_path, capsys, state_dir, change, expected):
    path = write_plan(tmp_path, plan_document(**change))
    line = refused(capsys, state_dir, ["migrate", "--plan", path])
    assert line.startswith(f"blockmig: error: {path}"), line
    assert expected in line, line


@pytest.mark.parametrize("text, suffix, expected", [
    ("{not json", ".json", "not valid JSON"),
    ("volumes = [", ".toml", "not valid TOML"),
    ("[1, 2]", ".json", "a plan is a table with 'volumes'"),
    (b"\xff\xfe", ".toml", "not valid TOML"),
])
def test_malformed_plan_file(tmp_path, capsys, state_dir, text, suffix, expected):
    path = tmp_path / f"plan{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = refused(capsys, state_dir, ["migrate", "--plan", str(path)])
    assert line.startswith(f"blockmig: error: {path}: {expected}"), line


def test_unreadable_plan_file(tmp_path, capsys, state_dir):
    missing = str(tmp_path / "nowhere.toml")
    line = refused(capsys, state_dir, ["migrate", "--plan", missing])
    assert line == f"blockmig: error: {missing}: cannot read the plan: No such file or directory"


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["migrate", "/dev/mapper/a", "/dev/mapper/b", "--to-portal", "127.0.0.2:3260"], "volume 1 (/dev/mapper/a): to_target: required"),
    (["migrate", "/dev/mapper/a", "/dev/mapper/a", "--to-target", TARGET, "--to-portal", "127.0.0.2:3260"],
     "volume 2 (/dev/mapper/a): device: /dev/mapper/a is named twice (also as /dev/mapper/a)"),
    (["migrate", "/dev/mapper/a", "--switch", "together", "--to-target", TARGET, "--to-portal", "1.2.3.4:3260"],
     "--switch together groups several volumes"),
    (["migrate", "/dev/mapper/a", "/dev/mapper/b", "--parallel", "0", "--to-target", TARGET,
      "--to-portal", "1.2.3.4:3260"], "--parallel must be at least 1"),
    (["migrate", "--to-target", TARGET, "--to-portal", "1.2.3.4:3260"], "name the DEVICE to move"),
    (["migrate", "/dev/mapper/a", "--to-target", TARGET], "--to-portal is required"),
])
def test_bad_command_line_plan(capsys, state_dir, argv, expected):
    assert expected in refused(capsys, state_dir, argv)


def test_plan_file_and_devices_together_are_refused(tmp_path, capsys, state_dir):
    path = write_plan(tmp_path, plan_document())
    assert "give no DEVICE" in refused(capsys, state_dir, ["migrate", "/dev/mapper/a", "--plan", path])


def test_command_line_devices_take_the_options_as_defaults():
    spec = plan.build_plan([("volume 1", "/dev/mapper/a", None, {}), ("volume 2", "/dev/mapper/b", None, {})],
                           {**DEFAULTS, "fence": "suspend", "chunk_size": 1 << 20}, "p1", 4)
    assert [(r.device, r.fence, r.chunk_size, r.to_target) for r in spec.requests] == [
        ("/dev/mapper/a", "suspend", 1 << 20, TARGET), ("/dev/mapper/b", "suspend", 1 << 20, TARGET)]
    assert (spec.plan_id, spec.parallel) == ("p1", 4)


def test_plan_id_taken_by_a_migration_is_refused(tmp_path, capsys, state_dir):
    (state_dir / "migrations" / "taken").mkdir(parents=True)
    (state_dir / "migrations" / "taken" / "journal.json").write_text("{}")
    path = write_plan(tmp_path, plan_document(id="taken"))
    assert cli.main(["migrate", "--plan", path]) == 2
    assert "plan id taken is taken" in capsys.readouterr().err
    assert not (state_dir / "plans").exists()


def test_same_volume_under_two_names_is_refused(monkeypatch):
    """Fakes resolve_host_device (a map and one of its disks); tests/lab/test_plan.py does it on a real map."""
    wwids = {"/dev/mapper/mpatha": "36001405aaaa", "/dev/sdb": "36001405aaaa"}
    monkeypatch.setattr(plan, "resolve_host_device", lambda device: HostDevice(device, wwids[device], None))
    spec = plan.build_plan([("volume 1", "/dev/mapper/mpatha", None, {}), ("volume 2", "/dev/sdb", None, {})],
                           DEFAULTS, "p2", 2)
    with pytest.raises(plan.UsageError, match=r"volume 2: device: /dev/sdb is the same volume as /dev/mapper/mpatha \(WWID 36001405aaaa\)$"):
        plan.plan_volumes(spec)


def test_from_target_names_the_maps_and_bare_disks_of_that_target(monkeypatch):
    """Fakes the host's sessions and maps; tests/lab/test_plan.py runs it on real ones."""
    from types import SimpleNamespace

    from blockmig.host import iscsi, multipath

    sessions = [SimpleNamespace(target_iqn="iqn.src", iface="default", disks={0: "sda", 1: "sdb", 2: "sde"}),
                SimpleNamespace(target_iqn="iqn.other", iface="default", disks={0: "sdc"}),
                SimpleNamespace(target_iqn="iqn.src", iface="blockmig-x", disks={0: "sdf"})]
    maps = {"mpatha": ["sda"], "mpathb": ["sdb"], "mpathc": ["sdc"]}
    monkeypatch.setattr(iscsi, "sessions", lambda: sessions)
    monkeypatch.setattr(iscsi, "session_disks", lambda session: session.disks)
    monkeypatch.setattr(multipath, "maps", lambda: [SimpleNamespace(name=name) for name in maps])
    monkeypatch.setattr(plan, "map_disks", lambda name: maps[name])
    assert plan.devices_of_target("iqn.src", include_bare_disks=False) == ["/dev/mapper/mpatha", "/dev/mapper/mpathb"]
    assert plan.devices_of_target("iqn.src", include_bare_disks=True) == [
        "/dev/mapper/mpatha", "/dev/mapper/mpathb", "/dev/sde"]
    with pytest.raises(plan.UsageError, match="the host uses no volume of that target"):
        plan.devices_of_target("iqn.none", include_bare_disks=True)


# -- plans from their journals: status, resume and rollback of a finished plan need no host ---------


def finished_member(member_id: str, plan_id: str, map_name: str) -> None:
    from blockmig.state import STEPS, MigrationJournal

    journal = MigrationJournal.create(
        member_id, plan=plan_id, source={"device": f"/dev/mapper/{map_name}", "map": map_name,
                                         "wwid": f"36001405{member_id}", "size": 16 * 1024 * 1024},
        destination={}, migrator={}, fence="suspend", switch="multipath", worm=False)
    for step in STEPS:
        journal.mark_done(step, **({"seconds": 0.5} if step == "copy" else {}))
    journal.data["steps"]["switch"]["facts"]["io_held_seconds"] = 1.25
    journal.set_state("done", report={"id": member_id})


@pytest.fixture
def finished_plan(state_dir, tmp_path, monkeypatch):
    from blockmig.state import PlanJournal

    monkeypatch.setenv("BLOCKMIG_LOCK_DIR", str(tmp_path / "locks"))
    for number, map_name in ((1, "mpatha"), (2, "mpathb")):
        finished_member(f"host1-{number}", "host1", map_name)
    PlanJournal.create("host1", members=["host1-1", "host1-2"], policy="each", parallel=2, state="done")
    return "host1"


def test_status_lists_plans_and_shows_one_plan(finished_plan, capsys):
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan host1: done, switch each, members host1-1, host1-2\n")
    assert "host1-1: done" in out and "host1-2: done" in out
    assert cli.main(["status", "host1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["plan host1: done, switch each, parallel 2",
                     f"  host1-1: done, mpatha, {16 << 20} of {16 << 20} bytes copied",
                     f"  host1-2: done, mpathb, {16 << 20} of {16 << 20} bytes copied"]
    assert cli.main(["status", "host1", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(m["id"], m["state"], m["copied"]) for m in status["members"]] == [
        ("host1-1", "done", 16 << 20), ("host1-2", "done", 16 << 20)]


def test_resume_of_a_finished_plan_reports_each_volume(finished_plan, capsys):
    assert cli.main(["resume", "host1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "plan host1 (switch each, parallel 2):"
    assert lines[1].split()[:3] == ["mpatha", "done", str(16 << 20)] and "IO held 1250 ms" in lines[1]
    assert lines[3].startswith(f"  total {32 << 20} bytes in ") and lines[3].endswith("2 of 2 volumes done")


def test_rollback_of_a_switched_plan_leaves_it_on_the_destination(finished_plan, capsys):
    assert cli.main(["rollback", "host1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "id": "host1", "rolled_back": [], "on_destination": ["host1-1", "host1-2"], "failed": {}}


def test_a_failed_member_makes_the_exit_code_non_zero(finished_plan, capsys):
    from blockmig.state import MigrationJournal

    MigrationJournal.load("host1-2").mark_failed("copy: the source went away")
    report = {"plan": "host1", "policy": "each", "parallel": 2, "bytes": 1, "wall_seconds": 1.0, "mb_per_s": 0.0,
              "failed": 1, "volumes": [{"id": "host1-2", "map": "mpathb", "outcome": "failed", "size": 1,
                                        "copy_seconds": None, "io_held_seconds": None, "error": "copy: gone"}]}
    assert cli._print_plan_report(report, as_json=False) == 1
    assert "mpathb           failed   1 bytes, copy - s, IO held -  (host1-2): copy: gone" in capsys.readouterr().out
    assert cli.main(["status", "host1"]) == 0
    assert "  host1-2: failed, mpathb, 16777216 of 16777216 bytes copied (copy: the source went away)" in capsys.readouterr().out


# -- one display ------------------------------------------------------------------------------------


class _Terminal:
    """Stands in for stderr on a terminal (tqdm draws only there)."""

    def __init__(self):
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_a_bar_per_volume_a_total_bar_and_step_lines_prefixed_by_the_volume(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    members = [{"id": "p-1", "host_volume": "mpatha", "size": 8 << 20}, {"id": "p-2", "host_volume": "mpathb",
                                                                          "size": 8 << 20}]
    with cli._PlanRenderer(as_json=False) as render:
        render({"event": "plan", "id": "p", "members": members})
        for member in members:
            tag = {"id": member["id"], "host_volume": member["host_volume"], "phase": "copy"}
            render({"event": "step", "step": "copy", "state": "started", **tag})
            render({"event": "start", "size": 8 << 20, **tag})
            render({"event": "chunk", "reserved_address": 4 << 20, **tag})
        render({"event": "io_resumed", "io_held_seconds": 0.5, "id": "p-1", "host_volume": "mpatha"})
        total = render._total.n
    text = "".join(terminal.text)
    assert "mpatha copy" in text and "mpathb copy" in text and "all volumes" in text
    assert "blockmig: mpatha: copy: started\n" in text and "blockmig: mpathb: copy: started\n" in text
    assert "blockmig: mpatha: host IO held 500 ms\n" in text
    assert total == 8 << 20  # half of each volume copied
    assert capsys.readouterr().out == ""


def test_json_events_each_carry_the_member_id(capsys):
    with cli._PlanRenderer(as_json=True) as render:
        render({"event": "chunk", "reserved_address": 4096, "id": "p-2", "host_volume": "mpathb", "phase": "copy"})
    assert json.loads(capsys.readouterr().out) == {"event": "chunk", "reserved_address": 4096, "id": "p-2",
                                                   "host_volume": "mpathb", "phase": "copy"}


def test_a_migration_cannot_take_a_plans_id(finished_plan):
    from blockmig.state import MigrationJournal

    with pytest.raises(plan.MigrationError, match="host1 is the id of a plan"):
        MigrationJournal.create("host1", source={})


class _Journal:
    def __init__(self, mode, done=()):
        self.data = {"mode": mode, "state": "running", "steps": {}}
        self.done = set(done)

    def is_done(self, name):
        return name in self.done


def test_a_pass_through_member_stops_at_its_own_steps_for_the_plans_phases():
    from blockmig.plan import _member_step, _passed_the_switch

    offline, passing = _Journal("offline"), _Journal("pass-through")
    assert [_member_step(offline, p) for p in ("fence", "switch", None)] == ["fence", "switch", None]
    assert [_member_step(passing, p) for p in ("fence", "switch", None)] == ["join", "commit", None]
    assert not _passed_the_switch(passing)  # joined but not committed: a plan's rollback still takes it back
    assert _passed_the_switch(_Journal("pass-through", done={"join", "commit"}))
