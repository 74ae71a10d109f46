"""Bad input: one clear ArrayError/HostError, and nothing half made."""

import glob
import os
import socket

import pytest

from blockmig import lab
from blockmig.array import lio
from blockmig.errors import ArrayError, HostError
from blockmig.host import iscsi

CONFIGFS = "/sys/kernel/config/target"
MIB = 1024 * 1024


def storage_object_names():
    return {os.path.basename(p) for p in glob.glob(f"{CONFIGFS}/core/*_*/*") if os.path.isdir(p)}


def test_unknown_wwid_is_one_array_error(lab_env):
    with pytest.raises(ArrayError, match="no volume .* WWID 36001405f{25}"):
        lio.find_volume_by_wwid("naa.6001405" + "F" * 25)


def test_volume_on_a_missing_target_leaves_nothing(lab_env, backing_dir):
    backing = os.path.join(backing_dir, "orphan.img")
    with pytest.raises(ArrayError, match="no iSCSI target iqn.2026-11.lab.blockmig:nowhere"):
        lio.create_volume("iqn.2026-11.lab.blockmig:nowhere", "orphan", 16 * MIB, backing)
    assert "orphan" not in storage_object_names()
    assert not os.path.exists(backing)


def test_volume_without_room_leaves_nothing(lab_env, backing_dir):
    st = os.statvfs(backing_dir)
    too_big = (st.f_bavail * st.f_frsize // MIB + 1) * MIB
    backing = os.path.join(backing_dir, "huge.img")
    with pytest.raises(ArrayError, match="not enough room"):
        lio.create_volume(lab.DESTINATION_IQN, "huge", too_big, backing)
    assert "huge" not in storage_object_names() and not os.path.exists(backing)
    assert os.listdir(f"{CONFIGFS}/iscsi/{lab.DESTINATION_IQN}/tpgt_1/lun") == []


def test_duplicate_names_and_luns_are_refused_without_damage(lab_env, backing_dir):
    with pytest.raises(ArrayError, match="already exists"):
        lio.create_array(lab.SOURCE_IQN, "127.0.0.1")
    with pytest.raises(ArrayError, match="already exists"):
        lio.create_volume(lab.DESTINATION_IQN, lab.SOURCE_VOLUME, 16 * MIB, os.path.join(backing_dir, "x.img"))
    with pytest.raises(ArrayError, match="already has a LUN 0"):
        lio.create_volume(lab.SOURCE_IQN, "second", 16 * MIB, os.path.join(backing_dir, "second.img"), lun=0)
    source = lio.find_volume(lab.SOURCE_VOLUME)
    with pytest.raises(ArrayError, match="already exported"):
        lio.export_volume(source, "iqn.2026-11.lab.blockmig:host")
    with pytest.raises(ArrayError, match="not exported to"):
        lio.set_mapping_write_protect(source, "iqn.2026-11.lab.blockmig:stranger", True)
    assert sorted(os.listdir(backing_dir)) == ["lab-source.img"]
    assert storage_object_names() == {lab.SOURCE_VOLUME}
    assert lio.list_mappings(source) == [lio.Mapping("iqn.2026-11.lab.blockmig:host", 0, False)]
    assert lab.lab_status()["up"]


def test_array_whose_portal_cannot_listen_is_not_half_made():
    iqn = "iqn.2026-11.lab.blockmig:busy"
    with socket.socket() as squatter:  # another program already listens on the portal's address
        squatter.bind(("127.0.0.3", 3262))
        squatter.listen()
        with pytest.raises(ArrayError, match=f"cannot create array {iqn}"):
            lio.create_array(iqn, "127.0.0.3", 3262)
    assert not os.path.exists(f"{CONFIGFS}/iscsi/{iqn}")
    with pytest.raises(ArrayError, match="not an IP address"):
        lio.create_array(iqn, "no-such-host")
    assert not os.path.exists(f"{CONFIGFS}/iscsi/{iqn}")


def test_login_to_a_missing_target_is_one_host_error(lab_env):
    missing = "iqn.2026-11.lab.blockmig:nowhere"
    with pytest.raises(HostError, match=f"portal 127.0.0.1:3260 offers no target {missing}"):
        iscsi.login(missing, *lab.SOURCE_PORTAL)
    assert iscsi.find_session(missing, *lab.SOURCE_PORTAL) is None
    assert iscsi.run_iscsiadm(["-m", "node", "-T", missing], ok=(0, 21)).returncode == 21
    with pytest.raises(HostError, match="exit 21"):
        iscsi.logout(lab.DESTINATION_IQN, *lab.DESTINATION_PORTAL)  # the host has no session there


def test_removing_a_missing_array_is_one_array_error():
    with pytest.raises(ArrayError, match="no iSCSI target"):
        lio.remove_array("iqn.2026-11.lab.blockmig:nowhere")
