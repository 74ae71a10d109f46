"""The backstore process: one served volume, its TCMU storage objects, rings and control socket.

One process per served volume (not a daemon per array host): a handler bug or
a kill -9 stalls one volume, never the array's others; its RSS and CPU are
that volume's; systemd's template unit (blockmig-backstore@NAME.service)
restarts exactly it; and the interface stays what could cross machines: a
command line to start, a unix socket to arm/disarm/query, the state file as
the shared truth.

TCMU does not tell the handler which initiator sent a command (the ring
entry has the CDB and iovecs only; configfs has no per-command nexus). So
the nexus is made knowable by LUN mapping: with a guard initiator, the
volume is served as two storage objects on the same backing with the same
serial (same WWID, same NAA): `NAME` for the host and everyone else, and
`NAME-migrator`, whose LUN only the guard initiator's ACL may map (checked
against configfs before every guarded write; demo-mode TPGs and any other
ACL mapping it make it refuse writes). The guard applies to the migrator's
object; the host's object refuses writes until the volume is handed over.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from blockmig.array import lio
from blockmig.array.tcmu import scsi
from blockmig.array.tcmu.guard import ArrayGuard
from blockmig.array.tcmu.pace import FLOOR_RATE, HostFirst
from blockmig.array.tcmu.passthrough import PassThrough
from blockmig.array.tcmu.ring import Command, CommandRing, find_uio_device
from blockmig.array.tcmu.storage import Backing
from blockmig.errors import ArrayError, BlockmigError, UsageError
from blockmig.safefile import write_atomically
from blockmig.sysfs import read_attribute

SUBTYPE = "blockmig"
STATE_DIR = "/var/lib/blockmig/backstore"
RUN_DIR = "/run/blockmig"
MIGRATOR_SUFFIX = "-migrator"
HW_MAX_SECTORS = 2048
DEFAULT_DATA_AREA_MB = 32
MAPPING_CHECK_SECONDS = 1.0
REMOVAL_SECONDS = 5.0  # how long a failed ring waits for its storage object's folder to go
CONFIGFS_CORE = "/sys/kernel/config/target/core"


def state_path(name: str, state_dir: str = STATE_DIR) -> str:
    return os.path.join(state_dir, f"{name}.json")


def chunk_map_path(name: str, state_dir: str = STATE_DIR) -> str:
    return os.path.join(state_dir, f"{name}.chunks")


def socket_path(name: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"backstore-{name}.sock")


@dataclass
class ServeRequest:
    """What `blockmig array serve` was asked: one volume, its backing, identity and guard."""

    name: str
    backing: str
    size: int | None = None
    serial: str | None = None
    migrator_serial: str | None = None  # the migrator's view's own (a WWID the host's multipathd ignores)
    geometry: dict = field(default_factory=dict)
    guard_initiator: str | None = None
    state_dir: str = STATE_DIR
    run_dir: str = RUN_DIR
    data_area_mb: int = DEFAULT_DATA_AREA_MB
    workers: int = 8
    source: str | None = None  # pass the host's view through to this device (passthrough.py)
    chunk_size: int = 0  # the migration's chunk: the pass-through's dirty map counts in it
    min_rate: int = FLOOR_RATE  # the copy's floor while it yields to the host's IO (pace.py)


@dataclass
class View:
    """One storage object of the volume with its ring; `role` is "host" or "migrator"."""

    role: str
    so: object
    ring: CommandRing
    emulation: scsi.Emulation
    mapping_checked: float = 0.0
    mapping_ok: bool = False
    completed_inline: bool = False  # completions in the ring the kernel has not been told of yet


class Stop(Exception):
    """SIGTERM or SIGINT: leave the serve loop and remove what was made."""


def _raise_stop(signum, frame):
    raise Stop()


def _rtslib():
    try:
        import rtslib_fb
    except ImportError as exc:
        raise ArrayError("rtslib-fb is not installed (apt install python3-rtslib-fb)") from exc
    return rtslib_fb


def _find_so(rtslib, name: str):
    for so in rtslib.RTSRoot().storage_objects:
        if so.name == name:
            return so
    return None


def free_user_hba_index() -> int:
    """The next free user_N HBA in configfs: rtslib picks from its own process's cache, so two
    handler processes (or a handler and tcmu-runner's objects) would collide without it."""
    used = {int(e[5:]) for e in os.listdir(CONFIGFS_CORE) if e.startswith("user_") and e[5:].isdigit()}
    return next(i for i in range(len(used) + 1) if i not in used)


def _config_of(name: str) -> str:
    return f"{SUBTYPE}/{name}"


def _create_or_adopt(rtslib, name: str, size: int, serial: str | None, data_area_mb: int, block_size: int):
    """A new user-backed storage object, or the one a killed handler left (same config): adopt it."""
    so = _find_so(rtslib, name)
    if so is not None:
        config = getattr(so, "config", None)
        if so.plugin != "user" or config != _config_of(name):
            raise ArrayError(f"a storage object named {name} already exists and is not this backstore's")
        if so.size != size:
            raise ArrayError(f"storage object {name} holds {so.size} bytes, not the {size} asked for")
        return so, False
    try:
        so = rtslib.UserBackedStorageObject(
            name, config=_config_of(name), size=size, wwn=serial, hw_max_sectors=HW_MAX_SECTORS,
            control=f"nl_reply_supported=-1,max_data_area_mb={data_area_mb},hw_block_size={block_size}",
            index=free_user_hba_index(),
        )
    except rtslib.RTSLibError as exc:
        raise ArrayError(f"cannot create TCMU storage object {name}: {exc}") from exc
    return so, True


def _reset_ring(so) -> None:
    """Fail what a dead handler left in flight with BUSY (the host retries it), empty the ring."""
    action = f"{so.path}/action"
    for name, value in (("block_dev", "1"), ("reset_ring", "1"), ("block_dev", "0")):
        with open(f"{action}/{name}", "w") as f:
            f.write(value)


def _first_number(text: str, label: str) -> int | None:
    for line in text.splitlines():
        if line.strip().startswith(label):
            try:
                return int(line.split(":", 1)[1].strip())
            except ValueError:
                return None
    return None


def port_identity(so) -> scsi.PortIdentity | None:
    """The target port the storage object is exported through (its first LUN), read from configfs."""
    luns = list(so.attached_luns)
    if not luns:
        return None
    lun = luns[0]
    tpg = lun.parent_tpg
    rtpi_path = f"{tpg.path}/rtpi"
    rtpi = int(read_attribute(rtpi_path)) if os.path.exists(rtpi_path) else 1
    tg_pt_gp_id = access_type = None
    gp_path = f"{lun.path}/alua_tg_pt_gp"
    if os.path.exists(gp_path):
        text = read_attribute(gp_path)
        tg_pt_gp_id = _first_number(text, "TG Port Group ID")
        alias = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if "Alua Group" in ln), "")
        type_path = f"{so.path}/alua/{alias}/alua_access_type"
        kind = read_attribute(type_path) if alias and os.path.exists(type_path) else "Implicit and Explicit"
        access_type = (0x10 if "Implicit" in kind else 0) | (0x20 if "Explicit" in kind else 0)
    lu_gp_path = f"{so.path}/alua_lu_gp"
    lu_gp_id = None
    if os.path.exists(lu_gp_path):
        lu_gp_id = _first_number(read_attribute(lu_gp_path), "LU Group ID")
    return scsi.PortIdentity(
        target_wwn=tpg.parent_target.wwn, tpgt=tpg.tag, rtpi=rtpi, tg_pt_gp_id=tg_pt_gp_id,
        alua_access_type=access_type if access_type is not None else 0x30, lu_gp_id=lu_gp_id,
    )


