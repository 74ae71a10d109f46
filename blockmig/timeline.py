"""What a migration did, and when: a compact record in its journal folder, and audit lines in syslog.

The public entry points (migration.run_migration / rollback_migration, plan.run_plan) wrap the caller's
event handler with `recording`: every event still reaches the caller unchanged, and the few that tell the
migration's story are appended to <journal folder>/events.jsonl, one JSON object a line with its time
("t", seconds since the epoch). `blockmig report --plot` draws from that file after the fact, so a failed
or rolled-back migration has its picture too. Progress is sampled at most once a second per phase and the
file is bounded (MAX_RECORD_BYTES: beyond it only progress samples are dropped), so recording costs one
short write and flush per second at most.

The events an auditor cares about (planned, destination created, switched, finished, rolled back, failed)
also go to the system log, tagged `blockmig` (`journalctl -t blockmig`), as key=value fields; see audit().
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import threading
import time
from datetime import datetime
from typing import Callable, Iterator

EventHandler = Callable[[dict], None]

EVENTS_FILE = "events.jsonl"
MAX_RECORD_BYTES = 4 << 20  # a long migration's samples: about 20 hours at one 200-byte sample a second
SAMPLE_INTERVAL = 1.0  # seconds between two progress samples of one phase
SYSLOG_SOCKET_ENV = "BLOCKMIG_SYSLOG_SOCKET"
DEFAULT_SYSLOG_SOCKET = "/dev/log"
SYSLOG_TAG = "blockmig"

# The step facts worth keeping with a step's `done` record (the rest is in journal.json).
STEP_FACTS = ("seconds", "source_seconds", "io_held_seconds", "volume_digest", "chunks", "host_disk")
PROGRESS_EVENTS = ("chunk", "verified_chunk")
# Copied with all their fields but the ones the journal has anyway.
KEPT_EVENTS = ("delta", "switch_phase", "io_held", "io_resumed", "copy_retry", "switch_revert", "rollback",
               "member_failed", "plan")

_syslog_enabled = True


def set_syslog(enabled: bool) -> None:
    """`--no-syslog`: this process writes no audit records."""
    global _syslog_enabled
    _syslog_enabled = enabled


def events_path(directory: str) -> str:
    return os.path.join(directory, EVENTS_FILE)


def load_records(directory: str) -> list[dict]:
    """The records of one migration, oldest first; a torn last line (kill -9 mid-write) is left out."""
    records = []
    try:
        with open(events_path(directory), encoding="utf-8") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
    except FileNotFoundError:
        pass
    return records


def record_host_io(journal, longest_seconds: float, ended_at: float) -> None:
    """What a host workload measured itself (blockmig cannot see it): its longest single IO."""
    record = {"t": round(ended_at, 3), "e": "host_io", "seconds": round(longest_seconds, 3)}
    with open(events_path(journal.directory), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


class Recorder:
    """Appends one migration's records to its events.jsonl and sends its audit lines; thread-safe."""

    def __init__(self, journal, clock: Callable[[], float] = time.time):
        self.journal = journal
        self.clock = clock
        self.path = events_path(journal.directory)
        self._lock = threading.Lock()
        self._last_sample: dict[str, float] = {}
        self._failure_seen = (journal.data.get("error"), journal.data.get("updated"))
        self._failure_recorded = False
        if not os.path.exists(self.path):  # the first run of this migration: it was planned at `created`
            self.write({"e": "planned", "plan": journal.data.get("plan")}, at=_epoch(journal.data["created"]))
        self._audited = {found["event"] for found in load_records(journal.directory) if found["e"] == "audit"}
        self.audit_once("planned")

    def write(self, record: dict, at: float | None = None) -> None:
        """Append and flush one record; one that cannot be written (disk full) is lost, not the migration."""
        line = json.dumps({"t": round(self.clock() if at is None else at, 3), **record}) + "\n"
        with self._lock, contextlib.suppress(OSError):
            if record["e"] == "progress" and os.path.exists(self.path) \
                    and os.path.getsize(self.path) > MAX_RECORD_BYTES:
                return
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()

    def __call__(self, event: dict) -> None:
        """Record what an event tells of the migration's story (events of other kinds pass unrecorded)."""
        kind = event.get("event")
        if kind in PROGRESS_EVENTS:
            self._sample(event)
        elif kind in ("start", "verify_start"):
            self._last_sample.pop(event.get("phase", ""), None)
            self.write({"e": "phase", "phase": event.get("phase"), "state": "started",
                        "total": event.get("size"), "from": event.get("resume_from", 0)})
        elif kind in ("done", "verify_done"):
            self.write({"e": "phase", "phase": event.get("phase"), "state": "done"})
        elif kind == "step":
            facts = {key: event[key] for key in STEP_FACTS if key in event}
            self.write({"e": "step", "step": event["step"], "state": event["state"], **facts})
            if event["state"] == "done" or event["step"] == "finish":
                self._audit_step(event["step"], event["state"])
        elif kind == "control_plane_wait":
            self.write({"e": "control_plane_wait", "state": event["state"],
                        **({"seconds": event["seconds"]} if "seconds" in event else {})})
        elif kind in KEPT_EVENTS:
            self.write({"e": kind, **{k: v for k, v in event.items() if k not in ("event", "host_volume")}})
            if kind == "member_failed":
                self.note_failure(event.get("error", ""))

    def _sample(self, event: dict) -> None:
        phase = event.get("phase", "copy")
        now = self.clock()
        if now - self._last_sample.get(phase, float("-inf")) < SAMPLE_INTERVAL:
            return
        self._last_sample[phase] = now
        self.write({"e": "progress", "phase": phase, "bytes": event.get("bytes"), "total": event.get("total"),
                    "rate": None if event.get("rate") is None else round(event["rate"])}, at=now)

    def _audit_step(self, step: str, state: str) -> None:
        if step == "create_destination":
            self.audit_once("destination_created")
        elif step == "switch" or step == "finish" and self.journal.is_done("switch"):  # a group's: no event
            held = self.journal.facts("switch").get("io_held_seconds")
            self.audit_once("switched", io_held_seconds=held)
        elif step == "commit":  # an online move's: from here the destination is the volume, the host on it
            held = self.journal.facts("commit").get("writes_held_seconds")
            self.audit_once("switched", io_held_seconds=held)
        if step == "finish" and state == "done":
            self.audit_once("finished")

    def audit_once(self, event: str, **extra) -> None:
        """Milestones are audited once per migration, whatever resumes happen; the record notes each one."""
        if event in self._audited:
            return
        self._audited.add(event)
        self.audit(event, **extra)

    def audit(self, event: str, **extra) -> None:
        self.write({"e": "audit", "event": event, **extra})
        audit(event, self.journal, **extra)

    def note_failure(self, message: str) -> None:
        """The run's failure, once, with its one line (the exception's, else the journal's)."""
        if self._failure_recorded:
            return
        self._failure_recorded = True
        error = " ".join(str(message or self.journal.data.get("error") or "failed").split())
        self.write({"e": "failed", "error": error, "step": self.journal.data.get("current_step")})
        self.audit("failed", error=error)

    def failed_since_start(self) -> bool:
        current = (self.journal.data.get("error"), self.journal.data.get("updated"))
        return self.journal.data.get("state") == "failed" and current != self._failure_seen


