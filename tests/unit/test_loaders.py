"""Every loader of a file blockmig reads: any bytes give a loaded object or one JournalError/UsageError line.

Fuzzed with hypothesis (raw bytes, and JSON documents that are a valid file with one field replaced by any
JSON value), plus the cases found by hand: nesting 5000 deep, /dev/zero, a FIFO, chunk_size 0, a journal of
another size than its source, a digests list of the wrong length. And one damaged journal.json never
breaks `status` of the others, nor the planning of another volume.
"""

import contextlib
import io
import json
import os

import pytest
from datapath_helpers import MiB, run_blockmig, write_random_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmig import cli, plan
from blockmig.datapath import copy_volume, load_manifest
from blockmig.datapath.digest import Manifest
from blockmig.datapath.journal import CopyJournal
from blockmig.errors import JournalError, MigrationError, UsageError
from blockmig.state import MigrationJournal, PlanJournal, refuse_unfinished_migration_of, unreadable_journals

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.text(st.characters(exclude_categories=()), max_size=6),  # lone surrogates too
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
DIGEST = "ab" * 32


@pytest.fixture
def state_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "state" / "migrations"))
    monkeypatch.setenv("BLOCKMIG_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path


def valid_copy_journal() -> dict:
    volume = {"path": "/dev/x", "size": 8192, "logical_block_size": 512, "is_block_device": False,
              "device": "1:2", "serial": ""}
    manifest = Manifest(8192, 4096, [DIGEST])
    return {"format": "blockmig-copy-journal/1", "source": volume, "destination": {**volume, "device": "1:3"},
            "reserved_address": 4096, "complete": False, "manifest": manifest.to_dict()}


def valid_migration_journal(journal_id: str, wwid: str = "36001405aaaaaaaaaaaaaaaaaaaaaaaaa") -> dict:
    return {"format": "blockmig-migration/1", "id": journal_id, "created": "2026-12-01T00:00:00.000+00:00",
            "state": "failed", "steps": {}, "source": {"wwid": wwid, "size": 8192}, "destination": {}}


def valid_plan_file() -> dict:
    return {"id": "p1", "parallel": 2, "defaults": {"to_target": "iqn.x:y", "to_portal": "127.0.0.2:3260",
                                                   "chunk_size": "4M", "max_rate": "100M"},
            "volumes": [{"device": "/dev/mapper/mpatha"}, {"device": "/dev/mapper/mpathb", "id": "b"}]}


def replaced(document: dict, path: tuple, value):
    """`document` with the field at `path` (keys into nested dicts) replaced by `value`."""
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def fields(document: dict, prefix=()):
    for key, value in document.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from fields(value, prefix + (key,))


def load_each(tmp_path, raw: bytes) -> None:
    """Every loader on `raw`; anything but a result or a JournalError/UsageError fails the test."""
    path, toml = tmp_path / "fuzzed.json", tmp_path / "fuzzed.toml"
    path.write_bytes(raw)
    toml.write_bytes(raw)
    for load in (lambda: load_manifest(str(path)), lambda: CopyJournal.load(str(path)),
                 lambda: plan.load_plan_file(str(path)), lambda: plan.load_plan_file(str(toml))):
        try:
            load()
        except (JournalError, UsageError) as exc:
            assert "\n" not in str(exc), exc
    journal_dir = tmp_path / "state" / "migrations" / "fz"
    journal_dir.mkdir(parents=True, exist_ok=True)
    (journal_dir / "journal.json").write_bytes(raw)
    plan_dir = tmp_path / "state" / "plans" / "fz"
    plan_dir.mkdir(parents=True, exist_ok=True)
    (plan_dir / "plan.json").write_bytes(raw)
    try:
        MigrationJournal.load("fz").summary()
    except JournalError:
        pass
    try:
        PlanJournal.load("fz")
    except JournalError:
        pass
    for args in (["status"], ["status", "--json"], ["status", "fz"]):  # what an admin runs to look at it
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as errors:
            assert cli.main(args) in (0, 1), errors.getvalue()
        assert len(errors.getvalue().splitlines()) <= 1


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_load_or_are_one_error(state_dirs, raw):
    load_each(state_dirs, raw)


@FUZZ
@given(st.data())
def test_any_field_of_a_valid_file_replaced_loads_or_is_one_error(state_dirs, data):
    for document in (valid_copy_journal(), valid_migration_journal("fz"), valid_plan_file(),
                     {"format": "blockmig-plan/1", "id": "fz", "created": "x", "members": ["a"], "policy": "each",
                      "parallel": 1}):
        path = data.draw(st.sampled_from(sorted(fields(document))))
        load_each(state_dirs, json.dumps(replaced(document, path, data.draw(JSON_VALUES))).encode())


@pytest.mark.parametrize("text", ["/dev/\\ud800", "/dev/a\\u0000b", "/dev/a\\nb", "x" * 5000])
@pytest.mark.parametrize("key", ["device", "backing_dir"])
def test_a_path_no_os_call_can_take_is_one_line(state_dirs, key, text):
    document = valid_plan_file()
    (document["volumes"][0] if key == "device" else document["defaults"])[key] = "PLACEHOLDER"
    path = state_dirs / "plan.json"
    path.write_text(json.dumps(document).replace("PLACEHOLDER", text))
    with pytest.raises(UsageError, match=f": {key}: (contains a control|is not valid UTF-8|5000 characters)") as refused:
        plan.load_plan_file(str(path))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000])
