"""The handler's ring and dispatch over a map laid out as the kernel's (mailbox v2): what a batch of
commands gets back, where it runs and how often the kernel is woken. The lab (test_backstore.py)
serves the same code through the real target_core_user ring."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from blockmig.array.tcmu import ring as tcmu_ring
from blockmig.array.tcmu import scsi, service
from blockmig.array.tcmu.storage import Backing

CMDR_OFF, CMDR_SIZE = 128, 1 << 16
DATA_OFF = CMDR_OFF + CMDR_SIZE
ENTRY = 128  # the response (sense at +16, 96 bytes) overlaps the iovecs and the CDB, as in the kernel's
BLOCK = 4096
VOLUME = 1 << 20
SERIAL = "0123456789abcdef0123456789abcdef"


class FakeKernel:
    """Queues CDBs in the ring as target_core_user does and reads the responses back."""

    def __init__(self, commands: int = 64):
        self.map = mmap.mmap(-1, DATA_OFF + commands * BLOCK)
        struct.pack_into("<III", self.map, 0, 2, CMDR_OFF, CMDR_SIZE)
        self.head = 0
        self.wakeups_r, self.wakeups_w = os.pipe()
        os.set_blocking(self.wakeups_r, False)
        self.ring = tcmu_ring.CommandRing.over("fake-uio", self.wakeups_w, self.map)
        self.queued: dict[int, int] = {}  # cmd_id -> entry offset in the ring

    def queue(self, cdb: bytes, slot: int, data: bytes = b"") -> int:
        """One command whose data buffer is slot `slot` of the data area; its cmd_id."""
        entry, cmd_id = CMDR_OFF + self.head, len(self.queued) + 1
        struct.pack_into("<IH", self.map, entry, ENTRY | tcmu_ring.OP_CMD, cmd_id)
        struct.pack_into("<I", self.map, entry + tcmu_ring.ENTRY_IOV_CNT, 1)
        struct.pack_into("<Q", self.map, entry + tcmu_ring.ENTRY_CDB_OFF, entry + 112)
        struct.pack_into("<QQ", self.map, entry + tcmu_ring.ENTRY_IOVECS, DATA_OFF + slot * BLOCK, BLOCK)
        self.map[entry + 112:entry + 112 + len(cdb)] = cdb
        self.map[DATA_OFF + slot * BLOCK:DATA_OFF + slot * BLOCK + len(data)] = data
        self.queued[cmd_id] = entry
        self.head += ENTRY
        struct.pack_into("<I", self.map, tcmu_ring.MAILBOX_CMD_HEAD, self.head)
        return cmd_id

    def responses(self) -> dict[int, tuple[int, bytes]]:
        """cmd_id -> (status, sense) of every completed slot up to the tail."""
        tail = struct.unpack_from("<I", self.map, tcmu_ring.MAILBOX_CMD_TAIL)[0]
        out = {}
        for entry in range(CMDR_OFF, CMDR_OFF + tail, ENTRY):
            cmd_id = struct.unpack_from("<H", self.map, entry + 4)[0]
            out[cmd_id] = (self.map[entry + 8], bytes(self.map[entry + 16:entry + 34]))
        return out

    def wakeups(self) -> int:
        try:
            return len(os.read(self.wakeups_r, 4096)) // 4
        except BlockingIOError:
            return 0

    def data(self, slot: int) -> bytes:
        return bytes(self.map[DATA_OFF + slot * BLOCK:DATA_OFF + (slot + 1) * BLOCK])


def rw10(op: int, offset: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", op, 0, offset // BLOCK, 0, blocks, 0)


def serve_one_batch(server: service.VolumeServer, view: service.View) -> None:
    """What VolumeServer.run does after a wake-up (without the uio read and the selector)."""
    for command in view.ring.fetch():
        server._dispatch(view, command)
    if view.completed_inline:
        view.completed_inline = False
        view.ring.notify()
    server._pool.shutdown(wait=True)


@pytest.fixture
def served(tmp_path):
    backing = tmp_path / "volume.img"
    backing.write_bytes(bytes(i % 251 for i in range(VOLUME)))
    kernel = FakeKernel()
    folder = str(tmp_path)
    request = service.ServeRequest(name="v", backing=str(backing), state_dir=folder, run_dir=folder)
    server = service.VolumeServer(request)
    server.backing = Backing(str(backing))
    identity = scsi.Identity.from_geometry(VOLUME, SERIAL, {"block_size": BLOCK})
    view = service.View("host", None, kernel.ring, scsi.Emulation(identity, port_lookup=lambda: None))
    yield kernel, server, view, backing
    server.backing.close()


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory medium", "other medium"])
def test_a_batch_is_answered_whole_with_one_wakeup_of_the_kernel_for_the_ring_threads_part(served, in_memory):
    kernel, server, view, backing = served
    server.backing.in_memory = in_memory
    if not in_memory:
        server.backing._nowait = False  # nothing is known to be cached: every read goes to a worker
    reads = {kernel.queue(rw10(scsi.READ_10, i * BLOCK), slot=i): i for i in range(8)}
    written = os.urandom(BLOCK)
    write = kernel.queue(rw10(scsi.WRITE_10, 9 * BLOCK), slot=9, data=written)
    out_of_range = kernel.queue(rw10(scsi.READ_10, VOLUME), slot=10)
    serve_one_batch(server, view)
    answers = kernel.responses()
    assert set(answers) == set(reads) | {write, out_of_range}  # every command answered, once
    assert all(answers[c][0] == scsi.GOOD for c in (*reads, write))
    status, sense = answers[out_of_range]
    assert status == scsi.CHECK_CONDITION and sense[2] & 0xF == scsi.ILLEGAL_REQUEST and sense[12] == 0x21
    content = backing.read_bytes()
    assert all(kernel.data(slot) == content[slot * BLOCK:(slot + 1) * BLOCK] for slot in reads.values())
    assert content[9 * BLOCK:10 * BLOCK] == written
    # The ring's thread wakes the kernel once for all it answered; a worker once per command it ran.
    assert kernel.wakeups() == (1 if in_memory else 1 + 9)


def test_a_good_completion_leaves_the_slots_bytes_past_the_status_alone(served):
    kernel, server, view, _ = served
    server.backing.in_memory = True
    cmd_id = kernel.queue(rw10(scsi.READ_10, 0), slot=0)
    entry = kernel.queued[cmd_id]
    before = bytes(kernel.map[entry + 16:entry + 112])
    serve_one_batch(server, view)
    assert kernel.responses()[cmd_id][0] == scsi.GOOD
    assert bytes(kernel.map[entry + 16:entry + 112]) == before  # no sense written (the kernel reads none)


def test_reads_the_page_cache_holds_run_in_the_ring_thread(served):
    kernel, server, view, backing = served  # just written: its pages are cached
    server.backing.in_memory = False
    assert server.backing.read_cached(0, [memoryview(bytearray(BLOCK))]), \
        f"{backing.parent} has no non-blocking cached reads (RWF_NOWAIT): ext4 and xfs have"
    submitted = []
    server._pool.submit = lambda *a, **k: submitted.append(a)  # would a read go to a worker?
    for i in range(4):
        kernel.queue(rw10(scsi.READ_10, i * BLOCK), slot=i)
    serve_one_batch(server, view)
    assert submitted == [] and kernel.wakeups() == 1
    assert all(status == scsi.GOOD for status, _ in kernel.responses().values())
    assert kernel.data(3) == backing.read_bytes()[3 * BLOCK:4 * BLOCK]


def test_a_read_of_a_page_not_cached_goes_to_a_worker(served):
    kernel, server, view, _ = served
    server.backing.in_memory = False
    server.backing.read_cached = lambda offset, views: False  # as RWF_NOWAIT answers EAGAIN
    cmd_id = kernel.queue(rw10(scsi.READ_10, 0), slot=0)
    serve_one_batch(server, view)
    assert kernel.responses()[cmd_id][0] == scsi.GOOD and kernel.wakeups() == 1  # the worker's
    assert not view.completed_inline


def test_a_ring_failing_because_its_object_was_removed_is_journaled_and_ends_serving(served, tmp_path,
                                                                                     monkeypatch):
    kernel, server, view, _ = served

    class Removed:
        name, path = "v", str(tmp_path / "configfs-gone")

    def fail():
        raise OSError(5, "Input/output error")

    view.so, view.ring.wait = Removed(), fail
    with pytest.raises(service.ArrayError, match="storage object v was removed while served"):
        server._wait(view)
    assert server.guard.state.removed == "v"
    Removed.path = str(tmp_path)  # the object is there: an IO error of the ring is a bug, raised as such
    monkeypatch.setattr(service, "REMOVAL_SECONDS", 0.2)
    with pytest.raises(OSError):
        server._wait(view)