class _Recording:
    """`with recording(journal, on_event, action) as emit`: the handler to pass on, the caller's with this
    migration's record and audit in front of it. `action` is "run" (also resume) or "rollback"; a rollback
    that returns is audited as rolled back; an exception leaving the block as failed, with its one line."""

    def __init__(self, journal, on_event: EventHandler | None, action: str = "run"):
        self.journal, self.on_event, self.action = journal, on_event, action
        self.recorder: Recorder | None = None

    def __enter__(self) -> EventHandler:
        self.recorder = Recorder(self.journal)
        self.recorder.write({"e": "run", "action": self.action, "state": self.journal.data.get("state")})
        return chain(self.recorder, self.on_event)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc is not None:
            self.recorder.note_failure(str(exc) or exc_type.__name__)
        elif self.action == "rollback":
            self.recorder.write({"e": "rolled_back"})
            self.recorder.audit("rolled_back")
        elif self.recorder.failed_since_start():
            self.recorder.note_failure("")
        return False


def recording(journal, on_event: EventHandler | None, action: str = "run") -> _Recording:
    return _Recording(journal, on_event, action)


@contextlib.contextmanager
def recording_plan(journals: list, on_event: EventHandler | None) -> Iterator[EventHandler]:
    """A plan's handler: member events (tagged with their migration id) go to that member's record."""
    recorders = {journal.id: Recorder(journal) for journal in journals}
    for recorder in recorders.values():
        recorder.write({"e": "run", "action": "plan", "plan": recorder.journal.data.get("plan"),
                        "state": recorder.journal.data.get("state")})

    def dispatch(event: dict) -> None:
        if event.get("event") == "plan":  # the plan's own event: each member notes its plan and companions
            for recorder in recorders.values():
                recorder(event)
        elif event.get("id") in recorders:
            recorders[event["id"]](event)

    try:
        yield chain(dispatch, on_event)
    finally:
        for recorder in recorders.values():
            if recorder.failed_since_start():
                recorder.note_failure("")