def test_nesting_5000_deep_is_one_line(state_dirs, raw):
    path = state_dirs / "deep.json"
    path.write_bytes(raw)
    with pytest.raises(UsageError, match="nested too deeply"):
        plan.load_plan_file(str(path))
    with pytest.raises(JournalError, match="nested too deeply"):
        load_manifest(str(path))
    toml = state_dirs / "deep.toml"
    toml.write_bytes(b"a = " + b"[" * 5000 + b"]" * 5000)
    with pytest.raises(UsageError, match="nested too deeply|not valid TOML"):
        plan.load_plan_file(str(toml))


def test_a_state_manifest_is_never_read_through_a_link(tmp_path):
    (tmp_path / "real.json").write_text(json.dumps(Manifest(4096, 4096, [DIGEST]).to_dict()))
    (tmp_path / "manifest.json").symlink_to(tmp_path / "real.json")
    assert load_manifest(str(tmp_path / "manifest.json")).chunk_digests == [DIGEST]  # one the user names
    with pytest.raises(JournalError, match="symbolic link"):
        load_manifest(str(tmp_path / "manifest.json"), state_file=True)


def test_plan_and_manifest_from_dev_zero_or_a_fifo_return_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for source in ("/dev/zero", str(tmp_path / "fifo")):
        result = run_blockmig("migrate", "--plan", source, timeout=30)
        assert (result.returncode, result.stderr) == (2, f"blockmig: error: cannot read plan {source}: "
                                                         "not a regular file\n")
        result = run_blockmig("verify", "/dev/null", "--manifest", source, timeout=30)
        assert (result.returncode, result.stderr) == (1, f"blockmig: error: cannot read manifest {source}: "
                                                         "not a regular file\n")


@pytest.mark.parametrize("change,message", [
    ({"chunk_size": 0}, "chunk size 0 is not a number of bytes from 1"),
    ({"chunk_size": -4096}, "chunk size -4096 is not"),
    ({"chunk_size": 1 << 40}, "chunk size 1099511627776 is not"),
    ({"size": "8192"}, "size '8192' is not a number of bytes"),
    ({"chunk_digests": [DIGEST, DIGEST, DIGEST]}, "has 3 chunk digests; its size allows 2"),
    ({"chunk_digests": ["xyz"]}, "not a list of SHA-256 hex digests"),
])
def test_a_damaged_copy_journal_is_refused_in_one_line(tmp_path, change, message):
    document = valid_copy_journal()
    document["manifest"].update(change)
    document["manifest"]["volume_digest"] = None
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(document))
    with pytest.raises(JournalError, match=message):
        CopyJournal.load(str(path))


