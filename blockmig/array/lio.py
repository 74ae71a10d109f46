"""The storage side: LIO targets driven in-process through rtslib-fb.

An *array* is one iSCSI target with one TPG (tag 1) and explicit network
portals; a *volume* is a storage object (fileio on a file, block on a block
device) exported as one LUN of that TPG. The host reaches a volume only
through a NodeACL + MappedLUN for its initiator name (no demo mode), which is
also how the migrator gets exclusive access to a destination.

Every call that creates something is all-or-nothing: what it made is removed
again before the ArrayError leaves. rtslib_fb is imported lazily so blockmig
imports on machines without it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import mmap
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from blockmig.errors import ArrayError
from blockmig.faults import checkpoint
from blockmig.sysfs import read_attribute

TPG_TAG = 1
LIO_WWID_PREFIX = "36001405"  # "3" (NAA designator) + NAA 6 + LIO's OUI 001405
LIO_WWID_HEX_DIGITS = 25  # the kernel takes this many hex digits of the unit serial
MAX_SERIAL_LENGTH = 252  # the kernel wants serial + "\n" shorter than INQUIRY_VPD_SERIAL_LEN (254)
MAX_MAPPED_LUN = 65535  # LIO's TRANSPORT_MAX_LUNS_PER_TPG - 1
BLOCK_SIZES = (512, 1024, 2048, 4096)  # what attrib/block_size accepts

# What a host (and the filesystem on it) can see of a storage object: READ
# CAPACITY, INQUIRY, the Block Limits / Logical Block Provisioning VPD pages
# and the caching / control mode pages. A destination must show the same, or
# the host's map changes geometry under a mounted filesystem. Applied in this
# order: block_size first (the kernel recomputes hw_max_sectors from it),
# emulate_model_alias before product_id (it rewrites the product string).
# Measured on Debian bookworm (6.1): all of these are writable before export;
# after export the kernel refuses block_size, optimal_sectors,
# unmap_zeroes_data, emulate_model_alias, emulate_tas, emulate_ua_intlck_ctrl,
# pi_prot_type and the wwn/ strings. iblock refuses emulate_write_cache: the
# host sees the device's own cache flag (reported as emulate_write_cache).
# 6.1 has no max_sectors attribute.
GEOMETRY_ATTRIBUTES = (
    "block_size",
    "emulate_model_alias",
    "emulate_tpu",
    "emulate_tpws",
    "emulate_write_cache",
    "is_nonrot",
    "optimal_sectors",
    "max_unmap_lba_count",
    "max_unmap_block_desc_count",
    "unmap_granularity",
    "unmap_granularity_alignment",
    "max_write_same_len",
    "unmap_zeroes_data",
    "emulate_caw",
    "emulate_3pc",
    "emulate_fua_write",
    "emulate_fua_read",
    "emulate_dpo",
    "emulate_tas",
    "emulate_ua_intlck_ctrl",
    "emulate_rest_reord",
    "pi_prot_type",
    "alua_support",
    "pgr_support",
    "hw_block_size",
    "hw_max_sectors",
    "vendor_id",
    "product_id",
    "revision",
    "company_id",
)
# Reported, never set: the kernel derives them from the backing store.
READ_ONLY_GEOMETRY = frozenset({"hw_block_size", "hw_max_sectors"})
# INQUIRY strings live under the object's wwn/ group, the rest under attrib/.
# company_id is the OUI in the NAA designator, hence part of the WWID.
WWN_GEOMETRY = frozenset({"vendor_id", "product_id", "revision", "company_id"})
_SERIAL_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


@dataclass(frozen=True)
class Array:
    target_iqn: str
    portals: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Volume:
    name: str
    size: int
    serial: str
    backing: str
    plugin: str  # "fileio" or "block"
    target_iqn: str | None  # None when the storage object is not exported as a LUN
    lun: int | None

    @property
    def wwid(self) -> str:
        return wwid_for_serial(self.serial)


@dataclass(frozen=True, order=True)
class Mapping:
    initiator_iqn: str
    mapped_lun: int
    write_protect: bool


def wwid_for_serial(serial: str) -> str:
    """The SCSI WWID a host sees for an LIO unit serial (what multipath groups paths by).

    LIO builds the NAA 6 designator from the serial's first 25 hex digits,
    skipping every other character and zero-filling a short serial.
    """
    digits = "".join(c for c in serial.lower() if c in "0123456789abcdef")[:LIO_WWID_HEX_DIGITS]
    return LIO_WWID_PREFIX + digits.ljust(LIO_WWID_HEX_DIGITS, "0")


def normalize_wwid(wwid: str) -> str:
    """Accept the forms tools print (36001405…, naa.6001405…, 0x6001405…) and return 36001405…."""
    wwid = wwid.strip().lower()
    for prefix in ("naa.", "0x"):
        if wwid.startswith(prefix):
            return "3" + wwid[len(prefix):]
    return wwid


def check_serial(serial: str) -> None:
    if not serial or len(serial) > MAX_SERIAL_LENGTH or not _SERIAL_RE.match(serial):
        raise ArrayError(
            f"invalid unit serial {serial!r}: use 1-{MAX_SERIAL_LENGTH} printable characters without spaces"
        )


def check_free_space(directory: str, size: int) -> None:
    """Refuse a file-backed volume the backing filesystem cannot hold in full."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise ArrayError(f"cannot check free space in {directory}: {exc.strerror}") from exc
    if st.f_blocks == 0:
        return  # ramfs (e.g. an initramfs root) keeps no capacity count: nothing to check against
    available = st.f_bavail * st.f_frsize
    if size > available:
        raise ArrayError(
            f"not enough room in {directory} for a {size}-byte volume: only {available} bytes available"
        )


