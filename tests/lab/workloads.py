"""Host applications for the migration tests: they write (raw or through a filesystem) while a volume moves.

Each workload is a context manager running one background thread; it records errors instead of
raising and keeps a log of what the host was told was ACKNOWLEDGED (the write or fsync returned).
`check(...)` afterwards asserts what a user cares about: no acknowledged write lost, no IO error.
Each also keeps an `IoStall`: the longest a single IO took, as the application saw it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

from blockio import read_direct, read_file

from blockmig import lab

MiB = 1024 * 1024
MAGIC = b"BLKMIGWL"
HEADER = struct.Struct("<8sIQQI")  # magic, writer id, sequence number, block offset, crc32 of all but the crc
# mkfs.xfs (xfsprogs >= 5.19, bookworm has 6.1) refuses filesystems smaller than 300 MiB.
# (it costs 64 MiB of the guest's tmpfs: the log). Its fstests escape hatch (XFS_SMALL_ENV in mkfs's
# environment) makes smaller ones, an unsupported layout; below 32 MiB there is one allocation group
# and xfs_repair -n refuses to check it without -o force_geometry.
XFS_MIN_SIZE = 300 * MiB
XFS_SMALL_SIZE = 32 * MiB
XFS_SMALL_ENV = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}
# xfs under a migration's writer: under TCG the lab copies a few MB/s, so 300 MiB cost minutes a test
# (copy, verify, deltas); there those tests make the small layout. test_switch_matrix's xfs keeps the
# supported size everywhere.
XFS_MIGRATION_SIZE = 64 * MiB if os.environ.get("BLOCKMIG_LAB_RUNNER") == "qemu" else XFS_MIN_SIZE
XFS_MIGRATION_ENV = XFS_SMALL_ENV if XFS_MIGRATION_SIZE < XFS_MIN_SIZE else None
MAX_KEPT_ERRORS = 200
# Seconds a raw workload waits between two of its IOs: a busy host's pace (a few hundred IOs a second),
# not a flood. The lab guest has one emulated CPU: a workload that never waits takes most of it from the
# move it is there to watch (a 16 MiB offline move ran 69 s under a flooding reader against 25 s alone),
# and a test then measures the emulator. One case floods on purpose (interval=0: test_switch_matrix's
# raw writer on the multipath switch).
HOST_IO_INTERVAL = 0.002
READ_INTERVAL = 0.02  # the readers' 64 KiB blocks: about 3 MB/s, more than the writers' 4 KiB ones move


@dataclass(frozen=True)
class IoError:
    at: float  # time.monotonic() when the IO returned the error
    where: str  # a block offset or a file name
    errno: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {errno.errorcode.get(self.errno, self.errno)} {self.message}"


class IoStall:
    """How long single IOs took: the longest (when it ended) and a few figures for sizing tests."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.worst_ended_at = 0.0
        self.samples: list[float] = []
        self.ends: list[float] = []  # when each sample's IO ended (time.monotonic()), for phase()

    @contextlib.contextmanager
    def timing(self):
        started = time.monotonic()
        try:
            yield
        finally:
            ended = time.monotonic()
            self.record(ended - started, ended)

    def record(self, seconds: float, ended_at: float) -> None:
        self.count += 1
        self.total += seconds
        if len(self.samples) < 100_000:
            self.samples.append(seconds)
            self.ends.append(ended_at)
        if seconds > self.max:
            self.max, self.worst_ended_at = seconds, ended_at

    def median(self) -> float:
        return sorted(self.samples)[len(self.samples) // 2] if self.samples else 0.0

    def phase(self, began: float, ended: float) -> str:
        """The IOs that ended in [began, ended) (time.monotonic()): how many per second, median, longest."""
        seconds = [s for s, end in zip(self.samples, self.ends) if began <= end < ended]
        rate = len(seconds) / (ended - began) if ended > began else 0.0
        median = sorted(seconds)[len(seconds) // 2] if seconds else 0.0
        return (f"{len(seconds)} IOs ({rate:.1f}/s), median {median * 1000:.1f} ms, "
                f"max {max(seconds, default=0.0) * 1000:.0f} ms")

    def summary(self) -> str:
        mean = self.total / self.count if self.count else 0.0
        return f"{self.count} IOs, mean {mean * 1000:.1f} ms, median {self.median() * 1000:.1f} ms, max {self.max * 1000:.0f} ms"


class _Workload:
    """A background thread with start/stop, an error log and an IoStall."""

    name = "workload"

    def __init__(self) -> None:
        self.errors: list[IoError] = []
        self.error_count = 0
        self.stall = IoStall()
        self.started_at = self.stopped_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=self.name)

    def _run(self) -> None:
        raise NotImplementedError

    def _record_error(self, where: str, exc: OSError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(IoError(time.monotonic(), where, exc.errno, exc.strerror or str(exc)))

    def errnos(self) -> set[int | None]:
        return {error.errno for error in self.errors}

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 120) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout)
        if not self.stopped_at:
            self.stopped_at = time.monotonic()

    def elapsed(self) -> float:
        return (self.stopped_at or time.monotonic()) - self.started_at

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _problems_of_run(self, allow_errors: bool) -> list[str]:
        problems = []
        if self._thread.is_alive():
            problems.append(f"the {self.name} is stuck in an IO (longest so far {self.stall.max:.1f} s)")
        if self.error_count and not allow_errors:
            problems.append(f"the {self.name} saw {self.error_count} IO errors, first: "
                            + "; ".join(str(e) for e in self.errors[:3]))
        return problems


