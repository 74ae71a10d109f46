"""The CLI: sizes, the progress bar on a terminal, JSON events, one-line errors."""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
from datapath_helpers import REPO, MiB, json_events, run_blockmig, write_random_file

from blockmig.cli import parse_size
from blockmig.datapath import default_journal_path, load_manifest


@pytest.mark.parametrize("text, expected", [("4M", 4 * MiB), ("512k", 512 * 1024), ("1G", 1 << 30),
                                            ("4MiB", 4 * MiB), ("4096", 4096), ("1.5M", 3 * MiB // 2)])
def test_parse_size_accepts_binary_suffixes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "four", "-4M", "0"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_progress_bar_with_rate_and_eta_on_a_terminal(tmp_path):
    write_random_file(tmp_path / "src", 4 * MiB, seed=31)
    (tmp_path / "dst").write_bytes(bytes(4 * MiB))
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    process = subprocess.Popen(
        [sys.executable, "-m", "blockmig", "copy", str(tmp_path / "src"), str(tmp_path / "dst"), "--allow-files",
         "--journal", str(tmp_path / "j.json"), "--chunk-size", "256K", "--max-rate", "16M"],
        stderr=terminal, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    os.close(terminal)
    screen = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        screen += data
    os.close(controller)
    assert process.wait(timeout=60) == 0
    text = screen.decode(errors="replace")
    assert "copy: 100%" in text
    assert "4.00M/4.00M" in text and "B/s]" in text and "<00:00" in text  # size, rate and ETA
    assert process.stdout.read().startswith(f"copied {tmp_path / 'src'} -> {tmp_path / 'dst'}: {4 * MiB} bytes")


def test_verify_json_events(tmp_path):
    write_random_file(tmp_path / "src", MiB, seed=32)
    (tmp_path / "dst").write_bytes(bytes(MiB))
    assert run_blockmig("copy", str(tmp_path / "src"), str(tmp_path / "dst"), "--allow-files", "--chunk-size",
                        "512K", "--journal", str(tmp_path / "j.json")).returncode == 0
    result = run_blockmig("verify", str(tmp_path / "dst"), "--allow-files", "--json", "--manifest",
                          str(tmp_path / "j.json"))
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    assert [e["event"] for e in events] == ["verify_start", "verified_chunk", "verified_chunk", "verify_done"]
    assert all(e["match"] for e in events if e["event"] == "verified_chunk")


def test_missing_manifest_is_one_line_error(tmp_path):
    result = run_blockmig("verify", str(tmp_path / "dst"), "--manifest", str(tmp_path / "nope.json"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"blockmig: error: cannot read manifest {tmp_path}/nope.json: No such file or directory"
    ]


def test_default_journal_lives_under_var_lib_blockmig(tmp_path):
    write_random_file(tmp_path / "src", MiB, seed=33)
    (tmp_path / "dst").write_bytes(bytes(MiB))
    journal = default_journal_path(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert os.path.dirname(journal) == "/var/lib/blockmig"
    assert journal != default_journal_path(str(tmp_path / "dst"), str(tmp_path / "src"))
    try:
        result = run_blockmig("copy", str(tmp_path / "src"), str(tmp_path / "dst"), "--allow-files")
        assert result.returncode == 0, result.stderr
        assert load_manifest(journal).volume_digest in result.stdout
    finally:
        if os.path.exists(journal):
            os.unlink(journal)


def test_bad_arguments_are_one_line_errors():
    result = run_blockmig("copy", "/dev/null", "/dev/null", "--chunk-size", "4Q")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "blockmig: error: argument --chunk-size: not a size: '4Q' (use e.g. 4M, 512K, 1G) (see blockmig copy --help)"
    ]
