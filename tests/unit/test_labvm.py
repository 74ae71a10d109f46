"""scripts/labvm's host-side logic: reading the guest console, the command hand-over, inputs.

Booting a guest is covered by the lab suite itself (scripts/test runs it through labvm).
"""

import importlib.machinery
import importlib.util
import io
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def load_labvm():
    loader = importlib.machinery.SourceFileLoader("labvm", str(REPO / "scripts/labvm"))
    spec = importlib.util.spec_from_loader("labvm", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


labvm = load_labvm()


def feed(lines):
    out = io.BytesIO()
    console = labvm.ConsoleFilter(out)
    for line in lines:
        console.feed(line)
    return console, out.getvalue()


def test_console_passes_only_the_command_output_without_carriage_returns():
    console, out = feed([
        b"Linux version 6.1 booting\r\n",
        b"labvm guest: 1.9 s: mounted\r\n",
        b"<<labvm:run>>\r\n",
        b"collected 3 items\r\n",
        b"3 passed\r\n",
        b"<<labvm:exit=0>>\r\n",
        b"reboot: Power down\r\n",
    ])
    assert out == b"collected 3 items\n3 passed\n"
    assert console.status == 0
    assert b"Linux version 6.1 booting\n" in console.noise


def test_console_reads_the_exit_marker_after_output_without_newline():
    console, out = feed([b"<<labvm:run>>\n", b"no newline<<labvm:exit=3>>\n", b"after\n"])
    assert out == b"no newline\n"
    assert console.status == 3


def test_console_without_exit_marker_has_no_status():
    console, out = feed([b"<<labvm:run>>\n", b"half\n"])
    assert console.status is None and console.started
    assert out == b"half\n"


def test_console_notices_a_guest_that_failed_to_set_up():
    console, out = feed([b"labvm guest: setup failed: modprobe x\n", b"<<labvm:setup-failed>>\n"])
    assert console.setup_failed and not console.started
    assert out == b""


def test_run_script_hands_over_arguments_and_environment_verbatim(tmp_path):
    args = ["printf", "%s|", "a b", "$HOME", "it's", "*", ""]
    labvm.write_control(tmp_path / "ctl", tmp_path, args, [("ODD", "x $y 'z'")], interactive=False)
    assert (tmp_path / "ctl/share").read_text() == f"{tmp_path}\n"
    assert not (tmp_path / "ctl/interactive").exists()
    script = tmp_path / "ctl/run.sh"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout == "a b|$HOME|it's|*||"
    labvm.write_control(tmp_path / "ctl2", tmp_path, ["sh", "-c", 'printf %s "$ODD"'], [("ODD", "x $y 'z'")], False)
    env = subprocess.run(["bash", str(tmp_path / "ctl2/run.sh")], capture_output=True, text=True, check=True)
    assert env.stdout == "x $y 'z'"


@pytest.mark.parametrize("share", ["/", "/usr/lib", "/proc", "/etc"])
def test_share_refuses_folders_the_guest_system_needs(share):
    with pytest.raises(labvm.LabVMError, match="--share"):
        labvm.check_share(Path(share))


def test_share_refuses_a_missing_folder_and_unmountable_names(tmp_path):
    with pytest.raises(labvm.LabVMError, match="not a folder"):
        labvm.check_share(tmp_path / "missing")
    (tmp_path / "a b").mkdir()
    with pytest.raises(labvm.LabVMError, match="comma or space"):
        labvm.check_share(tmp_path / "a b")
    labvm.check_share(tmp_path)


@pytest.mark.parametrize("text", ["NOEQUALS", "=x", "1A=x", "A-B=x"])
def test_env_option_refuses_what_is_not_name_equals_value(text):
    with pytest.raises(Exception, match="NAME=VALUE"):
        labvm.env_pair(text)


def test_env_option_keeps_equals_signs_in_the_value():
    assert labvm.env_pair("A_1=x=y") == ("A_1", "x=y")


def test_guest_package_list_has_the_lab_stack_and_no_comments():
    packages = labvm.guest_packages()
    for needed in ["python3-rtslib-fb", "open-iscsi", "multipath-tools", "udev", "python3-pytest"]:
        assert needed in packages
    assert all(p and "#" not in p and " " not in p for p in packages)


def test_image_key_changes_with_each_input(tmp_path, monkeypatch):
    lab = tmp_path / "lab"
    shutil.copytree(REPO / "lab", lab)
    monkeypatch.setattr(labvm, "LAB", lab)
    monkeypatch.setattr(labvm, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(labvm, "uml_kernel_version", lambda: "6.1.0")
    monkeypatch.setattr(labvm, "qemu_kernel", lambda: ("6.1.0-1-amd64", Path("/boot/vmlinuz-6.1.0-1-amd64")))
    monkeypatch.setattr(labvm, "package_version", lambda name: "1")
    keys = {labvm.image_dir()}
    for name in ["guest-packages.txt", "provision.sh", "guest-init"]:
        with open(lab / name, "a") as f:
            f.write("\n# changed\n")
        keys.add(labvm.image_dir())
    monkeypatch.setattr(labvm, "package_version", lambda name: "2")
    keys.add(labvm.image_dir())
    assert len(keys) == 5
    assert all(key.parent == tmp_path / "cache" for key in keys)
