"""Sizes and ids: one parser each, bounded; the command line refuses bad ones in one line, before anything exists."""

import os

import pytest
from datapath_helpers import run_blockmig
from hypothesis import given, settings
from hypothesis import strategies as st

from blockmig.errors import UsageError
from blockmig.ids import check_id
from blockmig.sizes import MAX_CHUNK_SIZE, parse_chunk_size, parse_max_rate, parse_size

MiB = 1 << 20


@pytest.mark.parametrize("text,expected", [
    ("4M", 4 * MiB), ("16MiB", 16 * MiB), ("1g", 1 << 30), ("4096", 4096), ("1.5K", 1536), (" 2 M ", 2 * MiB),
    ("256M", 256 * MiB), (4096, 4096)])
def test_sizes_parse_exactly(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,message", [
    ("inf", "not a size: 'inf'"), ("nan", "not a size: 'nan'"), ("-1M", "not a size: '-1M'"),
    ("1e3", "not a size: '1e3'"), ("0", "size must be positive"), ("0.5", "not a whole number of bytes"),
    ("0.1K", "not a whole number of bytes"), ("", "not a size"), ("4Q", "not a size"), ("٣M", "not a size"),
    ("9" * 30, "not a size"), ("2000000T", "size too large"), (True, "not a size"), (4.0, "not a size"),
    (-4096, "size must be positive"), ([1], "not a size")])
def test_bad_sizes_are_one_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


@pytest.mark.parametrize("text,message", [
    ("1T", "larger than 268435456"), ("3G", "larger than 268435456"), ("257M", "larger than 268435456"),
    ("6K", "not a multiple of 4096"), ("512", "not a multiple of 4096")])
def test_chunk_sizes_are_bounded(text, message):
    with pytest.raises(ValueError, match=message):
        parse_chunk_size(text)


def test_chunk_size_must_fit_the_volumes_block_size():
    assert parse_chunk_size("8K", block_size=8192) == 8192
    with pytest.raises(ValueError, match="not a multiple of the volume's block size 8192"):
        parse_chunk_size("12K", block_size=8192)


@pytest.mark.parametrize("text", ["0.5", "100", "1023K"])
def test_a_rate_below_one_mib_per_second_is_refused_not_unthrottled(text):
    with pytest.raises(ValueError):
        parse_max_rate(text)
    assert parse_max_rate("1M") == MiB


