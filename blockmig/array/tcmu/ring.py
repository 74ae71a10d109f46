"""The TCMU command ring of one uio device (linux/target_core_user.h, mailbox version 2).

The kernel appends entries at `cmd_head`; we fetch them in ring order, keep a
copy of each command's CDB and iovecs, and complete them in any order by
writing a response into the next command slot at `cmd_tail` (the kernel finds
the command by the `cmd_id` in that slot, as tcmu-runner does with
TCMU_MAILBOX_FLAG_CAP_OOOC). Pad and TMR entries only move the pointers.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass

from blockmig.errors import ArrayError
from blockmig.sysfs import read_attribute

MAILBOX_CMDR_OFF = 4
MAILBOX_CMDR_SIZE = 8
MAILBOX_CMD_HEAD = 12
MAILBOX_CMD_TAIL = 64  # its own cache line
OP_MASK = 0x7
OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2
ENTRY_IOV_CNT = 8
ENTRY_CDB_OFF = 24
ENTRY_IOVECS = 48
RSP_SENSE = 16
SENSE_BUFFER_SIZE = 96
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<IH")  # len_op, cmd_id
_RESPONSE = struct.Struct("<HBBBBHI")  # at entry+4: cmd_id, kflags, uflags; at +8: status, pads, read_len
_IOVEC = struct.Struct("<QQ")
_WAKE = b"\0\0\0\0"


@dataclass(slots=True)
class Command:
    """One SCSI command as fetched from the ring; `iovecs` are views into the data area."""

    cmd_id: int
    cdb: bytes
    iovecs: list[memoryview]
    fetched: float = 0.0  # time.monotonic() of the fetch: the host's latency as the array sees it

    @property
    def data_length(self) -> int:
        return sum(len(v) for v in self.iovecs)

    def copy_in(self, data: bytes) -> int:
        """Scatter `data` (data-in of an emulated command) into the iovecs; the bytes placed."""
        placed = 0
        for view in self.iovecs:
            if placed >= len(data):
                break
            part = data[placed:placed + len(view)]
            view[:len(part)] = part
            placed += len(part)
        return placed

    def gather(self) -> bytes:
        """The data-out buffer of the command (small parameter lists: UNMAP, MODE SELECT)."""
        return b"".join(bytes(v) for v in self.iovecs)


def find_uio_device(storage_object_name: str) -> str:
    """/dev/uioN of a TCMU storage object (the kernel names it tcm-user/HBA/NAME/SUBTYPE/CFG)."""
    base = "/sys/class/uio"
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        name = read_attribute(f"{base}/{entry}/name")
        parts = name.split("/", 3)
        if len(parts) == 4 and parts[0] == "tcm-user" and parts[2] == storage_object_name:
            return f"/dev/{entry}"
    raise ArrayError(
        f"no uio device serves TCMU storage object {storage_object_name}; is target_core_user loaded?"
    )


class CommandRing:
    """Fetch and complete commands of one uio device; `complete` may be called from any thread."""

    def __init__(self, uio_path: str):
        uio = os.path.basename(uio_path)
        size = int(read_attribute(f"/sys/class/uio/{uio}/maps/map0/size"), 0)
        fd = os.open(uio_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            ring_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise ArrayError(f"cannot map the command ring of {uio_path}: {exc.strerror}") from exc
        self._take(uio_path, fd, ring_map)

    @classmethod
    def over(cls, name: str, fd: int, ring_map: mmap.mmap) -> "CommandRing":
        """A ring over a map laid out as the kernel's (the unit tests' stand-in for a uio device)."""
        ring = cls.__new__(cls)
        ring._take(name, fd, ring_map)
        return ring

    def _take(self, uio_path: str, fd: int, ring_map: mmap.mmap) -> None:
        self.uio_path, self.fd, self._map = uio_path, fd, ring_map
        self.mem = memoryview(ring_map)
        self.cmdr_off = self._u32(MAILBOX_CMDR_OFF)
        self.cmdr_size = self._u32(MAILBOX_CMDR_SIZE)
        self._fetch = self._u32(MAILBOX_CMD_TAIL)  # a restarted handler resumes where the last one completed
        self._lock = threading.Lock()

    def _u32(self, offset: int) -> int:
        return _U32.unpack_from(self.mem, offset)[0]

    def _entry(self, ring_offset: int) -> int:
        return self.cmdr_off + ring_offset

    def wait(self) -> None:
        """Block until the kernel signals work (a 4-byte read of the uio fd)."""
        os.read(self.fd, 4)

    def restart_at_tail(self) -> None:
        """Forget fetched commands (after the kernel's reset_ring the ring is empty again)."""
        self._fetch = self._u32(MAILBOX_CMD_TAIL)

    def fetch(self) -> list[Command]:
        """Every command the kernel queued since the last fetch, in ring order."""
        mem, cmdr_off, size = self.mem, self.cmdr_off, self.cmdr_size
        head = _U32.unpack_from(mem, MAILBOX_CMD_HEAD)[0]
        commands, now = [], time.monotonic()
        while self._fetch != head:
            entry = cmdr_off + self._fetch
            len_op, cmd_id = _HEADER.unpack_from(mem, entry)
            length = len_op & ~OP_MASK
            if length == 0:
                raise ArrayError(f"the command ring of {self.uio_path} has an entry of length 0: broken")
            if len_op & OP_MASK == OP_CMD:
                iov_cnt = _U32.unpack_from(mem, entry + ENTRY_IOV_CNT)[0]
                cdb_off = _U64.unpack_from(mem, entry + ENTRY_CDB_OFF)[0]
                cdb = bytes(mem[cdb_off:cdb_off + _cdb_length(mem[cdb_off])])
                iovecs = []
                for at in range(entry + ENTRY_IOVECS, entry + ENTRY_IOVECS + 16 * iov_cnt, 16):
                    base, iov_len = _IOVEC.unpack_from(mem, at)
                    iovecs.append(mem[base:base + iov_len])
                commands.append(Command(cmd_id, cdb, iovecs, now))
            self._fetch = (self._fetch + length) % size
        return commands

    def complete(self, cmd_id: int, status: int, sense: bytes = b"", read_len: int | None = None,
                 notify: bool = True) -> None:
        """Write the response into the next command slot at the tail and move the tail; with `notify`
        tell the kernel too (else the caller's `notify` after a batch: one wake-up of the kernel each)."""
        mem = self.mem
        with self._lock:
            tail = _U32.unpack_from(mem, MAILBOX_CMD_TAIL)[0]
            while True:
                entry = self.cmdr_off + tail
                len_op = _U32.unpack_from(mem, entry)[0]
                if len_op & OP_MASK == OP_CMD:
                    break
                tail = (tail + (len_op & ~OP_MASK)) % self.cmdr_size
            _RESPONSE.pack_into(mem, entry + 4, cmd_id, 0, UFLAG_READ_LEN if read_len is not None else 0,
                                status, 0, 0, read_len or 0)
            if status:  # the kernel reads the sense buffer of a CHECK CONDITION only
                sense = sense[:SENSE_BUFFER_SIZE]
                sense_at = entry + RSP_SENSE
                mem[sense_at:sense_at + SENSE_BUFFER_SIZE] = sense.ljust(SENSE_BUFFER_SIZE, b"\0")
            _U32.pack_into(mem, MAILBOX_CMD_TAIL, (tail + (len_op & ~OP_MASK)) % self.cmdr_size)
            if notify:
                os.write(self.fd, _WAKE)

    def notify(self) -> None:
        """Tell the kernel that completions are in the ring (a 4-byte write of the uio fd)."""
        os.write(self.fd, _WAKE)

    def close(self) -> None:
        self.mem.release()
        self._map.close()
        os.close(self.fd)


def _cdb_length(opcode: int) -> int:
    """SCSI CDB length from its group code (SAM); variable-length (0x7f) CDBs are 8 bytes + field."""
    group = opcode >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group, 16 if opcode != 0x7F else 32)