def test_a_copy_journal_of_another_size_is_not_resumed(tmp_path):
    """Today's bug: a journal recording a shorter copy resumed and 'verified' over its first part only."""
    write_random_file(tmp_path / "src", 2 * MiB, seed=5)
    (tmp_path / "dst").write_bytes(bytes(2 * MiB))
    journal = str(tmp_path / "j.json")
    copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), journal, chunk_size=MiB, allow_regular_files=True)
    document = json.loads((tmp_path / "j.json").read_text())
    document["manifest"].update(size=MiB, chunk_digests=document["manifest"]["chunk_digests"][:1])
    document["manifest"]["volume_digest"] = None
    document["reserved_address"] = MiB
    for role in ("source", "destination"):  # the pair check alone would have caught a plain edit
        document[role]["size"] = os.path.getsize(tmp_path / "src")
    (tmp_path / "j.json").write_text(json.dumps(document))
    before = (tmp_path / "dst").read_bytes()
    with pytest.raises(JournalError, match=f"records a {MiB}-byte copy, but the source .* holds {2 * MiB} bytes"):
        copy_volume(str(tmp_path / "src"), str(tmp_path / "dst"), journal, resume=True, allow_regular_files=True)
    assert (tmp_path / "dst").read_bytes() == before


def write_journal(state_dirs, journal_id: str, raw: bytes) -> None:
    directory = state_dirs / "state" / "migrations" / journal_id
    directory.mkdir(parents=True, mode=0o700)
    (directory / "journal.json").write_bytes(raw)


def test_one_damaged_journal_is_listed_by_name_and_the_others_stay_usable(state_dirs):
    MigrationJournal.create("good-1", **{k: v for k, v in valid_migration_journal("x").items()
                                         if k not in ("format", "id", "created", "state", "steps")})
    write_journal(state_dirs, "broken", b'{"format": "blockmig-migration/1", "id": "broken", "sou')
    write_journal(state_dirs, "nested", b"[" * 5000)
    result = run_blockmig("status")
    assert result.returncode == 0, result.stderr
    assert "good-1: planned" in result.stdout
    assert "migration broken: unreadable (" in result.stdout and "not valid JSON" in result.stdout
    assert "migration nested: unreadable (" in result.stdout and "nested too deeply" in result.stdout
    as_json = json.loads(run_blockmig("status", "--json").stdout)
    assert [m["id"] for m in as_json["migrations"]] == ["good-1"]
    assert sorted(u["id"] for u in as_json["unreadable"]) == ["broken", "nested"]
    broken = run_blockmig("status", "broken")
    assert broken.returncode == 1 and len(broken.stderr.splitlines()) == 1
    assert broken.stderr.startswith(f"blockmig: error: {state_dirs}/state/migrations/broken/journal.json is not")
    assert run_blockmig("status", "good-1").returncode == 0


def test_planning_and_a_damaged_journal(state_dirs):
    """Decision: a damaged journal blocks a volume only if it could be that volume's (its bytes name the WWID,
    or name none at all); planning any volume it does not name goes on."""
    write_journal(state_dirs, "torn", b'{"format": "blockmig-migration/1", "source": {"wwid": "36001405aaaaaaaaaaaaaaaaaaaaaaaaa"}, ')
    with pytest.raises(JournalError, match="torn/journal.json is unreadable .* names this volume's WWID"):
        refuse_unfinished_migration_of("36001405aaaaaaaaaaaaaaaaaaaaaaaaa")
    refuse_unfinished_migration_of("36001405bbbbbbbbbbbbbbbbbbbbbbbbb")  # another volume: free
    write_journal(state_dirs, "garbage", b"\xff\x00 not a journal")
    with pytest.raises(JournalError, match="garbage/journal.json is unreadable .* names no WWID, so it could be"):
        refuse_unfinished_migration_of("36001405bbbbbbbbbbbbbbbbbbbbbbbbb")
    assert {damaged.name for damaged in unreadable_journals()} == {"torn", "garbage"}


def test_an_unfinished_readable_journal_still_blocks_its_volume(state_dirs):
    write_journal(state_dirs, "m1", json.dumps(valid_migration_journal("m1", "36001405ccccccccccccccccccccccccc")).encode())
    with pytest.raises(MigrationError, match="migration m1 of this volume is unfinished"):
        refuse_unfinished_migration_of("36001405ccccccccccccccccccccccccc")
