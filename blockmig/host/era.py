"""Change tracking for online migration: the host's own dm map becomes dm-era for a while.

Why this shape: the host keeps its dev_t and open handles only if the map it
has open stays. So, like pvmove, the map's table is reloaded: its table moves
to a PRIVATE map (`blockmig-era-origin-NAME`; dm lets two tables claim the
same devices) and the host's map becomes
`era <metadata> <private map> <block sectors>`. dm-era records, per block,
the era in which it was last written; its metadata lives on a sparse file in
a directory of the caller (the journal directory) on a loop device.

Measured in the lab (kernel 6.1, multipath-tools 0.9.4, tests/lab/test_era.py):
- A multipath map itself can NOT be reloaded to era: the kernel flags the
  multipath target immutable ("can't replace immutable target type
  multipath"; only the `error` target may replace it), and request-based
  multipath cannot sit on a bio-based era device either. So tracking works on
  a bio-based map ABOVE the multipath map (an LVM logical volume, or any
  linear/striped map the host uses), and `new_tracking` refuses a multipath
  map with one line. The multipath map itself is never touched: multipathd
  keeps managing it, path checking, failover and reinstatement work as
  without tracking, and `multipathd reconfigure` leaves the era table alone.
- A path failure under tracking (source portal down ~8 s): the host's write
  queued (queue_if_no_path) ~9-10 s and completed, multipathd showed the path
  failed/faulty and reinstated it; tracking went on and listed the block.
- Cost (user-mode-linux guest): start_tracking 0.9-1.4 s, stop_tracking
  1.3-1.4 s; written_since 0.2-0.5 s for 4096 blocks (one range), 1.9-2.9 s
  for 32768 scattered blocks of a 262144-block volume. Metadata: 13 of 1025
  4 KiB blocks used for 256 era blocks, 288 of 1536 for 262144 era blocks.
- `take_metadata_snap` archives the current writeset itself, so
  `written_since` sees every write acknowledged before it was called, and
  each call moves the era on (by 2 or so: numbers are not consecutive).

Everything needed to undo is in `Tracking` (`to_dict`/`from_dict`); journal
it from `new_tracking` on and on every `on_change`. `stop_tracking` works
from it in any state: nothing made, private map made but host map not
reloaded, reloaded, half torn down, after kill -9.

A pass of the orchestrator: e = checkpoint(t); copy; blocks =
written_since(t, e) (ascending block indexes, of `block_sectors` each).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass

from blockmig.errors import HostError
from blockmig.host import runner
from blockmig.safefile import PRIVATE_FILE_MODE

SECTOR = 512
PRIVATE_PREFIX = "blockmig-era-origin-"
METADATA_BLOCK = 4096
# dm targets flagged DM_TARGET_IMMUTABLE: a reload to another target type fails with
# "can't replace immutable target type multipath" (measured in the lab, kernel 6.1).
IMMUTABLE_TARGETS = {"multipath"}


@dataclass
class Tracking:
    """What start_tracking made; serialise with to_dict() into the journal before and after each step."""

    map_name: str
    original_table: str  # the host map's multipath table, as `dmsetup table` printed it
    private_map: str
    metadata_file: str
    block_sectors: int
    loop_device: str = ""  # "" until attached

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Tracking":
        return cls(**data)


def run(args: list[str], what: str, timeout: float = runner.DEFAULT_COMMAND_TIMEOUT) -> str:
    """dmsetup, losetup and era tools through the host's one runner (bounded, one-line HostErrors)."""
    return runner.run(args, what, timeout, missing="dmsetup, losetup, thin-provisioning-tools")


def table(name: str) -> str:
    return run(["dmsetup", "table", name], f"cannot read the table of map {name}").strip()


def map_exists(name: str) -> bool:
    return runner.succeeds(["dmsetup", "info", name], f"cannot look up map {name}")