@given(st.text(max_size=40) | st.integers() | st.floats() | st.booleans() | st.none())
@settings(max_examples=400)
def test_any_size_input_is_a_bounded_size_or_one_value_error(text):
    try:
        size = parse_size(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(size, int) and 0 < size <= 1 << 60
    try:
        chunk = parse_chunk_size(text)
    except ValueError:
        return
    assert chunk % 4096 == 0 and chunk <= MAX_CHUNK_SIZE


@pytest.mark.parametrize("value", ["../../../tmp/x", "a/b", "..", ".hidden", "", "x\0y", "x" * 42, "-dash", "a b",
                                   "é", None, 7])
def test_ids_refuse_paths_and_strangers(value):
    with pytest.raises(UsageError, match="is not an id"):
        check_id(value, "plan id")


@pytest.mark.parametrize("value", ["m1", "host1-2", "20261201-abc.d_e", "x" * 41])
def test_ids_accept_names(value):
    assert check_id(value) == value


@pytest.fixture
def state_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKMIG_STATE_DIR", str(tmp_path / "state" / "migrations"))
    monkeypatch.setenv("BLOCKMIG_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path


@pytest.mark.parametrize("args,option", [
    (["status", "../../../etc"], "ID"),
    (["resume", "/tmp/x"], "ID"),
    (["rollback", ".."], "ID"),
    (["migrate", "/dev/null", "--to-target", "t", "--to-portal", "127.0.0.1:3260", "--id", "../../../tmp/x"],
     "--id"),
    (["migrate", "--plan", "/dev/null", "--id", "a/b"], "--id"),
    (["migrate", "/dev/null", "--chunk-size", "1T"], "--chunk-size"),
    (["migrate", "/dev/null", "--chunk-size", "3G"], "--chunk-size"),
    (["migrate", "/dev/null", "--chunk-size", "inf"], "--chunk-size"),
    (["copy", "/dev/null", "/dev/null", "--chunk-size", "nan"], "--chunk-size"),
    (["copy", "/dev/null", "/dev/null", "--chunk-size", "-4M"], "--chunk-size"),
    (["migrate", "/dev/null", "--max-rate", "0.5"], "--max-rate"),
    (["copy", "/dev/null", "/dev/null", "--max-rate", "100"], "--max-rate"),
    (["migrate", "/dev/null", "--min-rate", "0.5"], "--min-rate"),
    (["array", "serve", "--name", "x", "--backing-device", "/dev/null", "--min-rate", "nan"], "--min-rate"),
    (["migrate", "/dev/null", "--switch-timeout", "nan"], "--switch-timeout"),
    (["migrate", "/dev/null", "--max-hold", "inf"], "--max-hold"),
    (["copy", "/dev/null", "/dev/null", "--journal-interval", "-1"], "--journal-interval"),
])
def test_bad_ids_and_sizes_on_the_command_line_are_one_line_exit_2_and_make_nothing(state_dirs, args, option):
    result = run_blockmig(*args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"blockmig: error: argument {option}: "), result.stderr
    assert result.stdout == ""
    assert sorted(os.listdir(state_dirs)) == [], "state, plans or locks were made"
    assert not os.path.exists("/tmp/x")


@pytest.mark.parametrize("args,message", [
    (["migrate", "/dev/null", "--to-target", "t", "--to-portal", "127.0.0.1:3260", "--min-rate", "8M",
      "--max-rate", "4M"], "blockmig: error: --min-rate 8388608 is above --max-rate 4194304 bytes/s"),
    (["array", "serve", "--name", "x", "--backing-device", "/dev/null", "--min-rate", "8M"],
     "blockmig: error: --min-rate paces a copy under the host's passed-through IO: it needs --pass-through-source"),
])
def test_a_floor_rate_that_cannot_apply_is_one_line_and_makes_nothing(state_dirs, args, message):
    result = run_blockmig(*args)
    assert result.returncode != 0 and result.stderr.splitlines() == [message], result.stderr
    assert result.stdout == "" and sorted(os.listdir(state_dirs)) == []


def test_a_plan_id_from_the_api_is_checked_before_anything_is_planned(state_dirs):
    from blockmig import plan
    from blockmig.migration import MigrationRequest

    spec = plan.PlanSpec([MigrationRequest(device="/dev/null", to_target="t", to_portal="127.0.0.1:3260")],
                         plan_id="../../../tmp/x", labels=["volume 1 (/dev/null)"])
    with pytest.raises(UsageError, match=r"plan id: '../../../tmp/x' is not an id"):
        plan.plan_volumes(spec)
    assert os.listdir(state_dirs) == [] and not os.path.exists("/tmp/x")


def test_a_plan_journal_naming_a_path_as_member_is_damaged(state_dirs):
    from blockmig.errors import JournalError
    from blockmig.state import PlanJournal, unreadable_journals

    PlanJournal.create("p1", members=["p1-1"], policy="each", parallel=1, state="planned")
    path = state_dirs / "state" / "plans" / "p1" / "plan.json"
    path.write_text(path.read_text().replace('"p1-1"', '"../../../etc"'))
    with pytest.raises(JournalError, match="its members are not migration ids"):
        PlanJournal.load("p1")
    assert [damaged.name for damaged in unreadable_journals()] == ["p1"]
    result = run_blockmig("resume", "p1")
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"blockmig: error: {path} is damaged: its members are not migration ids"]
