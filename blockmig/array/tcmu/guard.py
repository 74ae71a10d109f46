"""The claim's guard inside the array, journaled so that a restarted handler continues.

While a copy runs, the migrator's view of the volume executes a write only at
the reserved write address (the total already written) and answers any other
write with CHECK CONDITION, DATA PROTECT, WRITE PROTECTED (0x27/0x00) before a
byte is written. The delta mode is blockmig.datapath.guard.DeltaGuard's rule:
an ascending list of chunks, only the next one, whole (the host's block layer
may split a chunk into several SCSI writes; they must come in order and end at
the chunk's end before the next chunk is admitted). Until the volume is handed
to the host (`receiving`), every other view refuses writes (0x27/0x02).

The state file is the shared truth between the handler, blockmig and the
admin: rewritten atomically (temp file, fsync, rename, fsync of the
directory) after every executed guarded write and before its completion is
sent. The last executed extent is kept too: a write the dead handler executed
but never completed comes again (the ring is reset BUSY on restart) and is
re-executed without advancing, instead of being refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field

from blockmig.errors import ArrayError

MODES = ("off", "sequential", "delta")


@dataclass
class GuardState:
    volume: str
    mode: str = "off"
    reserved: int = 0
    chunks: list[list[int]] = field(default_factory=list)
    chunk_index: int = 0
    chunk_done: int = 0
    last_executed: list[int] | None = None
    receiving: bool = False
    guard_initiator: str | None = None
    window: int = 0  # how far past the reserved address the migrator may have read (pass-through)
    pass_through: bool = False  # the host's view reaches the source (passthrough.py) until the commit
    removed: str | None = None  # a storage object taken away while served (an admin's removal, not a crash)

    def reserved_address(self) -> int | None:
        """Where the next guarded write must start; None when a delta pass is complete."""
        if self.mode == "delta":
            if self.chunk_index >= len(self.chunks):
                return None
            return self.chunks[self.chunk_index][0] + self.chunk_done
        return self.reserved


def _check_chunks(chunks) -> list[list[int]]:
    checked, end = [], -1
    for chunk in chunks:
        offset, length = (int(v) for v in chunk)
        if offset < 0 or length <= 0 or offset < end:
            raise ArrayError("delta chunks must be ascending, non-overlapping (offset, length) pairs")
        checked.append([offset, length])
        end = offset + length
    return checked


class ArrayGuard:
    """The state of one served volume's guard, loaded from and saved to its state file."""

    def __init__(self, path: str, volume: str):
        self.path = path
        self._lock = threading.Lock()
        # Held by the migrator-writes thread from a write's admission to its journaling: arming (from a
        # control thread) never changes the rule between the two.
        self.admission = threading.Lock()
        self.is_new = not os.path.exists(path)
        self.state = GuardState(volume) if self.is_new else load_state(path)
        if self.state.volume != volume:
            raise ArrayError(f"state file {path} belongs to volume {self.state.volume}, not {volume}")

    # --- control (from blockmig over the socket) --------------------------------------------
    def arm_sequential(self, reserved: int = 0, window: int = 0) -> None:
        """Before the migrator's first read: `window` is how far past the reserved address it reads ahead."""
        if int(window) < 0:
            raise ArrayError(f"read-ahead window {window} must not be negative")
        with self.admission, self._lock:
            self.state.mode, self.state.reserved, self.state.last_executed = "sequential", int(reserved), None
            self.state.window = int(window)
            self._save()

    def arm_delta(self, chunks) -> None:
        with self.admission, self._lock:
            self.state.mode, self.state.chunks = "delta", _check_chunks(chunks)
            self.state.chunk_index = self.state.chunk_done = 0
            self.state.last_executed = None
            self._save()

    def disarm(self) -> None:
        with self.admission, self._lock:
            self.state.mode = "off"
            self._save()

    def set_pass_through(self, on: bool) -> None:
        with self.admission, self._lock:
            self.state.pass_through = on
            self._save()

    @contextlib.contextmanager
    def locked(self):
        """The state, unchanged by the migrator's view while held."""
        with self._lock:
            yield self.state

    def set_removed(self, name: str) -> None:
        with self._lock:
            self.state.removed = name
            self._save()

    def set_receiving(self, receiving: bool, guard_initiator: str | None = None) -> None:
        with self._lock:
            self.state.receiving = receiving
            if guard_initiator is not None:
                self.state.guard_initiator = guard_initiator
            self._save()

    # --- the rule (from the handler, one guarded write at a time) ---------------------------
    def admits(self, offset: int, length: int) -> bool:
        state = self.state
        if state.mode == "off":
            return True
        if state.last_executed == [offset, length]:
            return True  # the replay of an executed write whose completion was lost
        expected = state.reserved_address()
        if expected is None or offset != expected:
            return False
        if state.mode == "delta":
            chunk_offset, chunk_length = state.chunks[state.chunk_index]
            return offset + length <= chunk_offset + chunk_length
        return True

    def executed(self, offset: int, length: int) -> None:
        """Advance past an executed write and journal it; call before the completion is sent."""
        with self._lock:
            state = self.state
            if state.mode == "off" or state.last_executed == [offset, length]:
                return
            if state.mode == "sequential":
                state.reserved = offset + length
            else:
                state.chunk_done += length
                if state.chunk_done >= state.chunks[state.chunk_index][1]:
                    state.chunk_index, state.chunk_done = state.chunk_index + 1, 0
            state.last_executed = [offset, length]
            self._save()

    def _save(self) -> None:
        save_state(self.path, self.state)


def load_state(path: str) -> GuardState:
    try:
        with open(path) as f:
            return GuardState(**json.load(f))
    except (OSError, ValueError, TypeError) as exc:
        raise ArrayError(f"cannot read the backstore state file {path}: {exc}") from exc


def save_state(path: str, state: GuardState) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(asdict(state)).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