# ---------------------------------------------------------------------------
# rtslib access


def _rtslib():
    try:
        import rtslib_fb
    except ImportError as exc:
        raise ArrayError("rtslib-fb is not installed (Debian: python3-rtslib-fb); cannot manage LIO") from exc
    return rtslib_fb


@contextlib.contextmanager
def _lio(action: str):
    """Translate rtslib's and the kernel's errors into one ArrayError line."""
    rtslib = _rtslib()
    try:
        yield rtslib
    except ArrayError:
        raise
    except (rtslib.RTSLibError, OSError) as exc:
        raise ArrayError(f"{action}: {exc}") from exc


def _root(rtslib):
    root = rtslib.RTSRoot()
    # rtslib keeps a per-process cache of backstore indexes; another process
    # (the CLI, a second test) may have changed configfs since.
    root.invalidate_caches()
    return root


def _iscsi_fabric(rtslib):
    return rtslib.FabricModule("iscsi")


def _find_target(rtslib, target_iqn: str):
    for target in _iscsi_fabric(rtslib).targets:
        if target.wwn == target_iqn:
            return target
    raise ArrayError(f"no iSCSI target {target_iqn} on this array host")


def _tpg(rtslib, target_iqn: str):
    target = _find_target(rtslib, target_iqn)
    for tpg in target.tpgs:
        if tpg.tag == TPG_TAG:
            return tpg
    raise ArrayError(f"target {target_iqn} has no TPG {TPG_TAG}; it was not made by blockmig")


# A storage object of blockmig's own backstore (array/tcmu): a TCMU object whose config is blockmig/NAME.
SERVED_CONFIG_PREFIX = "blockmig/"


def _is_volume(so) -> bool:
    """A kernel fileio/block volume, or one blockmig's handler serves (not other TCMU handlers' objects)."""
    if so.plugin in ("fileio", "block"):
        return True
    return so.plugin == "user" and str(getattr(so, "config", "") or "").startswith(SERVED_CONFIG_PREFIX)


def _find_storage_object(rtslib, name: str):
    for so in _root(rtslib).storage_objects:
        if so.name == name and _is_volume(so):
            return so
    raise ArrayError(f"no volume (storage object) named {name}")


def _volume_from(so) -> Volume:
    luns = list(so.attached_luns)
    if len(luns) > 1:
        raise ArrayError(f"storage object {so.name} is exported as {len(luns)} LUNs; blockmig expects one")
    lun = luns[0] if luns else None
    return Volume(
        name=so.name,
        size=int(so.size),
        serial=so.wwn,
        backing=so.udev_path or "",  # a served volume's backing is its handler's (array/tcmu)
        plugin=so.plugin,
        target_iqn=lun.parent_tpg.parent_target.wwn if lun else None,
        lun=lun.lun if lun else None,
    )


def _tpg_lun(rtslib, volume: Volume):
    if volume.target_iqn is None or volume.lun is None:
        raise ArrayError(f"volume {volume.name} is not exported as a LUN of any target")
    tpg = _tpg(rtslib, volume.target_iqn)
    for lun in tpg.luns:
        if lun.lun == volume.lun:
            return lun
    raise ArrayError(f"target {volume.target_iqn} has no LUN {volume.lun}")


