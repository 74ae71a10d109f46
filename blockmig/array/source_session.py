"""The destination array's own iSCSI session to the source array: how blockmig's handler reaches the source
during a pass-through move (as NetApp FLI's destination reaches its source LUN), never by the source's file.

The array logs in as an initiator of its own (its iface; the source LUN mapped to that name on the source
array) and reads and writes the source through the disk that session brings. Where the array host is also
a multipath host (the lab: one kernel for both), that disk carries the source's WWID and multipathd would
make it a path of the host's map, a way to the source around the handler. So before the LUN is scanned,
a udev rule tags every disk of this session (`BLOCKMIG_ARRAY_PATH`), and a multipath drop-in blacklists
that property: the disk is never a host path.
"""

from __future__ import annotations

import contextlib
import os
import re

from blockmig.array import lio
from blockmig.errors import ArrayError, HostError, MigrationError
from blockmig.host import iscsi, multipath, runner, udev
from blockmig.safefile import write_atomically

ARRAY_IQN_PREFIX = "iqn.2026-12.io.blockmig:array"
UDEV_RULES_DIR = "/etc/udev/rules.d"
MULTIPATH_CONF_DIR = "/etc/multipath/conf.d"
PROPERTY = "BLOCKMIG_ARRAY_PATH"
BLACKLIST = f'# blockmig: disks of an array\'s own session to a source are never host paths\n' \
            f'blacklist {{\n    property "^{PROPERTY}$"\n}}\n'


def new_record(migration_id: str) -> dict:
    """The journal's `array_session` record at plan time: who the array is to the source array."""
    slug = re.sub(r"[^a-z0-9.-]", "-", migration_id.lower())
    return {"iface": f"blockmig-array-{migration_id}", "initiator": f"{ARRAY_IQN_PREFIX}-{slug}"}


class SourceSession:
    """One migration's array session; every method can run again after a crash."""

    def __init__(self, journal):
        self.journal = journal
        self.source = journal.data["source"]
        self.iface = journal.data["array_session"]["iface"]
        self.initiator = journal.data["array_session"]["initiator"]
        self.rule_path = os.path.join(UDEV_RULES_DIR, f"40-blockmig-array-{journal.id}.rules")
        self.blacklist_path = os.path.join(MULTIPATH_CONF_DIR, f"blockmig-array-{journal.id}.conf")

    def disk(self) -> str:
        """The source's disk on the array's session (logged in, tagged, scanned, WWID-checked as needed)."""
        known = self._known_disk()
        if known is not None:  # no udev wait: after a handler's kill -9, udev may hang on its host disk
            return known
        source_volume = lio.find_volume(self.source["volume"])
        self.journal.record("reach_source", acl=True)  # intent: undo removes the ACL and mapping
        lio.ensure_node_acl(self.source["target"], self.initiator)
        iscsi.create_iface(self.iface, self.initiator)
        session = iscsi.find_portal_session(self.source["target"], self.source["portal"], self.iface)
        if session is None:
            session = iscsi.login_portal(self.source["target"], self.source["portal"], self.iface)
        self._tag(session)
        mapping = lio.find_mapping(source_volume, self.initiator)
        if mapping is None:
            mapping = lio.export_volume(source_volume, self.initiator)
        if mapping.mapped_lun not in iscsi.session_disks(session):
            iscsi.scan_session_lun(session, mapping.mapped_lun)
        disk = iscsi.find_session_disk(session, mapping.mapped_lun, self.source["wwid"])
        udev.settle()
        in_a_map = [p.map_name for p in multipath.paths() if p.dev == disk and p.map_name]
        if in_a_map:
            raise MigrationError(f"the array's disk {disk} of the source joined map {in_a_map[0]}: "
                                 f"multipathd ignores the {PROPERTY} blacklist ({self.blacklist_path})")
        self.journal.record("reach_source", array_disk=disk, array_lun=mapping.mapped_lun)
        return disk

    def _known_disk(self) -> str | None:
        """The disk this session brought before, if it is still there with the source's WWID."""
        facts = self.journal.facts("reach_source")
        if not facts.get("array_disk"):
            return None
        session = iscsi.find_portal_session(self.source["target"], self.source["portal"], self.iface)
        if session is None or iscsi.session_disks(session).get(facts.get("array_lun")) != facts["array_disk"]:
            return None
        iscsi.check_disk_wwid(facts["array_disk"], self.source["wwid"], "the array's disk of the source")
        return facts["array_disk"]

    def _tag(self, session: iscsi.Session) -> None:
        """This session's disks get the property multipathd is told to ignore (before any is scanned)."""
        rule = (f"# blockmig migration {self.journal.id}: the array's session to the source\n"
                f'ACTION!="remove", SUBSYSTEM=="block", KERNELS=="session{session.sid}", '
                f'ENV{{{PROPERTY}}}="1"\n')
        if _read(self.rule_path) != rule:
            os.makedirs(UDEV_RULES_DIR, exist_ok=True)
            write_atomically(self.rule_path, rule.encode(), mode=0o644, private_dir=False)
            runner.run(["udevadm", "control", "--reload"], "udevadm control --reload failed")
        if _read(self.blacklist_path) != BLACKLIST:
            os.makedirs(MULTIPATH_CONF_DIR, exist_ok=True)
            write_atomically(self.blacklist_path, BLACKLIST.encode(), mode=0o644, private_dir=False)
            multipath.reconfigure()

    def close(self) -> list[str]:
        """Logged out, the mapping and ACL gone from the source array, the iface, rule and blacklist
        removed; what was removed."""
        removed = []
        session = None
        with contextlib.suppress(HostError):
            session = iscsi.find_portal_session(self.source["target"], self.source["portal"], self.iface)
        if session is not None:
            iscsi.logout_safely(session)
            removed.append(f"the array's session {session.sid} to the source")
        with contextlib.suppress(HostError):
            if self.iface in iscsi.list_ifaces():
                iscsi.remove_iface(self.iface)
        with contextlib.suppress(ArrayError):
            volume = lio.find_volume(self.source["volume"])
            if lio.find_mapping(volume, self.initiator) is not None:
                lio.unexport_volume(volume, self.initiator)
                removed.append(f"the source's mapping to {self.initiator}")
        with contextlib.suppress(ArrayError):
            lio.remove_node_acl_if_empty(self.source["target"], self.initiator)
        for path in (self.rule_path, self.blacklist_path):
            if os.path.exists(path):
                os.unlink(path)  # no reconfigure: the disk is gone, and a reconfigure reloads every map
        return removed


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None