def chain(recorder, on_event: EventHandler | None) -> EventHandler:
    handler = on_event or (lambda event: None)

    def emit(event: dict) -> None:
        recorder(event)
        handler(event)

    emit.recorder = recorder
    return emit


@contextlib.contextmanager
def control_plane(lock, emit: EventHandler) -> Iterator[None]:
    """Take the control-plane lock; when another member holds it, say when the wait began and how long."""
    if lock.acquire(blocking=False):
        try:
            yield
        finally:
            lock.release()
        return
    began = time.monotonic()
    emit({"event": "control_plane_wait", "state": "started"})
    with lock:
        emit({"event": "control_plane_wait", "state": "done", "seconds": round(time.monotonic() - began, 3)})
        yield


# ---------------------------------------------------------------------------
# the audit trail


class _QuietSysLogHandler(logging.handlers.SysLogHandler):
    """A record the socket does not take is dropped: logging's default prints a traceback to stderr."""

    def handleError(self, record) -> None:
        pass


_audit_logger: logging.Logger | None = None
_audit_socket: str | None = None


def _logger() -> logging.Logger | None:
    """A logger with a SysLogHandler on BLOCKMIG_SYSLOG_SOCKET or /dev/log; None if nothing listens there."""
    global _audit_logger, _audit_socket
    socket_path = os.environ.get(SYSLOG_SOCKET_ENV, DEFAULT_SYSLOG_SOCKET)
    if _audit_logger is not None and socket_path == _audit_socket:
        return _audit_logger
    if _audit_logger is not None:
        for handler in list(_audit_logger.handlers):
            _audit_logger.removeHandler(handler)
            handler.close()
        _audit_logger = None
    try:
        handler = _QuietSysLogHandler(address=socket_path,
                                      facility=logging.handlers.SysLogHandler.LOG_USER)
    except OSError:
        return None  # no syslog on this host: no audit records, nothing printed either
    handler.ident = f"{SYSLOG_TAG}[{os.getpid()}]: "
    handler.append_nul = False
    logger = logging.Logger("blockmig.audit", logging.INFO)  # not in the logging tree: nothing reaches stderr
    logger.propagate = False
    logger.addHandler(handler)
    _audit_logger, _audit_socket = logger, socket_path
    return logger


def audit_fields(event: str, journal, **extra) -> dict:
    """What an auditor needs to identify the move: id, the volume's WWID, source and destination, digest."""
    data = journal.data
    source, destination = data.get("source", {}), data.get("destination", {})
    report = data.get("report") or {}
    digest = (report.get("volume_digest") or journal.facts("switch").get("volume_digest")
              or journal.facts("verify").get("volume_digest") or journal.facts("copy").get("volume_digest"))
    fields = {
        "event": event,
        "id": journal.id,
        "wwid": source.get("wwid"),
        "source": f"{source.get('target')}/{source.get('volume')}",
        "destination": f"{destination.get('target')}/{destination.get('volume')}",
        "digest": f"sha256:{digest}" if digest else None,
        **extra,
    }
    if data.get("plan"):
        fields["plan"] = data["plan"]
    return {key: value for key, value in fields.items() if value is not None}


def format_fields(fields: dict) -> str:
    """key=value pairs; a value with spaces or quotes is quoted (the error line)."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\\'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def audit(event: str, journal, **extra) -> None:
    """One record in the system log, unless --no-syslog or no syslog socket; never raises."""
    if not _syslog_enabled:
        return
    logger = _logger()
    if logger is None:
        return
    level = logging.ERROR if event == "failed" else logging.INFO
    with contextlib.suppress(Exception):  # an audit line that cannot be sent must not stop a migration
        logger.log(level, format_fields(audit_fields(event, journal, **extra)))


def _epoch(iso_text: str) -> float:
    return datetime.fromisoformat(iso_text).timestamp()
