"""The host's iSCSI initiator: open-iscsi driven through `iscsiadm`.

Sessions and their disks are read from sysfs (the kernel's own view) rather
than from iscsiadm's human-oriented listings. Each login is bound to an
open-iscsi iface; an iface with its own `iface.initiatorname` lets the
migrator log in under a name the arrays' ACLs tell apart from the host's.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from blockmig.errors import HostError, UsageError
from blockmig.host.runner import run_command
from blockmig.host.udev import DEFAULT_TIMEOUT, disk_wwid, wait_for_path, wait_until
from blockmig.sysfs import read_attribute

DEFAULT_IFACE = "default"
INITIATOR_NAME_FILE = "/etc/iscsi/initiatorname.iscsi"
ISCSIADM_TIMEOUT = 300.0  # a login retries for minutes before it gives up; inside a phase, its deadline bounds it

# open-iscsi's include/iscsi_err.h, for the exit codes blockmig reacts to or reports.
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_NO_OBJS_FOUND = 21
_EXIT_MEANINGS = {
    1: "generic error",
    2: "session not found",
    4: "transport error",
    5: "login failed",
    6: "iSCSI database error",
    7: "invalid argument",
    8: "connection timed out",
    12: "iSCSI transport module not loaded",
    13: "permission denied (run as root)",
    15: "already logged in",
    18: "cannot talk to iscsid",
    19: "fatal login error (target refused or does not exist)",
    20: "iscsid is not running",
    21: "no matching records, targets or sessions",
    24: "login refused: authorization failure (no ACL for this initiator name)",
    28: "device or resource busy",
}


@dataclass(frozen=True)
class DiskIdentity:
    wwid: str
    logical_block_size: int
    size: int  # bytes


@dataclass(frozen=True)
class Session:
    sid: int
    target_iqn: str
    portal_ip: str
    port: int
    iface: str
    initiator_iqn: str
    state: str


def run_iscsiadm(args: list[str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run iscsiadm; an exit code outside `ok` becomes one HostError line with iscsiadm's own message."""
    result = run_command(["iscsiadm", *args], "iscsiadm failed", ISCSIADM_TIMEOUT, missing="open-iscsi")
    if result.returncode not in ok:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        message = lines[-1] if lines else "no message"
        meaning = _EXIT_MEANINGS.get(result.returncode, "see iscsiadm(8)")
        raise HostError(f"iscsiadm {' '.join(args)}: exit {result.returncode} ({meaning}): {message}")
    return result


