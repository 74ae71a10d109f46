"""`blockmig lab up|down|status`: the arrays in configfs, and nothing left behind."""

import glob
import json
import os
import subprocess
import sys

from blockmig import lab
from blockmig.array import lio
from blockmig.host import iscsi, multipath, udev

CONFIGFS = "/sys/kernel/config/target"
HOST_IQN = "iqn.2026-11.lab.blockmig:host"


def read(path):
    with open(path) as f:
        return f.read().strip()


def test_lab_up_makes_the_arrays_in_configfs(lab_env, backing_dir):
    source = f"{CONFIGFS}/iscsi/{lab.SOURCE_IQN}/tpgt_1"
    destination = f"{CONFIGFS}/iscsi/{lab.DESTINATION_IQN}/tpgt_1"
    assert read(f"{source}/enable") == "1" and read(f"{destination}/enable") == "1"
    assert os.listdir(f"{source}/np") == ["127.0.0.1:3260"]
    assert lio.find_array(lab.SOURCE_IQN).portals == (("127.0.0.1", 3260),)
    assert os.listdir(f"{destination}/np") == ["127.0.0.2:3260"]
    for tpg in (source, destination):
        assert read(f"{tpg}/attrib/authentication") == "0"
        assert read(f"{tpg}/attrib/generate_node_acls") == "0"  # no demo mode
    assert os.listdir(f"{destination}/lun") == [] and os.listdir(f"{destination}/acls") == []
    # the source volume: a fileio storage object with the lab's serial, LUN 0, mapped to the host only
    [so_dir] = glob.glob(f"{CONFIGFS}/core/fileio_*/{lab.SOURCE_VOLUME}")
    assert lab.SOURCE_SERIAL in read(f"{so_dir}/wwn/vpd_unit_serial")
    [link] = [p for p in glob.glob(f"{source}/lun/lun_0/*") if os.path.islink(p)]
    assert os.path.realpath(link) == so_dir
    assert os.listdir(f"{source}/acls") == [HOST_IQN]
    assert os.path.isdir(f"{source}/acls/{HOST_IQN}/lun_0")
    assert os.path.getsize(lab.source_backing_file(backing_dir)) == 16 * 1024 * 1024
    # status says the same
    assert lab_env["up"] is True
    [volume] = [v for a in lab_env["arrays"] for v in a["volumes"]]
    assert (volume["name"], volume["wwid"], volume["lun"]) == (lab.SOURCE_VOLUME, lab.SOURCE_WWID, 0)
    assert volume["mappings"] == [{"initiator": HOST_IQN, "lun": 0, "write_protect": False}]
    [session] = lab_env["sessions"]
    assert (session["target"], session["portal"], session["state"]) == (lab.SOURCE_IQN, "127.0.0.1:3260", "LOGGED_IN")
    [found] = lab_env["maps"]
    assert found["wwid"] == lab.SOURCE_WWID and [p["dev"] for p in found["paths"]] == [session["disks"]["0"]]


def assert_nothing_of_the_lab_left(backing_dir):
    for iqn in lab.LAB_TARGETS:
        assert not os.path.exists(f"{CONFIGFS}/iscsi/{iqn}")
        assert subprocess.run(["iscsiadm", "-m", "node", "-T", iqn], capture_output=True).returncode == 21
    assert not glob.glob(f"{CONFIGFS}/core/*/{lab.SOURCE_VOLUME}")
    assert not [s for s in iscsi.sessions() if s.target_iqn in lab.LAB_TARGETS]
    assert not [m for m in multipath.maps() if m.wwid == lab.SOURCE_WWID]
    assert os.listdir(backing_dir) == []


def test_lab_down_leaves_nothing_behind(backing_dir):
    status = lab.lab_up(16 * 1024 * 1024, backing_dir)
    disk = status["sessions"][0]["disks"]["0"]
    link = iscsi.by_path_link(*lab.SOURCE_PORTAL, lab.SOURCE_IQN, 0)
    assert os.path.realpath(link) == f"/dev/{disk}"
    removed = lab.lab_down(backing_dir)
    udev.wait_for_path_gone(link)
    assert f"array {lab.SOURCE_IQN}" in removed and f"array {lab.DESTINATION_IQN}" in removed
    assert not os.path.exists(f"/sys/block/{disk}")
    assert_nothing_of_the_lab_left(backing_dir)
    assert lab.lab_down(backing_dir) == []  # idempotent


def blockmig(*args):
    return subprocess.run([sys.executable, "-m", "blockmig", *args], capture_output=True, text=True)


def test_cli_lab_up_status_down():
    """The CLI with its defaults (backing files in /var/lib/blockmig-lab, 64 MiB)."""
    backing_dir = lab.DEFAULT_BACKING_DIR
    try:
        up = blockmig("lab", "up")
        assert up.returncode == 0, up.stderr
        assert "lab is up" in up.stdout
        assert os.path.getsize(lab.source_backing_file()) == lab.DEFAULT_SIZE
        status = blockmig("lab", "status", "--json")
        assert status.returncode == 0, status.stderr
        parsed = json.loads(status.stdout)
        assert parsed["up"] and parsed["maps"][0]["wwid"] == lab.SOURCE_WWID
        # a second `up` is refused with one line and changes nothing
        again = blockmig("lab", "up", "--size", "16M")
        assert again.returncode == 1
        assert again.stderr.count("\n") == 1 and "already up" in again.stderr
        assert json.loads(blockmig("lab", "status", "--json").stdout) == parsed
    finally:
        down = blockmig("lab", "down")
    assert down.returncode == 0, down.stderr
    assert f"removed array {lab.SOURCE_IQN}" in down.stdout
    assert_nothing_of_the_lab_left(backing_dir)
    text = blockmig("lab", "status")
    assert text.returncode == 0 and "lab is not (fully) up" in text.stdout