def _region(size: int, region: tuple[int, int] | None, block: int) -> tuple[int, int]:
    start, length = region if region is not None else (0, size)
    if start % block or length % block or length < block or start + length > size:
        raise ValueError(f"region {region} is not whole {block}-byte blocks inside {size} bytes")
    return start, length


def device_reader(device: str) -> Callable[[int, int], bytes]:
    """read_block for check(): O_DIRECT reads of the host's map (after the switch: the destination)."""
    return lambda offset, length: read_direct(device, offset, length)


def file_reader(path: str) -> Callable[[int, int], bytes]:
    """read_block for check(): a backing file, read behind the array's back."""
    return lambda offset, length: read_file(path, offset, length)


class RawWriter(_Workload):
    """O_DIRECT|O_DSYNC writes of stamped blocks at random offsets of a region; logs every acknowledged one.

    A block: header (magic, writer id, seq, offset, crc32 of the whole block but the crc) + random payload.
    `acked` maps block offset -> (highest acknowledged seq, crc32 of that block); `failed` maps an offset
    to the seqs whose write returned an error (such a block may or may not have landed).
    """

    name = "raw writer"

    def __init__(self, device: str, size: int, block: int = 4096, region: tuple[int, int] | None = None,
                 writer_id: int = 1, interval: float = HOST_IO_INTERVAL, seed: int = 1):
        super().__init__()
        self.device = device
        self.block = block
        self.start_offset, self.length = _region(size, region, block)
        self.writer_id = writer_id
        self.interval = interval
        self.rng = random.Random(seed)
        self.seq = 0
        self.writes = 0
        self.acked: dict[int, tuple[int, int]] = {}
        self.failed: dict[int, set[int]] = {}

    def stamp(self, offset: int, seq: int, payload: bytes | None = None) -> bytes:
        """The block the writer writes at `offset` with `seq` (tests forge old or misplaced blocks with it)."""
        if payload is None:
            payload = self.rng.randbytes(self.block - HEADER.size)
        head = HEADER.pack(MAGIC, self.writer_id, seq, offset, 0)[:-4]
        return head + struct.pack("<I", zlib.crc32(head + payload)) + payload

    def _run(self) -> None:
        buffer = mmap.mmap(-1, self.block)  # page-aligned for O_DIRECT
        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
        try:
            while not self._stop.is_set():
                self.seq += 1
                offset = self.start_offset + self.rng.randrange(self.length // self.block) * self.block
                data = self.stamp(offset, self.seq)
                buffer[:] = data
                try:
                    with self.stall.timing():
                        written = os.pwritev(fd, [buffer], offset)
                    if written != self.block:
                        raise OSError(errno.EIO, f"short write of {written} bytes")
                except OSError as exc:
                    self.failed.setdefault(offset, set()).add(self.seq)
                    self._record_error(str(offset), exc)
                    time.sleep(0.02)
                    continue
                self.writes += 1
                self.acked[offset] = (self.seq, zlib.crc32(data))
                if self.interval:
                    time.sleep(self.interval)
        finally:
            os.close(fd)
            buffer.close()

    def rate(self) -> float:
        return self.writes / self.elapsed() if self.elapsed() else 0.0

    def summary(self) -> str:
        return (f"raw writer: {self.writes} acknowledged {self.block}-byte writes in {self.elapsed():.1f} s "
                f"({self.rate():.0f}/s), {self.error_count} errors; {self.stall.summary()}")

    def _judge(self, offset: int, data: bytes, acked: tuple[int, int] | None) -> str | None:
        magic, writer_id, seq, field_offset, crc = HEADER.unpack_from(data)
        tried = self.failed.get(offset, set())
        what = f"block at {offset}" + (f" (acknowledged seq {acked[0]})" if acked else "")
        if magic != MAGIC or writer_id != self.writer_id:
            return f"{what} holds no block of writer {self.writer_id}: an acknowledged write was LOST"
        if zlib.crc32(data[:HEADER.size - 4] + data[HEADER.size:]) != crc:
            return f"{what} is corrupt: its crc does not match (torn or damaged block, seq field {seq})"
        if field_offset != offset:
            return f"{what} holds the block written for offset {field_offset} (seq {seq}): misdirected write"
        if acked is None or seq > acked[0]:
            return None if seq in tried else f"{what} holds seq {seq}, which was never written there"
        if seq < acked[0]:
            return f"{what} holds older seq {seq}: an acknowledged write was LOST"
        if zlib.crc32(data) != acked[1]:
            return f"{what} holds seq {seq} with other bytes than were acknowledged"
        return None

    def check(self, read_block: Callable[[int, int], bytes], expected: bytes | None = None,
              allow_errors: bool = False) -> None:
        """Every acknowledged block reads back intact with a seq >= its last acknowledged one.

        `expected`: the volume's bytes before the writer started; blocks it never wrote must still hold them.
        Without `allow_errors` an IO error the writer saw fails the check too.
        """
        problems = self._problems_of_run(allow_errors)
        if self.writes == 0:
            problems.append("the raw writer never got a write acknowledged")
        bad = []
        for offset, acked in sorted(list(self.acked.items())):  # a snapshot: a stuck writer may still add
            found = self._judge(offset, read_block(offset, self.block), acked)
            if found:
                bad.append(found)
        if expected is not None:
            for offset in range(self.start_offset, self.start_offset + self.length, self.block):
                if offset in self.acked:
                    continue
                data = read_block(offset, self.block)
                if data != expected[offset:offset + self.block] and (
                        offset not in self.failed or self._judge(offset, data, None)):
                    bad.append(f"block at {offset}, never written by the host, changed")
        if bad:
            problems.append(f"{len(bad)} of {len(self.acked)} acknowledged blocks are wrong: " + "; ".join(bad[:5]))
        assert not problems, "\n".join(problems)


class RawReader(_Workload):
    """Reads random blocks of a region with O_DIRECT and compares them with what the region holds.

    The region must be disjoint from any writer's; HostReader (migrate_support) reads the whole volume.
    """

    name = "raw reader"

    def __init__(self, device: str, expected: bytes, region: tuple[int, int] | None = None, block: int = 64 * 1024,
                 seed: int = 7, interval: float = READ_INTERVAL):
        super().__init__()
        self.interval = interval
        self.device = device
        self.expected = expected
        self.block = block
        self.start_offset, self.length = _region(len(expected), region, block)
        self.rng = random.Random(seed)
        self.reads = 0
        self.mismatches: list[int] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            offset = self.start_offset + self.rng.randrange(self.length // self.block) * self.block
            try:
                with self.stall.timing():
                    data = read_direct(self.device, offset, self.block)
            except OSError as exc:
                self._record_error(str(offset), exc)
                time.sleep(0.02)
                continue
            self.reads += 1
            if data != self.expected[offset:offset + self.block]:
                self.mismatches.append(offset)
            self._stop.wait(self.interval)

    def check(self, allow_errors: bool = False) -> None:
        problems = self._problems_of_run(allow_errors)
        if self.reads == 0:
            problems.append("the raw reader never got a read through")
        if self.mismatches:
            problems.append(f"the raw reader read wrong bytes at {self.mismatches[:5]}")
        assert not problems, "\n".join(problems)



class OrderedPairWriter(_Workload):
    """Dependent writes over two volumes, like a database's log then its data: seq n goes to `first`,
    and only once that is acknowledged to `second`, each at block n % blocks, O_DIRECT|O_DSYNC.

    check() reads both volumes: every block must hold exactly the last seq the writer wrote there, so
    no acknowledged write is lost on either, and `second` never holds a seq that `first` lacks (the
    second volume did not run ahead of the first across a switch).
    """

    name = "ordered pair writer"

    def __init__(self, first: str, second: str, blocks: int = 256, block: int = 4096, bases: tuple[int, int] = (0, 0),
                 interval: float = HOST_IO_INTERVAL):
        super().__init__()
        self.interval = interval
        self.devices = (first, second)
        self.bases = bases  # where each volume's blocks start (two regions of one device in a self-test)
        self.blocks = blocks
        self.block = block
        self.done = [0, 0]  # highest seq acknowledged by each volume

    def stamp(self, seq: int, volume: int) -> bytes:
        offset = self.bases[volume] + (seq % self.blocks) * self.block
        head = HEADER.pack(MAGIC, 100 + volume, seq, offset, 0)
        return head + bytes(self.block - len(head))

    def _run(self) -> None:
        buffer = mmap.mmap(-1, self.block)
        fds = [os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC) for device in self.devices]
        try:
            seq = 0
            while not self._stop.is_set():
                seq += 1
                for volume, fd in enumerate(fds):
                    buffer[:] = self.stamp(seq, volume)
                    while True:  # a dependent write is retried, never skipped: the order is the point
                        try:
                            with self.stall.timing():
                                os.pwritev(fd, [buffer], self.bases[volume] + (seq % self.blocks) * self.block)
                            break
                        except OSError as exc:
                            self._record_error(f"volume {volume} seq {seq}", exc)
                            time.sleep(0.02)
                    self.done[volume] = seq
                self._stop.wait(self.interval)
        finally:
            for fd in fds:
                os.close(fd)
            buffer.close()

    def summary(self) -> str:
        return (f"ordered pair writer: {self.done[1]} pairs acknowledged in {self.elapsed():.1f} s, "
                f"{self.error_count} errors; {self.stall.summary()}")

    def check(self) -> None:
        """Reads both volumes through the devices the host uses (after a switch: the destinations)."""
        problems = self._problems_of_run(allow_errors=False)
        first, second = self.done
        if second == 0:
            problems.append("the ordered pair writer never got a pair acknowledged")
        if not second <= first <= second + 1:
            problems.append(f"acknowledged seqs {first} and {second}: the writer's order broke")
        for volume, last in enumerate(self.done):
            data = read_direct(self.devices[volume], self.bases[volume], self.blocks * self.block)
            wrong = []
            for index in range(self.blocks):
                wanted = last - (last - index) % self.blocks  # the last seq written to block `index`
                if wanted <= 0:
                    continue
                block = data[index * self.block:(index + 1) * self.block]
                if block != self.stamp(wanted, volume):
                    _, _, found, _, _ = HEADER.unpack_from(block)
                    wrong.append(f"block {index} holds seq {found}, not {wanted}")
            if wrong:
                problems.append(f"volume {volume} ({self.devices[volume]}), last seq {last}: {len(wrong)} blocks "
                                f"wrong (an acknowledged write LOST or a volume ahead): " + "; ".join(wrong[:4]))
        assert not problems, "\n".join(problems)


def _run_tool(argv: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


def _tail(result: subprocess.CompletedProcess) -> str:
    return " | ".join((result.stdout + result.stderr).strip().splitlines()[-4:])


def _mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, major:minor, fstype) of this namespace's mounts (mountpoints escaped as mountinfo
    writes them: the lab's are pytest's temporary paths, which have no blanks)."""
    with open("/proc/self/mountinfo") as handle:
        rows = [line.split() for line in handle]
    return [(fields[4], fields[2], fields[fields.index("-") + 1]) for fields in rows if "-" in fields]


def is_mounted(mountpoint: str) -> bool:
    """From mountinfo: os.path.ismount stats the mount's root, which a shut-down xfs answers with EIO,
    and ismount then says "not mounted" (so a CI run once left an xfs mounted and every later test's
    lab_down failed)."""
    return any(point == mountpoint for point, _, _ in _mounts())


def mounts_under(root: str) -> list[str]:
    """Mountpoints at or below `root`, deepest first (the order to unmount them in)."""
    return sorted({point for point, _, _ in _mounts() if (point + "/").startswith(root.rstrip("/") + "/")},
                  key=len, reverse=True)


def unmount_filesystem(mountpoint: str) -> None:
    """umount, a busy one lazily; nothing if nothing is mounted there.

    xfs retries a failed metadata write for ever by default: after refused writes its (lazy) unmount
    kept the map open. Told first to give up (its sysfs error knobs), it lets go.
    """
    found = [(number, fstype) for point, number, fstype in _mounts() if point == mountpoint]
    if not found:
        return
    for number, fstype in found:
        if fstype == "xfs":
            name = os.path.basename(os.path.realpath(f"/sys/dev/block/{number}"))
            for knob, value in (("fail_at_unmount", "1"), ("metadata/EIO/max_retries", "0")):
                with contextlib.suppress(OSError), open(f"/sys/fs/xfs/{name}/error/{knob}", "w") as handle:
                    handle.write(value)
    if _run_tool(["umount", mountpoint]).returncode != 0:
        _run_tool(["umount", "-l", mountpoint])


class FsAppender(_Workload):
    """A filesystem on the device; appends numbered lines to a file with an fsync after each.

    Every `interval`: append "%08d <hex>\\n" + fsync (acknowledged when fsync returned), and with
    `rewrite` also rewrite a second file in place + fsync. The device path (/dev/mapper/NAME) is the
    same before and after the migration, so check() can run after the switch.
    """

    name = "fs appender"
    LOG = "appended.log"
    STATE = "rewritten.state"
    RECORD = 64

    def __init__(self, device: str, fstype: str, mountpoint: str, interval: float = 0.02, rewrite: bool = True,
                 mkfs_env: dict | None = None, seed: int = 3):
        super().__init__()
        if fstype not in ("ext4", "xfs"):
            raise ValueError(f"fstype {fstype!r}: ext4 or xfs")
        self.device = device
        self.fstype = fstype
        self.mountpoint = mountpoint
        self.interval = interval
        self.rewrite = rewrite
        self.mkfs_env = mkfs_env
        self.rng = random.Random(seed)
        self.lines: dict[int, str] = {}  # every line the host tried to append
        self.acked_lines: list[int] = []
        self.states: dict[int, str] = {}
        self.acked_state = 0
        self.fsync = IoStall()
        self.mounted = False

    # -- mounting ------------------------------------------------------------------------------

    def make_filesystem(self) -> None:
        argv = ["mkfs.ext4", "-F", "-q"] if self.fstype == "ext4" else ["mkfs.xfs", "-f", "-q"]
        result = _run_tool([*argv, self.device], env=self.mkfs_env)
        if result.returncode != 0:
            raise AssertionError(f"{argv[0]} {self.device} failed: {_tail(result)}")

    def mount(self, read_only: bool = False) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        argv = ["mount", "-t", self.fstype, *(["-o", "ro"] if read_only else []), self.device, self.mountpoint]
        result = _run_tool(argv)
        if result.returncode != 0:
            raise AssertionError(f"mount {self.device} failed: {_tail(result)}")
        self.mounted = True

    def unmount(self) -> None:
        """Idempotent; a busy or failing umount falls back to a lazy one, so nothing stays mounted."""
        unmount_filesystem(self.mountpoint)
        self.mounted = is_mounted(self.mountpoint)

    def close(self) -> None:
        """Stop and unmount, whatever state the test left it in (for fixtures' finally)."""
        self.stop()
        self.unmount()

    def start(self) -> None:
        self.make_filesystem()
        self.mount()
        super().start()

    # -- the application -----------------------------------------------------------------------

    def _synced(self, fd: int, write: Callable[[], None], where: str) -> bool:
        try:
            with self.stall.timing():
                write()
                with self.fsync.timing():
                    os.fsync(fd)
            return True
        except OSError as exc:
            self._record_error(where, exc)
            return False

    def _run(self) -> None:
        log = os.open(os.path.join(self.mountpoint, self.LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        state = os.open(os.path.join(self.mountpoint, self.STATE), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            number = 0
            while not self._stop.is_set():
                number += 1
                line = f"{number:08d} {self.rng.randbytes(12).hex()}\n"
                self.lines[number] = line
                if self._synced(log, lambda: os.write(log, line.encode()), self.LOG):
                    self.acked_lines.append(number)
                if self.rewrite:
                    record = f"{number:08d} {self.rng.randbytes(8).hex()}".ljust(self.RECORD - 1) + "\n"
                    self.states[number] = record
                    if self._synced(state, lambda: os.pwrite(state, record.encode(), 0), self.STATE):
                        self.acked_state = number
                self._stop.wait(self.interval)
        finally:
            os.close(log)
            os.close(state)

    def rate(self) -> float:
        return len(self.acked_lines) / self.elapsed() if self.elapsed() else 0.0

    def summary(self) -> str:
        return (f"{self.fstype} appender: {len(self.acked_lines)} acknowledged lines in {self.elapsed():.1f} s "
                f"({self.rate():.0f}/s), {self.error_count} errors; fsync {self.fsync.summary()}")

    # -- the check -----------------------------------------------------------------------------

    def fsck(self) -> subprocess.CompletedProcess:
        argv = ["e2fsck", "-fn"] if self.fstype == "ext4" else ["xfs_repair", "-n"]
        return _run_tool([*argv, self.device])

    def _problems_in_log(self, text: str) -> list[str]:
        problems = []
        *complete, tail = text.split("\n")
        present, last = set(), 0
        for index, line in enumerate(complete, 1):
            number = int(line[:8]) if line[:8].isdigit() else None
            if number is None or self.lines.get(number) != line + "\n":
                problems.append(f"line {index} of {self.LOG} is not a line the host wrote: {line[:40]!r}")
                continue
            if number <= last:
                problems.append(f"line {index} of {self.LOG} is line {number} again or out of order (after {last})")
            present.add(number)
            last = max(last, number)
        if tail and not any(number not in self.acked_lines and written.startswith(tail)
                            for number, written in self.lines.items() if number > last):
            problems.append(f"{self.LOG} ends in a fragment the host never wrote: {tail[:40]!r}")
        lost = [n for n in self.acked_lines if n not in present]
        if lost:
            problems.append(f"{len(lost)} of {len(self.acked_lines)} acknowledged lines of {self.LOG} are LOST, "
                            f"first {lost[:5]}")
        return problems

    def _problems_in_state(self, text: str) -> list[str]:
        number = int(text[:8]) if text[:8].isdigit() else 0
        if self.states.get(number) != text:
            return [f"{self.STATE} holds no record the host wrote: {text[:40]!r}"]
        if number < self.acked_state:
            return [f"{self.STATE} holds record {number}, older than the acknowledged {self.acked_state}: LOST"]
        return []

    def check(self, allow_errors: bool = False) -> None:
        """Stops; umount, fsck clean, mount read-only, every acknowledged line there in order, umount."""
        self.stop()
        problems = self._problems_of_run(allow_errors)
        if not self.acked_lines:
            problems.append(f"the {self.fstype} appender never got a line acknowledged")
        self.unmount()
        if self.mounted:
            problems.append(f"{self.mountpoint} could not be unmounted")
        fsck = self.fsck()
        if fsck.returncode != 0:
            problems.append(f"{fsck.args[0]} found the filesystem damaged (exit {fsck.returncode}): {_tail(fsck)}")
        try:
            self.mount(read_only=True)
            with open(os.path.join(self.mountpoint, self.LOG)) as handle:
                problems += self._problems_in_log(handle.read())
            if self.rewrite:
                with open(os.path.join(self.mountpoint, self.STATE)) as handle:
                    problems += self._problems_in_state(handle.read())
        except (AssertionError, OSError, UnicodeDecodeError) as exc:
            problems.append(f"cannot read the files back: {exc}")
        finally:
            self.unmount()
        assert not problems, "\n".join(problems)


def run_during(workloads: Iterable[_Workload], action: Callable[[], object], settle: float = 0.5):
    """Start the workloads, let them run `settle` s, run `action`, let them run `settle` s more, stop them.

    Returns what the action returned; the workloads are stopped also when it raised. Call their
    check() afterwards.
    """
    workloads = list(workloads)
    with contextlib.ExitStack() as stack:
        for workload in workloads:
            stack.enter_context(workload)
        time.sleep(settle)
        result = action()
        time.sleep(settle)
    return result


@contextlib.contextmanager
def lab_of_size(size: int, backing_dir: str):
    """The lab (like conftest's lab_env) with a source volume of `size` bytes (sparse); yields the map device."""
    from blockmig.host import multipath

    lab.lab_down(backing_dir)
    lab.lab_up(size, backing_dir)
    try:
        found = multipath.map_for_wwid(lab.SOURCE_WWID)
        assert found is not None, "lab_up made no multipath map"
        yield found.device
    finally:
        lab.lab_down(backing_dir)