def read_initiator_name(path: str = INITIATOR_NAME_FILE) -> str:
    """The host's own initiator name (what its default iface logs in as)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "InitiatorName" and value:
                    return value
    except OSError as exc:
        raise HostError(f"cannot read the host's initiator name from {path}: {exc.strerror}") from exc
    raise HostError(f"{path} has no InitiatorName= line")


DEFAULT_PORT = 3260


def parse_portal(portal: str, among: Iterable[tuple[str, int]] = ()) -> tuple[str, int]:
    """'IP', 'IP:PORT', '[IPv6]', '[IPv6]:PORT', 'HOST[:PORT]' -> (address, port), the address as LIO and
    iscsiadm know it (IPv6 without brackets, compressed).

    A bare IPv6 address takes the default port (its last group could be read as a port: bracket it to
    give one). A host name is resolved (getaddrinfo): to the first of its addresses in `among` (the
    array's portals) when given, else to its first IPv4 address, else its first IPv6 one.
    """
    text = portal.strip()
    if not text or any(c.isspace() for c in text):
        raise UsageError(f"portal {portal!r} is not IP[:PORT], [IPv6][:PORT] or HOST[:PORT]")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"portal {portal!r}: an IPv6 portal is [ADDRESS] or [ADDRESS]:PORT")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
        if _ip_version(host) != 6:
            raise UsageError(f"portal {portal!r}: {host!r} in brackets is not an IPv6 address")
    elif _ip_version(text) == 6:
        host, port_text = text, str(DEFAULT_PORT)
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else str(DEFAULT_PORT)
    if not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise UsageError(f"portal {portal!r}: port {port_text!r} is not a number from 1 to 65535")
    port = int(port_text)
    if _ip_version(host):
        return str(ipaddress.ip_address(host)), port
    return _resolve(host, port, portal, list(among)), port


def _ip_version(text: str) -> int:
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0


def _resolve(host: str, port: int, portal: str, among: list[tuple[str, int]]) -> str:
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise UsageError(f"portal {portal!r}: cannot resolve {host!r}: {reason}") from None
    addresses = [str(ipaddress.ip_address(answer[4][0].split("%")[0])) for answer in answers]
    offered_here = {(normal_address(address), offered_port) for address, offered_port in among}
    known = [address for address in addresses if (address, port) in offered_here]
    if among and not known:
        offered = ", ".join(format_portal(a, p) for a, p in among)
        raise UsageError(f"portal {portal!r}: {host} resolves to {', '.join(addresses)}, none of them a portal "
                         f"of the target ({offered})")
    by_family = sorted(known or addresses, key=lambda address: _ip_version(address))  # stable: IPv4 first
    return by_family[0]


def normal_address(address: str) -> str:
    """An IP address in one spelling (IPv6 compressed, no brackets), so two spellings compare equal."""
    bare = address.strip("[]")
    return str(ipaddress.ip_address(bare)) if _ip_version(bare) else address


def format_portal(portal_ip: str, port: int) -> str:
    """ADDRESS:PORT as iscsiadm's -p takes it and as blockmig journals it ([IPv6]:PORT)."""
    address = normal_address(portal_ip)
    return f"[{address}]:{port}" if _ip_version(address) == 6 else f"{address}:{port}"


def _node_args(target_iqn: str, portal_ip: str, port: int, iface: str | None) -> list[str]:
    return ["-m", "node", "-T", target_iqn, "-p", format_portal(portal_ip, port), "-I", iface or DEFAULT_IFACE]


# ---------------------------------------------------------------------------
# ifaces


def list_ifaces() -> list[str]:
    """Names of the open-iscsi ifaces (`iscsiadm -m iface` prints `name transport,hw,ip,net,initiator`)."""
    result = run_iscsiadm(["-m", "iface"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def create_iface(name: str, initiator_iqn: str) -> None:
    """An iface that logs in over TCP as `initiator_iqn` instead of the host's own name."""
    if name == DEFAULT_IFACE:
        raise HostError("the 'default' iface is the host's own; choose another name")
    created = name not in list_ifaces()
    if created:
        run_iscsiadm(["-m", "iface", "-I", name, "-o", "new"])
    try:
        for key, value in (("iface.transport_name", "tcp"), ("iface.initiatorname", initiator_iqn)):
            run_iscsiadm(["-m", "iface", "-I", name, "-o", "update", "-n", key, "-v", value])
    except HostError:
        if created:
            run_iscsiadm(["-m", "iface", "-I", name, "-o", "delete"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
        raise


def remove_iface(name: str) -> None:
    """Delete the iface and its node records (its sessions must be logged out first)."""
    if any(s.iface == name for s in sessions()):
        raise HostError(f"iface {name} still has iSCSI sessions; log them out first")
    run_iscsiadm(["-m", "node", "-I", name, "-o", "delete"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
    run_iscsiadm(["-m", "iface", "-I", name, "-o", "delete"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))


# ---------------------------------------------------------------------------
# discovery, login, logout


def discover(portal_ip: str, port: int = 3260, iface: str | None = None) -> list[str]:
    """Target names the portal offers (SendTargets), without writing node records."""
    args = ["-m", "discovery", "-t", "sendtargets", "-p", format_portal(portal_ip, port), "-o", "nonpersistent"]
    if iface:
        args += ["-I", iface]
    result = run_iscsiadm(args, ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
    # Each line: "IP:PORT,TPGT TARGET_IQN".
    return [line.split()[1] for line in result.stdout.splitlines() if len(line.split()) == 2]


def login(target_iqn: str, portal_ip: str, port: int = 3260, iface: str | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> Session:
    """Log in (idempotent) and return the session; a node record this call made goes again on failure."""
    existing = find_session(target_iqn, portal_ip, port, iface)
    if existing:
        return existing
    # A target the portal does not offer would cost minutes of login retries; ask first.
    if target_iqn not in discover(portal_ip, port, iface):
        raise HostError(f"portal {format_portal(portal_ip, port)} offers no target {target_iqn}")
    node = _node_args(target_iqn, portal_ip, port, iface)
    created = run_iscsiadm(node, ok=(0, ISCSI_ERR_NO_OBJS_FOUND)).returncode == ISCSI_ERR_NO_OBJS_FOUND
    if created:
        run_iscsiadm([*node, "-o", "new"])
    try:
        run_iscsiadm([*node, "--login"], ok=(0, ISCSI_ERR_SESS_EXISTS))
    except HostError:
        if created:
            run_iscsiadm([*node, "-o", "delete"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
        raise
    return wait_until(
        lambda: find_session(target_iqn, portal_ip, port, iface),
        f"the session to {target_iqn} at {format_portal(portal_ip, port)} to show in sysfs",
        timeout,
    )


def logout(target_iqn: str, portal_ip: str, port: int = 3260, iface: str | None = None,
           missing_ok: bool = False) -> None:
    """Log out and delete the node record. Delete the session's disks first (see logout_safely)."""
    node = _node_args(target_iqn, portal_ip, port, iface)
    ok = (0, ISCSI_ERR_NO_OBJS_FOUND) if missing_ok else (0,)
    run_iscsiadm([*node, "--logout"], ok=ok)
    run_iscsiadm([*node, "-o", "delete"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))


def logout_safely(session: Session, timeout: float = DEFAULT_TIMEOUT) -> None:
    """os-brick's order: flush and delete each SCSI disk, wait until they are gone, then log out.

    Logging out while the disks still exist can leave a kernel worker
    spinning (open-iscsi issue 90). Flush any multipath map on these disks
    before calling this.
    """
    delete_disks(list(session_disks(session).values()), timeout)
    logout(session.target_iqn, session.portal_ip, session.port, session.iface, missing_ok=True)


def rescan_session(session: Session) -> None:
    """Ask the target for LUNs mapped since login (REPORT LUNS) and add their disks.

    This scans EVERY LUN of the session: it brings back disks deleted on
    purpose (a source path taken out of a map). Prefer scan_session_lun.
    """
    run_iscsiadm(["-m", "session", "-r", str(session.sid), "--rescan"])


def session_scsi_address(session: Session) -> tuple[int, int, int]:
    """(host_no, channel, target_id) of the session in the SCSI midlayer, from sysfs."""
    device = os.path.realpath(f"/sys/class/iscsi_session/session{session.sid}/device")
    host = os.path.basename(os.path.dirname(device))
    target_id = read_attribute(f"/sys/class/iscsi_session/session{session.sid}/target_id")
    if not host.startswith("host") or not target_id.isdigit():
        raise HostError(f"session {session.sid} to {session.target_iqn} has no SCSI host in sysfs (logged out?)")
    return int(host[len("host"):]), 0, int(target_id)  # iSCSI puts every session on channel 0


def scan_session_lun(session: Session, lun: int) -> None:
    """Scan ONE host-mapped LUN of ONE session (hostH/scan "CHANNEL TARGET LUN").

    A session reused for a second volume does not see a LUN mapped after
    its login until scanned; unlike `iscsiadm --rescan` this does not bring
    back other LUNs' disks deleted on purpose. Scanning a LUN already
    present is harmless.
    """
    host_no, channel, target_id = session_scsi_address(session)
    try:
        with open(f"/sys/class/scsi_host/host{host_no}/scan", "w") as scan:
            scan.write(f"{channel} {target_id} {lun}")
    except OSError as exc:
        raise HostError(f"cannot scan LUN {lun} of session {session.sid} (host{host_no}): {exc.strerror}") from exc


# ---------------------------------------------------------------------------
# sessions and disks, from sysfs


def sessions() -> list[Session]:
    found = []
    for session_dir in sorted(glob.glob("/sys/class/iscsi_session/session*")):
        sid = int(os.path.basename(session_dir)[len("session"):])
        connection = glob.glob(f"/sys/class/iscsi_connection/connection{sid}:*")
        address = read_attribute(f"{connection[0]}/persistent_address") if connection else ""
        port = read_attribute(f"{connection[0]}/persistent_port") if connection else ""
        found.append(Session(
            sid=sid,
            target_iqn=read_attribute(f"{session_dir}/targetname"),
            portal_ip=address,
            port=int(port) if port.isdigit() else 0,
            iface=read_attribute(f"{session_dir}/ifacename") or DEFAULT_IFACE,
            initiator_iqn=read_attribute(f"{session_dir}/initiatorname"),
            state=read_attribute(f"{session_dir}/state"),
        ))
    return found


def find_portal_session(target_iqn: str, portal: str, iface: str | None = None) -> Session | None:
    """The session to `target_iqn` at 'IP:PORT' through `iface`, None if there is none."""
    ip, port = parse_portal(portal)
    return find_session(target_iqn, ip, port, iface)


def login_portal(target_iqn: str, portal: str, iface: str | None = None) -> Session:
    """login() to 'IP:PORT'."""
    ip, port = parse_portal(portal)
    return login(target_iqn, ip, port, iface=iface)


def find_session(target_iqn: str, portal_ip: str, port: int = 3260, iface: str | None = None) -> Session | None:
    for session in sessions():
        if (session.target_iqn, normal_address(session.portal_ip), session.port, session.iface) == (
            target_iqn, normal_address(portal_ip), port, iface or DEFAULT_IFACE
        ):
            return session
    return None


def session_disks(session: Session) -> dict[int, str]:
    """LUN number -> SCSI disk name (sdX) for the disks this session has now."""
    disks = {}
    pattern = f"/sys/class/iscsi_session/session{session.sid}/device/target*/*:*:*:*/block/*"
    for block in glob.glob(pattern):
        hctl = os.path.basename(os.path.dirname(os.path.dirname(block)))
        disks[int(hctl.rsplit(":", 1)[1])] = os.path.basename(block)
    return disks


def wait_for_session_disk(session: Session, lun: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Wait for the session's disk for `lun` (the host's mapped LUN number) and its /dev node; return 'sdX'."""
    name = wait_until(
        lambda: session_disks(session).get(lun),
        f"LUN {lun} of {session.target_iqn} (session {session.sid}) to appear",
        timeout,
    )
    wait_for_path(f"/dev/{name}", timeout)
    return name


def find_session_disk(session: Session, lun: int, wwid: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The session's disk for host-mapped `lun`, checked to carry `wwid` before anyone touches it.

    Scans that one LUN first (a reused session has not seen a LUN mapped
    after its login). A disk with another WWID (a LUN number reused, the
    array's TPG LUN taken for the host's) raises HostError naming both.
    """
    if lun not in session_disks(session):
        scan_session_lun(session, lun)

    def present() -> str | None:
        name = session_disks(session).get(lun)
        if name is None or not os.path.exists(f"/dev/{name}") or not os.path.exists(f"/sys/block/{name}/device/wwid"):
            return None  # not there yet, or removed meanwhile (a disk name being reused)
        return name

    name = wait_until(present, f"LUN {lun} of {session.target_iqn} (session {session.sid}) to appear", timeout)
    check_disk_wwid(name, wwid, f"LUN {lun} of session {session.sid} to {session.target_iqn}")
    return name


def check_disk_wwid(name: str, wwid: str, what: str = "") -> None:
    """HostError unless disk `name` has WWID `wwid` (udev's view, or the kernel's VPD page before udev)."""
    found = disk_wwid(name)
    if found != wwid:
        where = f" ({what})" if what else ""
        raise HostError(f"disk {name}{where} has WWID {found}, not the expected {wwid}; left untouched")


def disk_identity(name: str) -> DiskIdentity:
    """WWID, logical block size and size of a SCSI disk: what must match before it replaces another."""
    queue = f"/sys/block/{name}/queue"
    block_size = read_attribute(f"{queue}/logical_block_size")
    sectors = read_attribute(f"/sys/block/{name}/size")  # always in 512-byte units
    if not block_size.isdigit() or not sectors.isdigit():
        raise HostError(f"disk {name} has no size in sysfs (gone?)")
    return DiskIdentity(disk_wwid(name), int(block_size), int(sectors) * 512)


def session_of_disk(name: str) -> Session | None:
    """The iSCSI session a SCSI disk belongs to (None for a disk of no session)."""
    return next((s for s in sessions() if name in session_disks(s).values()), None)


def logout_if_unused(session: Session, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Log out and delete the node record only if the session has no SCSI disk left; say whether it did.

    A session to an array often carries other volumes of the host; those
    keep their session. Delete this volume's disk first (delete_disk_checked).
    """
    if session_disks(session):
        return False
    if find_session(session.target_iqn, session.portal_ip, session.port, session.iface) is None:
        return False
    logout(session.target_iqn, session.portal_ip, session.port, session.iface, missing_ok=True)
    wait_until(lambda: not os.path.exists(f"/sys/class/iscsi_session/session{session.sid}"),
               f"session {session.sid} to go away", timeout)
    return True


def delete_disk_checked(name: str, wwid: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Delete a SCSI disk only if it carries `wwid` (a gone disk is fine: deleting is idempotent)."""
    if not os.path.exists(f"/sys/block/{name}"):
        return
    check_disk_wwid(name, wwid)
    delete_disks([name], timeout)


def by_path_link(portal_ip: str, port: int, target_iqn: str, lun: int) -> str:
    """udev's persistent name for an iSCSI disk.

    It has no iface in it: two sessions to the same target and portal under
    different ifaces (host and migrator) compete for the same link, so code
    that must tell them apart uses session_disks() instead.
    """
    return f"/dev/disk/by-path/ip-{portal_ip}:{port}-iscsi-{target_iqn}-lun-{lun}"


def delete_disks(names: list[str], timeout: float = DEFAULT_TIMEOUT) -> None:
    """Flush each disk's buffers, delete it from the SCSI layer, wait until its node is gone."""
    for name in names:
        result = run_command(["blockdev", "--flushbufs", f"/dev/{name}"], f"cannot flush disk {name}")
        # ENXIO: the disk is already gone from the SCSI layer (its node can outlive it): nothing to flush
        gone = "No such device or address" in result.stderr
        if result.returncode != 0 and os.path.exists(f"/dev/{name}") and not gone:
            raise HostError(f"blockdev --flushbufs /dev/{name} failed: {result.stderr.strip()}")
        try:
            with open(f"/sys/block/{name}/device/delete", "w") as f:
                f.write("1")
        except FileNotFoundError:
            continue  # already gone
        except OSError as exc:
            raise HostError(f"cannot delete SCSI disk {name}: {exc.strerror}") from exc
    for name in names:
        wait_until(lambda name=name: not os.path.exists(f"/sys/block/{name}"), f"disk {name} to go away", timeout)