def initiators_mapping(so) -> set[str]:
    """Initiator names whose ACL maps a LUN of the storage object; "*" when a TPG is in demo mode."""
    names = set()
    for lun in so.attached_luns:
        if lun.parent_tpg.get_attribute("generate_node_acls") == "1":
            names.add("*")
        for mapped in lun.mapped_luns:
            names.add(mapped.parent_nodeacl.node_wwn)
    return names


class VolumeServer:
    """Serves one volume until stopped; see the module docstring for the views and the guard."""

    def __init__(self, request: ServeRequest):
        self.request = request
        self.views: list[View] = []
        self.made: list[object] = []
        self.backing: Backing | None = None
        self.guard = ArrayGuard(state_path(request.name, request.state_dir), request.name)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=request.workers)
        # the migrator's writes, one thread: in the ring's order, and never in the ring's own thread (a
        # 1 MiB O_DSYNC write there held every host command for its length: ~100 ms under TCG)
        self._migrator_writes = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                      thread_name_prefix="migrator-writes")
        self.pacer = HostFirst(request.min_rate)  # the migrator's writes yield to the host's IO
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self.identity: scsi.Identity | None = None
        self.passthrough: PassThrough | None = None
        self._commit_lock = threading.Lock()

    # --- setup ----------------------------------------------------------------------------
    def start(self) -> list[tuple[str, str, str]]:
        """Create (or adopt) the storage objects and take their rings; (role, object, /dev/uioN) each."""
        req = self.request
        self.backing = Backing(req.backing)
        size = req.size if req.size is not None else self.backing.size
        if size <= 0 or size > self.backing.size:
            raise UsageError(f"size {size} does not fit backing {req.backing} ({self.backing.size} bytes)")
        if req.source:  # the host uses the volume from the start: through to the source until the commit
            if not req.guard_initiator:
                raise UsageError("pass-through to a source needs the migrator's view (--guard-initiator)")
            if self.guard.is_new:
                self.guard.set_pass_through(True)
            self.guard.set_receiving(False, req.guard_initiator)
            self.passthrough = PassThrough(req.source, self.backing, self.guard, chunk_map_path(
                req.name, req.state_dir), size, req.chunk_size)
        elif req.guard_initiator:  # a new volume receives (refuses the host's writes) until handed over
            receiving = True if self.guard.is_new else self.guard.state.receiving
            self.guard.set_receiving(receiving, req.guard_initiator)
        rtslib = _rtslib()
        roles = [("host", req.name)]
        if req.guard_initiator:
            roles.append(("migrator", req.name + MIGRATOR_SUFFIX))
        for role, name in roles:
            block_size = int(req.geometry.get("block_size", 512))
            serial = req.migrator_serial if role == "migrator" and req.migrator_serial else req.serial
            so, created = _create_or_adopt(rtslib, name, size, serial, req.data_area_mb, block_size)
            if created:
                self.made.append(so)
                lio._apply_geometry(so, {k: v for k, v in req.geometry.items() if _settable(so, k)})
            if req.serial is None and role == "host":
                req.serial = so.wwn
            geometry = lio._read_geometry(so)
            geometry.update(req.geometry)
            identity = scsi.Identity.from_geometry(size, so.wwn, geometry)
            self.identity = identity
            _reset_ring(so)
            ring = CommandRing(find_uio_device(name))
            ring.restart_at_tail()
            view = View(role, so, ring, scsi.Emulation(identity, port_lookup=lambda so=so: port_identity(so)))
            self.views.append(view)
            self._selector.register(ring.fd, selectors.EVENT_READ, view)
        self._listen()
        return [(v.role, v.so.name, v.ring.uio_path) for v in self.views]

    def _listen(self) -> None:
        path = socket_path(self.request.name, self.request.run_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(8)
        self._selector.register(self._listener, selectors.EVENT_READ, None)

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.data is None:
                        self._answer_control()
                        continue
                    view = key.data
                    self._wait(view)
                    for command in view.ring.fetch():
                        self._dispatch(view, command)
                    if view.completed_inline:  # one wake-up of the kernel for the batch's completions
                        view.completed_inline = False
                        view.ring.notify()
        except Stop:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait(self, view: View) -> None:
        """The ring's wake-up; a uio device that fails because its storage object was removed under us
        (an admin's `targetcli` delete, not a crash) is journaled as such, and serving ends."""
        try:
            view.ring.wait()
        except OSError as exc:
            # The kernel fails the ring inside the removal's rmdir: the folder goes a moment later.
            deadline = time.monotonic() + REMOVAL_SECONDS
            while os.path.exists(view.so.path) and time.monotonic() < deadline:
                time.sleep(0.1)
            if os.path.exists(view.so.path):
                raise
            self.guard.set_removed(view.so.name)
            raise ArrayError(f"storage object {view.so.name} was removed while served; stopped serving "
                             f"volume {self.request.name}") from exc

    def _dispatch(self, view: View, command: Command) -> None:
        """Answer a command in the ring's thread, or hand it to a worker if it would wait for the medium."""
        try:
            decoded = view.emulation.decode(command.cdb, command.data_length)
            if decoded.reply is not None:
                self._complete(view, command, decoded.reply)
                return
            transfer, backing = decoded.transfer, self._backing_for(view)
            op = transfer.opcode
            if op in scsi.MODIFYING:
                if view.role == "migrator":  # its own thread: the ring goes on serving the host meanwhile
                    self._migrator_writes.submit(self._admit_migrator_write, view, command, decoded)
                    return
                refusal = self._write_refusal(view, transfer)
                if refusal is not None:
                    self._complete(view, command, refusal)
                    return
                if backing is self.passthrough and self.passthrough.park(
                        transfer.offset, transfer.length,
                        lambda: self._pool.submit(self._execute, view, command, decoded, notify=True)):
                    return  # a write to a chunk the commit holds: no worker waits for it
            if op in scsi.READS and not backing.in_memory:
                if backing.read_cached(transfer.offset, _limit(command.iovecs, transfer.length)):
                    self._complete(view, command, scsi.Reply())
                else:
                    self._pool.submit(self._execute, view, command, decoded, notify=True)
            elif op in scsi.WRITES and not backing.in_memory:
                self._pool.submit(self._execute, view, command, decoded, notify=True)
            else:
                self._execute(view, command, decoded)
        except Exception:  # a command must never hang: answer it, then let the error be seen
            self._complete(view, command, scsi.Reply.check(scsi.MEDIUM_ERROR, scsi.WRITE_ERROR), notify=True)
            raise

    def _admit_migrator_write(self, view: View, command: Command, decoded: scsi.Decoded) -> None:
        """One migrator write at a time, in ring order: the guard's check, the write and the reserved
        address's advance under one admission (a second write is checked against the advanced address)."""
        try:
            # pass 1 only: a delta pass is what converges, and the host's writes decide how much it has to do
            state = self.guard.state
            if self.passthrough is not None and state.pass_through and state.mode == "sequential":
                self.pacer.pace(decoded.transfer.length)
            with self.guard.admission:
                refusal = self._write_refusal(view, decoded.transfer)
                if refusal is not None:
                    self._complete(view, command, refusal, notify=True)
                    return
                self._execute(view, command, decoded, guarded=self.guard.state.mode != "off", notify=True)
        except Exception:  # a command must never hang
            self._complete(view, command, scsi.Reply.check(scsi.MEDIUM_ERROR, scsi.WRITE_ERROR), notify=True)
            raise

    def _write_refusal(self, view: View, transfer: scsi.Transfer) -> scsi.Reply | None:
        state = self.guard.state
        if view.role == "host":
            if state.receiving:
                return scsi.Reply.check(scsi.DATA_PROTECT, scsi.SOFTWARE_WRITE_PROTECTED)
            return None
        if not self._only_guard_initiator_maps(view):
            return scsi.Reply.check(scsi.DATA_PROTECT, scsi.SOFTWARE_WRITE_PROTECTED)
        if state.mode == "off":
            return None
        if transfer.opcode not in scsi.WRITES or not self.guard.admits(transfer.offset, transfer.length):
            return scsi.Reply.check(scsi.DATA_PROTECT, scsi.WRITE_PROTECTED)
        return None

    def _only_guard_initiator_maps(self, view: View) -> bool:
        now = time.monotonic()
        if now - view.mapping_checked > MAPPING_CHECK_SECONDS:
            mapping = initiators_mapping(view.so)
            view.mapping_ok = mapping <= {self.request.guard_initiator}
            view.mapping_checked = now
        return view.mapping_ok

    def _backing_for(self, view: View):
        """Where a view's IO goes: the destination's backing, or for the host's view until the commit
        the pass-through (the source, with the destination kept current)."""
        if view.role == "host" and self.passthrough is not None and self.guard.state.pass_through:
            return self.passthrough
        return self.backing

    def _execute(self, view: View, command: Command, decoded: scsi.Decoded, guarded: bool = False,
                 notify: bool = False) -> None:
        transfer, backing = decoded.transfer, self._backing_for(view)
        op = transfer.opcode
        reply = scsi.Reply()
        try:
            if op in scsi.READS:
                backing.read_into(transfer.offset, _limit(command.iovecs, transfer.length))
            elif op in scsi.WRITES:
                backing.write_from(transfer.offset, _limit(command.iovecs, transfer.length))
                if guarded:
                    self.guard.executed(transfer.offset, transfer.length)
            elif op in (scsi.SYNCHRONIZE_CACHE_10, scsi.SYNCHRONIZE_CACHE_16):
                backing.flush()
            elif op in (scsi.WRITE_SAME_10, scsi.WRITE_SAME_16):
                reply = self._write_same(view, command, transfer, decoded.extra["unmap"])
            elif op == scsi.UNMAP:
                ranges = view.emulation.decode_unmap(command.gather())
                if isinstance(ranges, scsi.Reply):
                    reply = ranges
                else:
                    for offset, length in ranges:
                        backing.discard(offset, length)
            elif op == scsi.COMPARE_AND_WRITE:
                reply = self._compare_and_write(view, command, transfer)
            elif op in (scsi.MODE_SELECT_6, scsi.MODE_SELECT_10):
                reply = view.emulation.mode_select(command.cdb, command.gather())
        except OSError:
            key_asc = scsi.UNRECOVERED_READ_ERROR if op in scsi.READS else scsi.WRITE_ERROR
            reply = scsi.Reply.check(scsi.MEDIUM_ERROR, key_asc)
        self._complete(view, command, reply, notify)

    def _write_same(self, view, command, transfer, unmap: bool) -> scsi.Reply:
        block = command.gather()[:view.emulation.identity.block_size]
        backing = self._backing_for(view)
        if unmap and not any(block):
            backing.discard(transfer.offset, transfer.length)
        else:
            backing.write_same(transfer.offset, transfer.length, block)
        return scsi.Reply()

    def _compare_and_write(self, view, command, transfer) -> scsi.Reply:
        data = command.gather()
        backing = self._backing_for(view)
        current = backing.read(transfer.offset, transfer.length)
        verify = data[:transfer.length]
        if current != verify:
            first = next(i for i in range(transfer.length) if current[i] != verify[i])
            return scsi.Reply.check(scsi.MISCOMPARE, scsi.MISCOMPARE_DURING_VERIFY, first)
        backing.write(transfer.offset, data[transfer.length:2 * transfer.length])
        return scsi.Reply()

    def _complete(self, view: View, command: Command, reply: scsi.Reply, notify: bool = False) -> None:
        """Answer a command; a worker (`notify`) wakes the kernel itself, the ring's thread once per batch."""
        read_len = None
        if reply.data is not None:
            read_len = command.copy_in(reply.data)
        if not notify:
            view.completed_inline = True
        view.ring.complete(command.cmd_id, reply.status, reply.sense, read_len, notify=notify)
        if view.role == "host" and self.passthrough is not None:
            self.pacer.host_done(command.fetched)

    # --- control ---------------------------------------------------------------------------
    def _answer_control(self) -> None:
        """Each request in a thread of its own: a commit copies chunks, the rings go on meanwhile."""
        conn, _ = self._listener.accept()
        threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                line = conn.makefile("rb").readline()
                answer = self.control(json.loads(line))
            except (ValueError, OSError, TypeError, KeyError, BlockmigError) as exc:
                answer = {"ok": False, "error": str(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def control(self, request: dict) -> dict:
        """One control request: state, arm_sequential, arm_delta, disarm, hand_over, receive; pass-through's
        take_dirty, redo, copied, commit."""
        op, taken, clean, committed = request["op"], None, None, None
        if op == "arm_sequential":
            self.guard.arm_sequential(int(request.get("reserved", 0)), int(request.get("window", 0)))
        elif op == "arm_delta":
            self.guard.arm_delta(request["chunks"])
        elif op == "disarm":
            self.guard.disarm()
        elif op == "hand_over":
            self.guard.set_receiving(False)
        elif op == "receive":
            self.guard.set_receiving(True)
        elif op == "take_dirty":  # pass-through: the chunks the next delta pass copies again
            taken = self._passthrough(op).chunks.take_dirty()
        elif op == "redo":  # pass-through: chunks unlike the migrator's manifest (the clean ones answered)
            clean = self._passthrough(op).chunks.redo([int(c) for c in request["chunks"]])
        elif op == "copied":  # pass-through: a delta pass copied these chunks
            self._passthrough(op).chunks.copied([int(c) for c in request["chunks"]])
        elif op == "commit":  # pass-through ends: the destination is the volume (the source gets no more)
            committed = self._commit()
        elif op != "state":
            raise UsageError(f"unknown control request {op!r}")
        state = self.guard.state
        return {
            "ok": True, "volume": state.volume, "mode": state.mode, "reserved": state.reserved_address(),
            "receiving": state.receiving, "guard_initiator": state.guard_initiator,
            "views": {v.role: {"storage_object": v.so.name, "uio": v.ring.uio_path} for v in self.views},
            "pid": os.getpid(), "pass_through": state.pass_through,
            **({"dirty_chunks": self.passthrough.chunks.dirty_count(),
                "yielded_seconds": round(self.pacer.yielded, 3)} if self.passthrough else {}),
            **({"taken": taken} if taken is not None else {}),
            **({"clean": clean} if clean is not None else {}),
            **({"commit": committed or self._saved_commit()} if self.passthrough else {}),
        }

    def _passthrough(self, op: str) -> PassThrough:
        if self.passthrough is None:
            raise UsageError(f"{op}: this volume is not passed through to a source")
        return self.passthrough

    def _commit_path(self) -> str:
        return state_path(self.request.name, self.request.state_dir) + ".commit"

    def _saved_commit(self) -> dict | None:
        """What the commit copied last (the migrator killed while it ran reads it here)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(self._commit_path()) as f:
                return json.load(f)
        return None

    def _commit(self) -> dict:
        """Once: a second commit (the migrator resumed) returns the first one's record."""
        passthrough = self._passthrough("commit")
        with self._commit_lock:
            if not self.guard.state.pass_through:
                saved = self._saved_commit()
                if saved is None:
                    raise ArrayError(f"{self.request.name} is committed but its commit record is gone")
                return saved
            record = passthrough.commit_pending(
                lambda result: write_atomically(self._commit_path(), json.dumps(result).encode(), mode=0o600))
            return record

    # --- teardown --------------------------------------------------------------------------
    def stop(self, remove: bool = True) -> None:
        """Finish in-flight commands, release the rings, remove the storage objects."""
        self._migrator_writes.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(self.request.name, self.request.run_dir))
        for view in self.views:
            with contextlib.suppress(BufferError):
                view.ring.close()
        if remove:
            for so in _unique([v.so for v in self.views] + self.made):
                so.delete()
        if self.passthrough is not None:
            self.passthrough.close()
        if self.backing is not None:
            self.backing.close()


# What a TCMU storage object takes from a source's geometry in configfs (block size goes in as
# hw_block_size at creation); the handler presents the rest itself. Not emulate_write_cache: the
# handler answers the caching mode page and the VPD itself (scsi.Identity.write_cache), and the kernel's
# store of it for a TCMU device sends a netlink event no one listens to and fails with ESRCH.
_SETTABLE = frozenset({"vendor_id", "product_id", "revision"})


def _settable(so, name: str) -> bool:
    return name in _SETTABLE and os.path.exists(lio._geometry_path(so, name))


def _limit(views: list[memoryview], length: int) -> list[memoryview]:
    out, left = [], length
    for view in views:
        if left <= 0:
            break
        out.append(view[:left])
        left -= len(out[-1])
    return out


def prepare_backing_file(path: str, size: int) -> None:
    """A sparse file of `size` bytes, or the same file a previous handler served (same size)."""
    if size <= 0 or size % 512:
        raise UsageError(f"volume size {size} must be a positive multiple of 512 bytes")
    if os.path.exists(path):
        existing = os.path.getsize(path)
        if existing != size:
            raise UsageError(f"backing file {path} holds {existing} bytes, not the {size} asked for")
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"backing directory {directory} does not exist")
    lio.check_free_space(directory, size)
    with open(path, "xb") as f:
        f.truncate(size)


def _unique(objects: list) -> list:
    seen, out = set(), []
    for obj in objects:
        if obj.name not in seen:
            seen.add(obj.name)
            out.append(obj)
    return out