def metadata_size(blocks: int) -> int:
    """Bytes of era metadata for `blocks` blocks (sparse, so only what era writes is used).

    era keeps a 32-bit era per block in a btree plus one bitset per archived
    writeset; 8 bytes a block plus 4 MiB of room covers that with margin
    (measured use is in the lab test).
    """
    size = 4 * 1024 * 1024 + 8 * blocks
    return -(-size // METADATA_BLOCK) * METADATA_BLOCK


def new_tracking(map_name: str, metadata_dir: str, block_sectors: int) -> Tracking:
    """The plan of a tracking, to journal BEFORE start_tracking changes anything."""
    if block_sectors < 8 or block_sectors & (block_sectors - 1):
        raise HostError(f"era block size {block_sectors} sectors must be a power of two >= 8")
    original = table(map_name)
    targets = {line.split()[2] for line in original.splitlines() if len(line.split()) > 2}
    if targets & IMMUTABLE_TARGETS:
        raise HostError(
            f"map {map_name} is a {'/'.join(sorted(targets & IMMUTABLE_TARGETS))} map, whose target the kernel "
            "never lets a reload replace; track changes on a map above it (an LVM volume) or use --mode offline"
        )
    return Tracking(
        map_name=map_name,
        original_table=original,
        private_map=PRIVATE_PREFIX + map_name,
        metadata_file=os.path.join(metadata_dir, f"era-{map_name}.meta"),
        block_sectors=block_sectors,
    )


def start_tracking(tracking: Tracking, on_change=lambda t: None) -> Tracking:
    """Make the host map dm-era over the private map; `on_change(tracking)` journals each new fact.

    On failure what was made is removed again (stop_tracking) and the error re-raised.
    """
    try:
        length = _length(tracking.original_table)
        blocks = -(-length // tracking.block_sectors)
        # Zeros: era formats it on first load. Private and never through a link, as every state file.
        fd = os.open(tracking.metadata_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     PRIVATE_FILE_MODE)
        try:
            os.ftruncate(fd, metadata_size(blocks))
        finally:
            os.close(fd)
        tracking.loop_device = run(
            ["losetup", "--find", "--show", tracking.metadata_file], "cannot attach the era metadata file"
        ).strip()
        on_change(tracking)
        run(["dmsetup", "create", tracking.private_map, "--table", tracking.original_table],
            f"cannot create private map {tracking.private_map}")
        era_table = f"0 {length} era {tracking.loop_device} /dev/mapper/{tracking.private_map} {tracking.block_sectors}"
        _swap_table(tracking.map_name, era_table)
    except BaseException:
        stop_tracking(tracking)
        raise
    return tracking


def is_tracking(tracking: Tracking) -> bool:
    """True while the host map's table is still era over the private map (multipathd may undo it)."""
    return map_exists(tracking.map_name) and table(tracking.map_name).split()[2:3] == ["era"]


def checkpoint(tracking: Tracking) -> int:
    """Archive the current writeset; return the era that starts now."""
    run(["dmsetup", "message", tracking.map_name, "0", "checkpoint"], f"cannot checkpoint era on {tracking.map_name}")
    return current_era(tracking)


def current_era(tracking: Tracking) -> int:
    # era status: <metadata block size> <#used metadata blocks>/<#total> <current era> <held root | ->
    status = run(["dmsetup", "status", tracking.map_name], f"cannot read era status of {tracking.map_name}").split()
    if len(status) < 6 or status[2] != "era":
        raise HostError(f"map {tracking.map_name} is no longer an era map (status: {' '.join(status)[:80]})")
    return int(status[5])


def metadata_usage(tracking: Tracking) -> tuple[int, int]:
    """(used, total) metadata blocks of 4 KiB as era reports them."""
    status = run(["dmsetup", "status", tracking.map_name], f"cannot read era status of {tracking.map_name}").split()
    used, total = status[4].split("/")
    return int(used), int(total)


def written_since(tracking: Tracking, era: int) -> list[int]:
    """Ascending block indexes written in era >= `era` (up to the last checkpoint)."""
    name = tracking.map_name
    run(["dmsetup", "message", name, "0", "take_metadata_snap"], f"cannot take era metadata snapshot of {name}")
    try:
        xml = run(["era_invalidate", "--written-since", str(era), "--metadata-snapshot", tracking.loop_device],
                  f"era_invalidate failed on {tracking.loop_device}")
    finally:
        run(["dmsetup", "message", name, "0", "drop_metadata_snap"], f"cannot drop era metadata snapshot of {name}")
    return parse_invalidate(xml)


def parse_invalidate(xml: str) -> list[int]:
    """Blocks of era_invalidate's `<blocks><range begin= end=/><block block=/></blocks>` (end exclusive)."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise HostError(f"era_invalidate printed unreadable XML: {exc}") from None
    blocks = set()
    for element in root:
        if element.tag == "block":
            blocks.add(int(element.get("block")))
        elif element.tag == "range":
            blocks.update(range(int(element.get("begin")), int(element.get("end"))))
    return sorted(blocks)


def stop_tracking(tracking: Tracking) -> None:
    """Put the original multipath table back and remove private map, loop device and metadata.

    Idempotent; every step checks what is there, so it finishes any half-done start or stop.
    """
    if map_exists(tracking.map_name):
        live = table(tracking.map_name)
        if live != tracking.original_table and _is_our_era_table(live, tracking):
            # Another table (LVM reloaded the LV, e.g. lvextend) is the owner's now: left as it is.
            _swap_table(tracking.map_name, tracking.original_table)
        elif _suspended(tracking.map_name):  # killed between suspend and resume
            run(["dmsetup", "resume", tracking.map_name], f"cannot resume map {tracking.map_name}")
    _remove_private(tracking)


def switch_table(tracking: Tracking, new_table: str) -> None:
    """Cut-over: the host map gets the destination's multipath table directly, then tracking goes.

    The suspend flushes and freezes while the private map (the source) still takes writes.
    """
    _swap_table(tracking.map_name, new_table)
    _remove_private(tracking)


def _is_our_era_table(live: str, tracking: Tracking) -> bool:
    fields = live.split()
    return fields[2:3] == ["era"] and (
        f"/dev/mapper/{tracking.private_map}" in fields or _device_number(tracking.private_map) in fields)


def _device_number(name: str) -> str:
    """MAJ:MIN of a dm map, as dmsetup table prints the devices a table uses ("" if it is gone)."""
    if not map_exists(name):
        return ""
    out = run(["dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", name], f"cannot read map {name}")
    return out.strip().replace(" ", "")


def _remove_private(tracking: Tracking) -> None:
    if map_exists(tracking.private_map):
        run(["dmsetup", "remove", "--retry", tracking.private_map], f"cannot remove private map {tracking.private_map}")
    if tracking.loop_device and _loop_backs(tracking.loop_device, tracking.metadata_file):
        run(["losetup", "-d", tracking.loop_device], f"cannot detach loop device {tracking.loop_device}")
    for loop in _loops_of(tracking.metadata_file):  # attached, then killed before journaling the name
        run(["losetup", "-d", loop], f"cannot detach loop device {loop}")
    if os.path.exists(tracking.metadata_file):
        os.unlink(tracking.metadata_file)


def _swap_table(name: str, new_table: str) -> None:
    """suspend (flush + freeze), load, resume; on a failed load the old table is resumed."""
    run(["dmsetup", "suspend", name], f"cannot suspend map {name}")
    try:
        run(["dmsetup", "load", name, "--table", new_table], f"cannot load a new table into map {name}")
    except HostError:
        run(["dmsetup", "clear", name], f"cannot clear the inactive table of {name}")
        run(["dmsetup", "resume", name], f"cannot resume map {name}")
        raise
    run(["dmsetup", "resume", name], f"cannot resume map {name}")


def _suspended(name: str) -> bool:
    state = run(["dmsetup", "info", "-c", "--noheadings", "-o", "suspended", name], f"cannot read state of map {name}")
    return state.strip() == "Suspended"


def _length(table_text: str) -> int:
    last = table_text.splitlines()[-1].split()
    return int(last[0]) + int(last[1])


def _loops_of(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    out = run(["losetup", "-j", path], f"cannot list loop devices of {path}")
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def _loop_backs(loop: str, path: str) -> bool:
    return loop in _loops_of(path)
