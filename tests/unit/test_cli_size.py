import argparse
import os
import subprocess
import sys

import pytest

from blockmig.cli import parse_size


@pytest.mark.parametrize("text,expected", [("64M", 64 << 20), ("16MiB", 16 << 20), ("1g", 1 << 30), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-1M"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def _modules_loaded(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`blockmig ARGS` under -X importtime, and the modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "blockmig", *args], capture_output=True,
                            text=True, check=False, env=env)
    return result, [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line]


def test_copy_with_a_chunk_size_loads_no_orchestrator_or_host_module(tmp_path):
    """The data-path command parses its size without plan -> migration -> host (pyudev)."""
    source, destination = tmp_path / "a.img", tmp_path / "b.img"
    for path in (source, destination):
        path.write_bytes(b"\0" * (1 << 20))
    _, loaded = _modules_loaded("copy", "--chunk-size", "4M", "--allow-files", "--journal", str(tmp_path / "j.json"),
                                str(source), str(destination))
    assert "blockmig.datapath.copy" in loaded
    assert not [name for name in loaded if name.startswith(("blockmig.host", "blockmig.orchestrator",
                                                             "blockmig.plan", "blockmig.migration"))]


def test_status_loads_no_asyncio(tmp_path):
    """`blockmig status` waits for nothing: tenacity (which imports asyncio, a third of its start in the
    lab's emulated guest) is imported only by a wait."""
    result, loaded = _modules_loaded("status", env={**os.environ, "BLOCKMIG_STATE_DIR": str(tmp_path)})
    assert result.returncode == 0 and "blockmig.plan" in loaded, result.stderr[-2000:]
    assert "asyncio" not in loaded and "tenacity" not in loaded