def _mappings_of(tpg_lun) -> list[Mapping]:
    return [Mapping(m.parent_nodeacl.node_wwn, m.mapped_lun, m.write_protect) for m in tpg_lun.mapped_luns]


# ---------------------------------------------------------------------------
# arrays


def create_array(target_iqn: str, portal_ip: str, port: int = 3260) -> Array:
    """An iSCSI target with one TPG and one explicit portal; ACL-only access, no CHAP."""
    try:
        address = ipaddress.ip_address(portal_ip.strip("[]"))
    except ValueError:
        raise ArrayError(f"portal address {portal_ip!r} is not an IP address") from None
    with _lio(f"cannot create array {target_iqn}") as rtslib:
        _root(rtslib)
        fabric = _iscsi_fabric(rtslib)
        if any(t.wwn == target_iqn for t in fabric.targets):
            raise ArrayError(f"target {target_iqn} already exists")
        with contextlib.ExitStack() as undo:
            target = rtslib.Target(fabric, target_iqn, mode="create")
            undo.callback(target.delete)
            tpg = rtslib.TPG(target, TPG_TAG, mode="create")
            # Only initiators with a NodeACL may log in; no demo mode, no CHAP.
            tpg.set_attribute("generate_node_acls", "0")
            tpg.set_attribute("authentication", "0")
            tpg.set_attribute("demo_mode_write_protect", "1")
            # rtslib (unlike targetcli) adds no 0.0.0.0 default portal: the
            # explicit one below is the only one, so several arrays share a host.
            rtslib.NetworkPortal(tpg, _np_address(address), port, mode="create")
            tpg.enable = True
            undo.pop_all()
        return Array(target_iqn=target.wwn, portals=((str(address), int(port)),))


def _np_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address part of LIO's configfs np/ADDRESS:PORT: the kernel takes an IPv6 one in brackets."""
    return f"[{address}]" if address.version == 6 else str(address)


def _portal_address(np_address: str) -> str:
    """An address as rtslib lists it (np/[::1]:3260 gives '[::1]') in the form the host side uses ('::1')."""
    bare = np_address.strip("[]")
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return np_address


def list_arrays() -> list[Array]:
    with _lio("cannot list arrays") as rtslib:
        _root(rtslib)
        arrays = []
        for target in _iscsi_fabric(rtslib).targets:
            portals = tuple(
                (_portal_address(np.ip_address), np.port) for tpg in target.tpgs for np in tpg.network_portals
            )
            arrays.append(Array(target_iqn=target.wwn, portals=portals))
        return arrays


def find_array(target_iqn: str) -> Array:
    for array in list_arrays():
        if array.target_iqn == target_iqn:
            return array
    raise ArrayError(f"no iSCSI target {target_iqn} on this array host")


def remove_array(target_iqn: str, remove_volumes: bool = True) -> list[Volume]:
    """Delete the target (ACLs, LUNs, portals) and, by default, the storage objects it exported.

    Backing files stay; the removed volumes are returned so a caller that
    owns their backing files can delete them.
    """
    with _lio(f"cannot remove array {target_iqn}") as rtslib:
        _root(rtslib)
        target = _find_target(rtslib, target_iqn)
        volumes = [_volume_from(lun.storage_object) for tpg in target.tpgs for lun in tpg.luns]
        target.delete()
        if remove_volumes:
            for volume in volumes:
                _find_storage_object(rtslib, volume.name).delete()
        return volumes


# ---------------------------------------------------------------------------
# volumes


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _block_device_size(path: str) -> int:
    with open(path, "rb") as dev:
        return dev.seek(0, os.SEEK_END)


