import argparse

import pytest

from blockmig.cli import parse_size


@pytest.mark.parametrize("text,expected", [("64M", 64 << 20), ("16MiB", 16 << 20), ("1g", 1 << 30), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-1M"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_copy_with_a_chunk_size_loads_no_orchestrator_or_host_module(tmp_path):
    """The data-path command parses its size without plan -> migration -> host (pyudev)."""
    import subprocess
    import sys

    source, destination = tmp_path / "a.img", tmp_path / "b.img"
    for path in (source, destination):
        path.write_bytes(b"\0" * (1 << 20))
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "blockmig", "copy", "--chunk-size", "4M", "--allow-files",
         "--journal", str(tmp_path / "j.json"), str(source), str(destination)],
        capture_output=True, text=True, check=False)
    loaded = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line]
    assert "blockmig.datapath.copy" in loaded
    assert not [name for name in loaded if name.startswith(("blockmig.host", "blockmig.orchestrator",
                                                             "blockmig.plan", "blockmig.migration"))]


def test_status_loads_no_asyncio(tmp_path):
    """`blockmig status` waits for nothing: tenacity (which imports asyncio, a third of its start in the
    lab's emulated guest) is imported only by a wait."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "blockmig", "status"], capture_output=True,
                            text=True, check=False, env={**os.environ, "BLOCKMIG_STATE_DIR": str(tmp_path)})
    loaded = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line]
    assert result.returncode == 0 and "blockmig.plan" in loaded, result.stderr[-2000:]
    assert "asyncio" not in loaded and "tenacity" not in loaded
