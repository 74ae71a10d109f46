"""`blockmig array serve` refuses bad input with one line and changes nothing (the lab serves for real)."""

import os

import pytest
from datapath_helpers import run_blockmig


@pytest.mark.parametrize("args, says", [
    (["--backing-file", "{d}/v.img"], "--backing-file needs --size"),
    (["--backing-device", "/dev/null", "--size", "4M"], "--size is only for --backing-file"),
    (["--backing-file", "{d}/v.img", "--size", "1000"], "multiple of 512"),
    (["--backing-file", "{d}/missing/v.img", "--size", "4M"], "does not exist"),
    (["--backing-file", "{d}/v.img", "--size", "4M", "--serial", "has space"], "serial"),
    (["--backing-file", "{d}/v.img", "--size", "4M", "--migrator-serial", "6001405abc"],
     "--migrator-serial is for the migrator's view: it needs --guard-initiator"),
    (["--backing-file", "{d}/v.img", "--size", "4M", "--guard-initiator", "iqn.2024-01.test:migrator",
      "--migrator-serial", "has space"], "invalid unit serial 'has space'"),
    (["--backing-file", "{d}/v.img", "--size", "4M", "--geometry", "[4096]"], "must be a JSON object"),
    (["--backing-file", "{d}/v.img", "--size", "4M", "--geometry", "{"], "must be a JSON object"),
    (["--backing-file", "{d}/v.img", "--size", "4M", "--geometry", '{"block_size": [1]}'], "JSON object of"),
    (["--backing-file", "{d}/v.img", "--size", "4M", "--geometry", "{}", "--geometry-from", "v"], "not both"),
])
def test_serve_refuses_bad_input_before_anything_is_made(tmp_path, args, says):
    argv = [a.replace("{d}", str(tmp_path)) for a in args]
    result = run_blockmig("array", "serve", "--name", "v", *argv, "--state-dir", str(tmp_path / "state"),
                          "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
    assert sorted(os.listdir(tmp_path)) == [], "serve made something before refusing"


def test_serve_refuses_an_existing_backing_file_of_another_size(tmp_path):
    (tmp_path / "v.img").write_bytes(bytes(8192))
    result = run_blockmig("array", "serve", "--name", "v", "--backing-file", str(tmp_path / "v.img"),
                          "--size", "4M", "--state-dir", str(tmp_path / "state"),
                          "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "holds 8192 bytes" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["v.img"] and (tmp_path / "v.img").stat().st_size == 8192


def test_a_started_handler_runs_the_blockmig_that_starts_it(monkeypatch, tmp_path):
    """It starts in "/" with -P: this tree goes on its path, its paths are absolute; an installed blockmig
    (in site-packages) is left to find itself, so site-packages never comes before the standard library."""
    import site

    import blockmig
    from blockmig.array.tcmu import client

    tree = os.path.dirname(os.path.dirname(os.path.abspath(blockmig.__file__)))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert client._serve_env()["PYTHONPATH"].split(os.pathsep) == [tree, "/elsewhere"]
    monkeypatch.setattr(site, "getsitepackages", lambda: [tree])
    assert client._serve_env() is None
    monkeypatch.chdir(tmp_path)
    argv = client._serve_argv("v", "state", "run", "v.img", 4096, None,
                              {"--serial": "ab", "--geometry": None})
    assert argv[1:5] == ["-P", "-m", "blockmig", "array"]
    assert argv[argv.index("--state-dir") + 1] == str(tmp_path / "state")
    assert argv[argv.index("--run-dir") + 1] == str(tmp_path / "run")
    assert argv[argv.index("--backing-file") + 1] == str(tmp_path / "v.img")
    assert argv[-2:] == ["--serial", "ab"] and "--geometry" not in argv