def backing_device_limits(path: str) -> dict[str, str]:
    """What LIO's iblock takes from a block device it is given (geometry keys, configfs strings).

    iblock copies the device's logical block size, its max_hw_sectors (in
    512-byte units, rounded down to whole pages of blocks) and its write
    cache flag; the last two cap optimal_sectors and fix emulate_write_cache.
    """
    if not _is_block_device(path):
        raise ArrayError(f"{path} is not a block device")
    rdev = os.stat(path).st_rdev
    sysfs = os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    # a partition has no queue of its own: its disk's applies
    queue = next((q for q in (f"{sysfs}/queue", f"{os.path.dirname(sysfs)}/queue") if os.path.isdir(q)), "")
    values = {name: read_attribute(f"{queue}/{name}") for name in ("logical_block_size", "max_hw_sectors_kb")}
    if not queue or not all(v.isdigit() for v in values.values()):
        raise ArrayError(f"cannot read the queue limits of {path} from sysfs")
    block_size = int(values["logical_block_size"])
    alignment = max(1, mmap.PAGESIZE // block_size)
    return {
        "block_size": str(block_size),
        "hw_max_sectors": str(int(values["max_hw_sectors_kb"]) * 2 // alignment * alignment),
        "emulate_write_cache": "1" if read_attribute(f"{queue}/write_cache") == "write back" else "0",
    }


def _check_block_size(block_size: int, size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ArrayError(f"block size {block_size} is not one LIO offers ({', '.join(map(str, BLOCK_SIZES))})")
    if size % block_size:
        raise ArrayError(f"volume size {size} is not a multiple of its {block_size}-byte blocks")


def check_backing_device_geometry(path: str, geometry: dict) -> None:
    """Refuse a block device a volume of this geometry cannot live on; creates nothing.

    iblock accepts a block_size below the device's logical block size but
    then sends the device IO it cannot do, so that is refused here too; an
    optimal_sectors above the device's limit or another write cache setting
    the kernel would refuse in create_volume, after the planner's checks.
    """
    limits = backing_device_limits(path)
    block_size = int(geometry.get("block_size", limits["block_size"]))
    _check_block_size(block_size, _block_device_size(path))
    if int(limits["block_size"]) > block_size:
        raise ArrayError(
            f"block device {path} has {limits['block_size']}-byte logical blocks; "
            f"it cannot back a volume of {block_size}-byte blocks"
        )
    if int(geometry.get("optimal_sectors", 0)) > int(limits["hw_max_sectors"]):
        raise ArrayError(
            f"block device {path} takes at most {limits['hw_max_sectors']} sectors per command; "
            f"the volume needs optimal_sectors {geometry['optimal_sectors']}"
        )
    wanted_cache = str(geometry.get("emulate_write_cache", limits["emulate_write_cache"]))
    if wanted_cache != limits["emulate_write_cache"]:
        raise ArrayError(
            f"block device {path} has its write cache {'on' if limits['emulate_write_cache'] == '1' else 'off'}; "
            f"the volume needs emulate_write_cache {wanted_cache}"
        )


def _geometry_path(so, name: str) -> str:
    return f"{so.path}/{'wwn' if name in WWN_GEOMETRY else 'attrib'}/{name}"


def _read_geometry(so) -> dict[str, str]:
    geometry = {}
    for name in GEOMETRY_ATTRIBUTES:
        path = _geometry_path(so, name)
        if os.path.exists(path):
            geometry[name] = read_attribute(path)
    if so.plugin == "block":
        # iblock answers the host with the device's write cache flag; its
        # attrib/emulate_write_cache stays 0 whatever (measured on a loop device).
        geometry["emulate_write_cache"] = backing_device_limits(so.udev_path)["emulate_write_cache"]
    return geometry


def _apply_geometry(so, geometry: dict) -> None:
    """Write each settable value that differs from the object's own; call before export."""
    unknown = sorted(set(geometry) - set(GEOMETRY_ATTRIBUTES))
    if unknown:
        raise ArrayError(f"unknown geometry attribute(s): {', '.join(unknown)}")
    for name in GEOMETRY_ATTRIBUTES:
        if name not in geometry or name in READ_ONLY_GEOMETRY:
            continue
        wanted, path = str(geometry[name]), _geometry_path(so, name)
        if name == "emulate_write_cache" and so.plugin == "block":
            if wanted != backing_device_limits(so.udev_path)["emulate_write_cache"]:
                raise ArrayError(
                    f"the array refuses {name}={wanted} on block volume {so.name}: the device's cache decides"
                )
            continue
        if not os.path.exists(path):
            raise ArrayError(f"this array's {so.plugin} volumes have no attribute {name}")
        if read_attribute(path) == wanted:
            continue
        try:
            with open(path, "w") as f:
                f.write(wanted)
        except OSError as exc:
            raise ArrayError(
                f"the array refuses {name}={wanted} on {so.plugin} volume {so.name}: {exc.strerror}"
            ) from exc
        if read_attribute(path) != wanted:
            raise ArrayError(f"{name} of volume {so.name} reads {read_attribute(path)!r} after setting {wanted!r}")


def volume_geometry(volume: Volume | str) -> dict[str, str]:
    """What a host sees of the volume (GEOMETRY_ATTRIBUTES the kernel has), as configfs strings."""
    name = volume.name if isinstance(volume, Volume) else volume
    with _lio(f"cannot read the geometry of {name}") as rtslib:
        return _read_geometry(_find_storage_object(rtslib, name))


def create_volume(
    array: Array | str,
    name: str,
    size: int,
    backing: str,
    serial: str | None = None,
    lun: int | None = None,
    geometry: dict | None = None,
    adopt: bool = False,
) -> Volume:
    """A storage object on `backing` exported as a LUN of the array (no initiator mapped yet).

    `backing` is a block device (its size must equal `size`) or a file path
    that must not exist yet (it is created sparse after a free-space check).
    `serial` is the VPD unit serial (WWID = 36001405 + its hex digits); a
    random one is generated when omitted. `geometry` (volume_geometry() of
    the source) is applied before the LUN exists, since the kernel freezes
    most of it at export; a value it refuses fails the whole call.

    `adopt`: an earlier call for this same volume may have been killed half way (its caller journaled
    the intent first). What it left is taken over instead of refused: a backing file of exactly
    `size`, a storage object `name` on `backing` (deleted and made again when it has no LUN yet,
    since its geometry may be half applied; returned as it is when its LUN exists).
    """
    target_iqn = array.target_iqn if isinstance(array, Array) else array
    geometry = dict(geometry or {})
    if size <= 0 or size % 512:
        raise ArrayError(f"volume size {size} must be a positive multiple of 512 bytes")
    if not name or any(c in name for c in "/ \t\n"):
        raise ArrayError(f"invalid volume name {name!r}: no slashes or spaces")
    if serial is not None:
        check_serial(serial)
    if adopt:
        adopted = _adopt_half_made_volume(name, backing)
        if adopted is not None:
            return adopted
    block = _is_block_device(backing)
    reuse_file = False
    if block:
        device_size = _block_device_size(backing)
        if device_size != size:
            raise ArrayError(f"block device {backing} holds {device_size} bytes, not the {size} asked for")
        check_backing_device_geometry(backing, geometry)
    else:
        _check_block_size(int(geometry.get("block_size", 512)), size)
        reuse_file = adopt and _is_leftover_backing_file(backing, size)
        if os.path.lexists(backing) and not reuse_file:
            raise ArrayError(f"backing file {backing} already exists; refusing to reuse it")
        directory = os.path.dirname(os.path.abspath(backing))
        if not os.path.isdir(directory):
            raise ArrayError(f"backing directory {directory} does not exist")
        if not reuse_file:
            check_free_space(directory, size)

    with _lio(f"cannot create volume {name} on {target_iqn}") as rtslib:
        root = _root(rtslib)
        tpg = _tpg(rtslib, target_iqn)
        if any(so.name == name for so in root.storage_objects):
            raise ArrayError(f"a storage object named {name} already exists")
        if lun is not None and any(existing.lun == lun for existing in tpg.luns):
            raise ArrayError(f"target {target_iqn} already has a LUN {lun}")
        with contextlib.ExitStack() as undo:
            if not block and not reuse_file:
                with open(backing, "xb") as f:
                    undo.callback(os.unlink, backing)
                    f.truncate(size)
                checkpoint("create:backing-file-made")
            plugin = "block" if block else "fileio"
            so = _new_storage_object(rtslib, name, plugin, backing, size, serial, geometry, undo)
            checkpoint("create:storage-object-made")
            rtslib.LUN(tpg, lun, storage_object=so)
            volume = _volume_from(so)
            undo.pop_all()
        return volume


def export_storage_object(target_iqn: str, name: str) -> Volume:
    """Put an existing storage object (a served volume's, array/tcmu) on a LUN of the array; the volume as it
    is when it has one already."""
    with _lio(f"cannot export storage object {name} on {target_iqn}") as rtslib:
        so = _find_storage_object(rtslib, name)
        if not list(so.attached_luns):
            rtslib.LUN(_tpg(rtslib, target_iqn), None, storage_object=so)
        volume = _volume_from(so)
    if volume.target_iqn != target_iqn:
        raise ArrayError(f"storage object {name} is a LUN of {volume.target_iqn}, not of {target_iqn}")
    return volume


def _adopt_half_made_volume(name: str, backing: str) -> Volume | None:
    """What a killed create_volume of `name` on `backing` left: the volume if whole, else nothing (a storage
    object without its LUN is deleted). A storage object of that name on another backing is not ours."""
    with _lio(f"cannot look at what an earlier creation of {name} left") as rtslib:
        so = next((so for so in _root(rtslib).storage_objects if so.name == name), None)
        if so is None:
            return None
        if os.path.realpath(so.udev_path) != os.path.realpath(backing):
            raise ArrayError(f"a storage object named {name} already exists on {so.udev_path}, not {backing}; "
                             "refusing to take it over")
        if list(so.attached_luns):
            return _volume_from(so)
        so.delete()
        return None


def _is_leftover_backing_file(backing: str, size: int) -> bool:
    """A regular file (not a link) of exactly `size` bytes that no storage object uses: what a killed creation
    left between making the file and its storage object."""
    try:
        info = os.lstat(backing)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return False
    with _lio(f"cannot check who uses {backing}") as rtslib:
        real = os.path.realpath(backing)
        return not any(os.path.realpath(so.udev_path or "") == real for so in _root(rtslib).storage_objects)


def remove_volume_leftovers(name: str, backing: str | None, target_iqn: str | None = None,
                            initiators: Iterable[str] = ()) -> list[str]:
    """Remove whatever of volume `name` exists (a rollback after a creation killed half way): its storage object
    and LUN, the ACLs of `initiators` on `target_iqn` left mapping nothing, and the backing file `backing` (give
    it only when this migration made it). Returns what it removed, for the caller's report."""
    removed = []
    with _lio(f"cannot remove what is left of volume {name}") as rtslib:
        for so in [so for so in _root(rtslib).storage_objects if so.name == name]:
            for lun in list(so.attached_luns):
                lun.delete()
            so.delete()
            removed.append(f"storage object {name}")
        if target_iqn is not None and any(t.wwn == target_iqn for t in _iscsi_fabric(rtslib).targets):
            tpg = _tpg(rtslib, target_iqn)
            for initiator in initiators:
                if _delete_acl_if_empty(_find_acl(tpg, initiator)):
                    removed.append(f"ACL of {initiator}")
    if backing and os.path.isfile(backing) and not os.path.islink(backing):
        os.unlink(backing)
        removed.append(f"backing file {backing}")
    return removed


def _new_storage_object(rtslib, name, plugin, backing, size, serial, geometry, undo: contextlib.ExitStack):
    """The storage object with its geometry applied, not yet exported; `undo` deletes it."""
    if plugin == "block":
        so = rtslib.BlockStorageObject(name, dev=backing, wwn=serial)
    else:
        # write_back=False: LIO writes through (O_DSYNC) so an acknowledged
        # write is on the backing store, whatever emulate_write_cache tells the host.
        so = rtslib.FileIOStorageObject(name, dev=backing, size=size, wwn=serial, write_back=False)
    undo.callback(so.delete)
    _apply_geometry(so, geometry)
    return so


def list_volumes(target_iqn: str | None = None) -> list[Volume]:
    with _lio("cannot list volumes") as rtslib:
        volumes = [
            _volume_from(so)
            for so in _root(rtslib).storage_objects
            if _is_volume(so)
        ]
    if target_iqn is not None:
        volumes = [v for v in volumes if v.target_iqn == target_iqn]
    return volumes


def find_volume(name: str) -> Volume:
    with _lio(f"cannot look up volume {name}") as rtslib:
        return _volume_from(_find_storage_object(rtslib, name))


def find_volumes_by_wwid(wwid: str) -> list[Volume]:
    """Every volume whose WWID is `wwid` (after a switch, source and destination share one)."""
    wanted = normalize_wwid(wwid)
    return [v for v in list_volumes() if v.wwid == wanted]


def find_volume_by_wwid(wwid: str) -> Volume:
    """The one volume behind a host device's WWID; how migrate finds the source LUN."""
    found = find_volumes_by_wwid(wwid)
    if not found:
        raise ArrayError(f"no volume on this array host has WWID {normalize_wwid(wwid)}")
    if len(found) > 1:
        names = ", ".join(v.name for v in found)
        raise ArrayError(f"WWID {normalize_wwid(wwid)} is carried by several volumes: {names}")
    return found[0]


def remove_volume(volume: Volume | str, remove_backing: bool = False) -> None:
    """Unexport (LUN and every mapping) and delete the storage object; optionally its backing file."""
    name = volume.name if isinstance(volume, Volume) else volume
    with _lio(f"cannot remove volume {name}") as rtslib:
        so = _find_storage_object(rtslib, name)
        backing, plugin = so.udev_path, so.plugin
        for lun in list(so.attached_luns):
            lun.delete()
        so.delete()
    if remove_backing and plugin == "fileio" and os.path.isfile(backing):
        os.unlink(backing)


# ---------------------------------------------------------------------------
# mappings (which initiator sees which volume)


def list_mappings(volume: Volume) -> list[Mapping]:
    with _lio(f"cannot list mappings of {volume.name}") as rtslib:
        return _mappings_of(_tpg_lun(rtslib, volume))


def find_mapping(volume: Volume, initiator_iqn: str) -> Mapping | None:
    """The initiator's mapping of the volume (its host-side LUN number), or None."""
    return next((m for m in list_mappings(volume) if m.initiator_iqn == initiator_iqn), None)


def other_initiators(volume: Volume, except_iqns: Iterable[str]) -> list[Mapping]:
    """Mappings of the volume to initiators not in `except_iqns`: hosts a migration would cut off."""
    known = set(except_iqns)
    return [m for m in list_mappings(volume) if m.initiator_iqn not in known]


def choose_mapped_lun(used: Iterable[int], preferred: int | None) -> int:
    """`preferred` when the initiator does not use it yet, else the lowest free mapped LUN."""
    used = set(used)
    if preferred is not None and preferred not in used and 0 <= preferred <= MAX_MAPPED_LUN:
        return preferred
    free = next((n for n in range(MAX_MAPPED_LUN + 1) if n not in used), None)
    if free is None:
        raise ArrayError(f"no free mapped LUN number left (all {MAX_MAPPED_LUN + 1} in use)")
    return free


def _find_acl(tpg, initiator_iqn: str):
    return next((a for a in tpg.node_acls if a.node_wwn == initiator_iqn), None)


def _used_mapped_luns(acl) -> set[int]:
    return {m.mapped_lun for m in acl.mapped_luns} if acl is not None else set()


def free_mapped_lun(target_iqn: str, initiator_iqn: str, preferred: int | None = None) -> int:
    """The host-side LUN number export_volume would give the initiator on this target."""
    with _lio(f"cannot list the LUNs {initiator_iqn} sees on {target_iqn}") as rtslib:
        return choose_mapped_lun(_used_mapped_luns(_find_acl(_tpg(rtslib, target_iqn), initiator_iqn)), preferred)


def list_acls(target_iqn: str) -> list[str]:
    """Initiator names the target has an ACL for (whether or not they map a LUN)."""
    with _lio(f"cannot list the ACLs of {target_iqn}") as rtslib:
        return sorted(acl.node_wwn for acl in _tpg(rtslib, target_iqn).node_acls)


def ensure_node_acl(target_iqn: str, initiator_iqn: str) -> bool:
    """Let the initiator log in even with no LUN mapped yet; True when the ACL was made here.

    Measured (tests/lab/test_array_geometry.py): the host then gets no disk, and
    a LUN mapped later shows up only after a scan of that session.
    """
    with _lio(f"cannot give {initiator_iqn} access to {target_iqn}") as rtslib:
        tpg = _tpg(rtslib, target_iqn)
        if _find_acl(tpg, initiator_iqn) is not None:
            return False
        rtslib.NodeACL(tpg, initiator_iqn, mode="create")
        return True


def remove_node_acl_if_empty(target_iqn: str, initiator_iqn: str) -> bool:
    """Delete the initiator's ACL (ending its sessions) if it maps no LUN; True when deleted."""
    with _lio(f"cannot remove the ACL of {initiator_iqn} on {target_iqn}") as rtslib:
        return _delete_acl_if_empty(_find_acl(_tpg(rtslib, target_iqn), initiator_iqn))


def _delete_acl_if_empty(acl) -> bool:
    if acl is None or list(acl.mapped_luns):
        return False
    acl.delete()
    return True


def export_volume(volume: Volume, initiator_iqn: str, write_protect: bool = False, mapped_lun: int | None = None) -> Mapping:
    """Let one initiator see the volume (NodeACL + MappedLUN).

    Without `mapped_lun` the host-side number is the TPG LUN when the
    initiator has that number free, else its lowest free one; an explicit
    `mapped_lun` already in use is refused.
    """
    with _lio(f"cannot export {volume.name} to {initiator_iqn}") as rtslib:
        tpg_lun = _tpg_lun(rtslib, volume)
        tpg = tpg_lun.parent_tpg
        with contextlib.ExitStack() as undo:
            acl = _find_acl(tpg, initiator_iqn)
            if acl is None:
                acl = rtslib.NodeACL(tpg, initiator_iqn, mode="create")
                undo.callback(acl.delete)
                checkpoint("export:acl-made")
            for existing in acl.mapped_luns:
                if existing.tpg_lun.lun == tpg_lun.lun:
                    raise ArrayError(f"{volume.name} is already exported to {initiator_iqn}")
                if existing.mapped_lun == mapped_lun:
                    raise ArrayError(f"{initiator_iqn} already has LUN {mapped_lun} on {volume.target_iqn}")
            if mapped_lun is None:
                mapped_lun = choose_mapped_lun(_used_mapped_luns(acl), tpg_lun.lun)
            rtslib.MappedLUN(acl, mapped_lun, tpg_lun, write_protect)
            undo.pop_all()
        return Mapping(initiator_iqn, mapped_lun, bool(write_protect))


def _find_mapped_lun(rtslib, volume: Volume, initiator_iqn: str):
    for mapped in _tpg_lun(rtslib, volume).mapped_luns:
        if mapped.parent_nodeacl.node_wwn == initiator_iqn:
            return mapped
    raise ArrayError(f"volume {volume.name} is not exported to {initiator_iqn}")


def unexport_volume(volume: Volume, initiator_iqn: str, keep_acl: bool = False) -> None:
    """Remove the initiator's mapping; its NodeACL goes too once it maps nothing (ends its session),
    unless `keep_acl` (a session that stays logged in for other reasons, e.g. a switch being reverted)."""
    with _lio(f"cannot unexport {volume.name} from {initiator_iqn}") as rtslib:
        mapped = _find_mapped_lun(rtslib, volume, initiator_iqn)
        acl = mapped.parent_nodeacl
        mapped.delete()
        if not keep_acl:
            _delete_acl_if_empty(acl)


def set_mapping_write_protect(volume: Volume, initiator_iqn: str, write_protect: bool) -> None:
    """Fence (or unfence) an initiator's writes; the kernel applies it live, reads keep working."""
    with _lio(f"cannot set write protection of {volume.name} for {initiator_iqn}") as rtslib:
        mapped = _find_mapped_lun(rtslib, volume, initiator_iqn)
        mapped.write_protect = bool(write_protect)
        if mapped.write_protect != bool(write_protect):
            raise ArrayError(f"write protection of {volume.name} for {initiator_iqn} did not change")


# ---------------------------------------------------------------------------
# identity


def _rebuild_storage_object(rtslib, volume: Volume, tpg, mappings: list[Mapping], serial: str, geometry: dict):
    with contextlib.ExitStack() as undo:
        so = _new_storage_object(
            rtslib, volume.name, volume.plugin, volume.backing, volume.size, serial, geometry, undo
        )
        lun = rtslib.LUN(tpg, volume.lun, storage_object=so)
        for mapping in mappings:
            acl = rtslib.NodeACL(tpg, mapping.initiator_iqn)
            rtslib.MappedLUN(acl, mapping.mapped_lun, lun, mapping.write_protect)
        undo.pop_all()
    return so


def change_volume_serial(volume: Volume, new_serial: str) -> Volume:
    """Give the volume a new unit serial (hence WWID), keeping its bytes, geometry, LUN and mappings.

    The kernel refuses to change vpd_unit_serial while the storage object is
    exported, so: record the mappings, delete the LUN and the storage object,
    recreate both on the same backing with the new serial, restore the
    mappings. Sessions on the LUN see it vanish and return. On failure the
    old serial is put back.
    """
    check_serial(new_serial)
    with _lio(f"cannot change serial of {volume.name}") as rtslib:
        so = _find_storage_object(rtslib, volume.name)
        current = _volume_from(so)
        if current.lun is None:
            raise ArrayError(f"volume {volume.name} is not exported as a LUN of any target")
        if current.serial == new_serial:
            return current
        tpg_lun = _tpg_lun(rtslib, current)
        tpg = tpg_lun.parent_tpg
        mappings = _mappings_of(tpg_lun)
        geometry = _read_geometry(so)
        tpg_lun.delete()  # also deletes the MappedLUNs; the NodeACLs stay
        so.delete()
        try:
            new_so = _rebuild_storage_object(rtslib, current, tpg, mappings, new_serial, geometry)
        except (rtslib.RTSLibError, OSError, ArrayError) as exc:
            # the rebuild removed what it made; put the old identity back
            _rebuild_storage_object(rtslib, current, tpg, mappings, current.serial, geometry)
            raise ArrayError(f"cannot give {volume.name} serial {new_serial}: {exc}; old serial kept") from exc
        return _volume_from(new_so)

