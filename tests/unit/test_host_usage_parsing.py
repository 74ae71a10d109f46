"""volume_users' parsing on a made-up sysfs and mountinfo (the real thing is tests/lab/test_host_usage.py)."""

import os

from blockmig.host.usage import Mount, Opener, VolumeUsers, device_tree, parse_mountinfo

MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - tmpfs tmpfs rw
36 22 254:0 / /mnt/data rw,relatime shared:9 - ext4 /dev/mapper/mpatha rw
37 22 254:1 / /mnt/with\\040space ro,relatime - xfs /dev/mapper/mpatha-part1 ro,attr2
38 22 8:0 / /srv/other rw,relatime - ext4 /dev/sda rw
"""


def make_block(root, name, dev, holders=(), partitions=()):
    base = root / "class" / "block" / name
    (base / "holders").mkdir(parents=True, exist_ok=True)
    (base / "dev").write_text(f"{dev}\n")
    for holder in holders:
        (base / "holders" / holder).mkdir()
    for partition in partitions:
        (base / partition).mkdir()
        (base / partition / "partition").write_text("1\n")


def test_device_tree_follows_holders_and_partitions_once(tmp_path):
    make_block(tmp_path, "dm-0", "254:0", holders=["dm-1", "dm-2"])
    make_block(tmp_path, "dm-1", "254:1", holders=["dm-3"])
    make_block(tmp_path, "dm-2", "254:2", holders=["dm-3"])
    make_block(tmp_path, "dm-3", "254:3")
    assert device_tree("dm-0", str(tmp_path)) == ["dm-0", "dm-1", "dm-2", "dm-3"]
    make_block(tmp_path, "sdb", "8:16", partitions=["sdb1"])
    make_block(tmp_path, "sdb1", "8:17", holders=["dm-5"])
    make_block(tmp_path, "dm-5", "254:5")
    assert device_tree("sdb", str(tmp_path)) == ["sdb", "sdb1", "dm-5"]


def test_mountinfo_by_device_number_with_escapes_and_modes():
    mounts = parse_mountinfo(MOUNTINFO, {(254, 0): "dm-0", (254, 1): "dm-1"})
    assert mounts == [
        Mount("dm-0", "/mnt/data", "ext4", True),
        Mount("dm-1", "/mnt/with space", "xfs", False),
    ]


def test_describe_says_who_uses_it_in_one_line():
    users = VolumeUsers(
        "dm-0", ("dm-0", "dm-1", "dm-2"),
        (Mount("dm-0", "/mnt/data", "ext4", True), Mount("dm-1", "/mnt/p", "xfs", False)),
        (Opener(123, "appender", "dm-0", True), Opener(7, "reader", "dm-2", False)),
    )
    assert users.mounted_rw and users.writers == (Opener(123, "appender", "dm-0", True),)
    assert users.rw_mountpoints == ("/mnt/data",)
    assert users.describe() == (
        "ext4 on /mnt/data mounted read-write; xfs on /mnt/p mounted read-only (via dm-1); "
        "pid 123 (appender) has it open for writing; pid 7 (reader) has it open for reading (via dm-2); "
        "dm-2 stacked on it"
    )
    clean = VolumeUsers("dm-0", ("dm-0",), (), ())
    assert not clean.in_use and not clean.mounted_rw and clean.describe() == "dm-0 is not in use"


def test_volume_users_of_a_real_loop_device(loops):
    """Openers are found by device number in /proc/PID/fd, their mode in fdinfo (a loop device is what this machine has)."""
    from blockmig.host.usage import volume_users

    device = loops.attach("used", 1024 * 1024)
    assert not volume_users(device).in_use
    writer = os.open(device, os.O_WRONLY)
    reader = os.open(device, os.O_RDONLY)
    try:
        users = volume_users(device)
        name = os.path.basename(device)
        mine = [o for o in users.openers if o.pid == os.getpid()]
        assert sorted(o.writing for o in mine) == [False, True] and {o.device for o in mine} == {name}
        assert users.writers and all(w.pid == os.getpid() for w in users.writers)
        assert f"pid {os.getpid()} (" in users.describe() and "has it open for writing" in users.describe()
    finally:
        os.close(writer)
        os.close(reader)
    assert not volume_users(device).openers
