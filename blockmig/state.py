"""The migration journal: what a migration knows, and which of its steps are done.

One directory per migration, /var/lib/blockmig/migrations/<ID>/, holds journal.json
(this module), the engine's copy journal and the manifest. Every change is
written atomically (the copy engine's writer: temp file, fsync, rename), so
after kill -9 the journal is the last complete state and `resume` or
`rollback` can carry on from it.

A lock per source WWID (fcntl.flock on /run/blockmig/locks/blockmig-<wwid>.lock) keeps
two blockmig processes off one volume. The kernel drops it when the holder dies,
so a resume after kill -9 can take it at once. Its directory is root's alone (0700):
in a world-writable one (/run/lock) any user could hold the lock, keeping a fenced
volume from being resumed, or plant a link there for root to write through.

Every id becomes a directory name, so every path here is built from a checked id
(blockmig.ids); state directories and files are made by blockmig.safefile (0700, 0600).
One unreadable journal is listed by name (`unreadable_journals`), never allowed to
break `status` or the planning of other volumes.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import time
from datetime import datetime, timezone
from typing import NamedTuple

from blockmig.datapath.digest import parse_json_document
from blockmig.datapath.journal import write_json_atomically
from blockmig.errors import JournalError, MigrationError, UsageError
from blockmig.ids import check_id, is_valid_id
from blockmig.safefile import ensure_private_dir, read_bounded

FORMAT = "blockmig-migration/1"
PLAN_FORMAT = "blockmig-plan/1"
MAX_JOURNAL_BYTES = 16 << 20  # a migration journal is a few KiB; a plan's lists its members
STEPS = ("plan", "reach_source", "create_destination", "fence", "join", "copy", "verify", "commit", "switch",
         "hand_over", "finish")  # both tables' (offline and pass-through), in order


def state_root() -> str:
    """Where migrations live; BLOCKMIG_STATE_DIR moves it (unit tests, several labs on one box)."""
    return os.environ.get("BLOCKMIG_STATE_DIR", "/var/lib/blockmig/migrations")


def plans_root() -> str:
    """Plans live next to the migrations folder, so BLOCKMIG_STATE_DIR moves both."""
    return os.path.join(os.path.dirname(os.path.abspath(state_root())), "plans")


def lock_root() -> str:
    """Root's alone (made 0700); BLOCKMIG_LOCK_DIR moves it (unit tests)."""
    return os.environ.get("BLOCKMIG_LOCK_DIR", "/run/blockmig/locks")


def migration_directory(migration_id: str) -> str:
    """<state root>/<ID>; the id is checked first, so no path can climb out of the state root."""
    return os.path.join(state_root(), check_id(migration_id, "migration id"))


def plan_directory(plan_id: str) -> str:
    return os.path.join(plans_root(), check_id(plan_id, "plan id"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# What every journal must hold for status, resume and rollback to read it without a traceback.
_REQUIRED = {FORMAT: {"state": str, "steps": dict, "source": dict, "created": str},
             PLAN_FORMAT: {"members": list, "policy": str, "parallel": int, "created": str}}


def _read_journal(path: str, format_name: str, kind: str, journal_id: str) -> dict:
    try:
        raw = read_bounded(path, MAX_JOURNAL_BYTES, f"{kind} journal")
    except FileNotFoundError:
        raise JournalError(f"no {kind} {journal_id} (no {path})") from None
    data = parse_json_document(raw, path, f"{kind} journal")
    if data.get("format") != format_name or data.get("id") != journal_id:
        raise JournalError(f"{path} is not the journal of {kind} {journal_id}")
    for key, kind_of in _REQUIRED[format_name].items():
        if not isinstance(data.get(key), kind_of) or isinstance(data.get(key), bool):
            raise JournalError(f"{path} is damaged: {key} is {type(data.get(key)).__name__}, "
                               f"not {kind_of.__name__}")
    if format_name == FORMAT and not isinstance(data["source"].get("wwid"), str):
        raise JournalError(f"{path} is damaged: it names no source WWID")
    if format_name == FORMAT and not all(isinstance(step, dict) for step in data["steps"].values()):
        raise JournalError(f"{path} is damaged: a step is not a table")
    for key, may_be_null in (("destination", False), ("migrator", False), ("online", True), ("report", True)):
        if key in data and not isinstance(data[key], dict) and not (may_be_null and data[key] is None):
            raise JournalError(f"{path} is damaged: {key} is {type(data[key]).__name__}, not a table")
    if format_name == PLAN_FORMAT and not all(is_valid_id(member) for member in data["members"]):
        raise JournalError(f"{path} is damaged: its members are not migration ids")
    return data


class _Journal:
    """A JSON document with an id, saved atomically on every change."""

    path: str

    def __init__(self, data: dict):
        self.data = data

    @property
    def id(self) -> str:
        return self.data["id"]

    def save(self) -> None:
        self.data["updated"] = _now()
        ensure_private_dir(os.path.dirname(os.path.dirname(self.path)))  # the root, so ID/ is made 0700 in it
        write_json_atomically(self.path, self.data)


class MigrationJournal(_Journal):
    """The journal of one migration: a JSON document saved on every change."""

    # -- identity and files ------------------------------------------------
    @property
    def directory(self) -> str:
        return migration_directory(self.id)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, "journal.json")

    @property
    def copy_journal_path(self) -> str:
        return os.path.join(self.directory, "copy.json")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, "manifest.json")

    # -- creation and loading ------------------------------------------------
    @classmethod
    def create(cls, migration_id: str, **fields) -> "MigrationJournal":
        check_id(migration_id, "migration id")
        journal = cls(
            {
                "format": FORMAT,
                "id": migration_id,
                "created": _now(),
                "state": "planned",
                "steps": {},
                **fields,
            }
        )
        if os.path.exists(journal.path):
            raise MigrationError(f"migration {migration_id} already exists ({journal.path})")
        if PlanJournal.exists(migration_id):
            raise MigrationError(f"{migration_id} is the id of a plan: choose another migration id")
        journal.save()
        return journal

    @classmethod
    def load(cls, migration_id: str) -> "MigrationJournal":
        return cls(_read_journal(os.path.join(migration_directory(migration_id), "journal.json"), FORMAT,
                                 "migration", migration_id))

    @classmethod
    def list_all(cls) -> list["MigrationJournal"]:
        """Every readable migration journal, oldest first; the unreadable ones: `unreadable_journals()`."""
        return _list_journals(state_root(), "journal.json", cls.load)[0]

    # -- steps -----------------------------------------------------------------
    def step(self, name: str) -> dict:
        return self.data["steps"].get(name, {})

    def is_done(self, name: str) -> bool:
        return self.step(name).get("state") == "done"

    def mark_started(self, name: str) -> None:
        entry = self.data["steps"].setdefault(name, {})
        entry["state"] = "started"
        entry.setdefault("started", _now())
        entry["attempts"] = entry.get("attempts", 0) + 1
        self.data["state"] = "running"
        self.data["current_step"] = name
        self.save()

    def record(self, name: str, **facts) -> None:
        """Add facts to a step (saved at once: they are what resume relies on)."""
        self.data["steps"].setdefault(name, {}).setdefault("facts", {}).update(facts)
        self.save()

    def facts(self, name: str) -> dict:
        return self.step(name).get("facts", {})

    def mark_done(self, name: str, **facts) -> None:
        entry = self.data["steps"].setdefault(name, {})
        entry.setdefault("facts", {}).update(facts)
        entry["state"] = "done"
        entry["done"] = _now()
        self.save()

    @property
    def frozen(self) -> list[str]:
        """Mountpoints blockmig froze (each journaled before its freeze), for whoever thaws them."""
        return self.data.setdefault("frozen", [])

    def mark_failed(self, error: str) -> None:
        self.data["state"] = "failed"
        self.data["error"] = error
        self.save()

    def set_state(self, state: str, **fields) -> None:
        self.data["state"] = state
        self.data.update(fields)
        self.save()

    def summary(self) -> dict:
        """What `blockmig status` shows: identity, state, and each step's state."""
        return {
            "id": self.id,
            "state": self.data["state"],
            "current_step": self.data.get("current_step"),
            "error": self.data.get("error"),
            "source": self.data.get("source", {}),
            "destination": self.data.get("destination", {}),
            "fence": self.data.get("fence"),
            "mode": self.data.get("mode", "offline"),
            "online": self.data.get("online"),
            "switch": self.data.get("switch"),
            "switch_reverts": self.data.get("switch_reverts", 0),
            "worm": self.data.get("worm"),
            "created": self.data.get("created"),
            "updated": self.data.get("updated"),
            "steps": {name: self.step(name) for name in STEPS if self.step(name)},
            "report": self.data.get("report"),
        }


class PlanJournal(_Journal):
    """A plan: its member migrations (each an ordinary migration with its own journal) and its policy."""

    @property
    def path(self) -> str:
        return os.path.join(plan_directory(self.id), "plan.json")

    @property
    def members(self) -> list[str]:
        return self.data["members"]

    @classmethod
    def create(cls, plan_id: str, **fields) -> "PlanJournal":
        check_id(plan_id, "plan id")
        plan = cls({"format": PLAN_FORMAT, "id": plan_id, "created": _now(), **fields})
        if os.path.exists(plan.path):
            raise MigrationError(f"plan {plan_id} already exists ({plan.path})")
        plan.save()
        return plan

    @classmethod
    def exists(cls, plan_id: str) -> bool:
        return os.path.lexists(os.path.join(plan_directory(plan_id), "plan.json"))

    @classmethod
    def load(cls, plan_id: str) -> "PlanJournal":
        return cls(_read_journal(os.path.join(plan_directory(plan_id), "plan.json"), PLAN_FORMAT, "plan", plan_id))

    @classmethod
    def list_all(cls) -> list["PlanJournal"]:
        return _list_journals(plans_root(), "plan.json", cls.load)[0]


def migration_exists(migration_id: str) -> bool:
    return os.path.lexists(os.path.join(migration_directory(migration_id), "journal.json"))


class UnreadableJournal(NamedTuple):
    """A journal `status` lists by name with why it cannot be read; `wwids`: the WWIDs its bytes still name."""

    kind: str  # "migration" or "plan"
    name: str
    path: str
    reason: str
    wwids: frozenset


_WWID_TEXT = re.compile(rb"\b3[0-9a-f]{15,39}\b")


def _list_journals(root: str, file_name: str, load) -> tuple[list, list[UnreadableJournal]]:
    """(readable journals oldest first, unreadable ones) under `root`; one bad journal never hides the others."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise JournalError(f"cannot list {root}: {exc.strerror}") from None
    kind = "plan" if file_name == "plan.json" else "migration"
    journals, unreadable = [], []
    for name in names:
        path = os.path.join(root, name, file_name)
        if not os.path.lexists(path):
            continue
        try:
            if not is_valid_id(name):
                raise JournalError(f"{name!r} is not a blockmig id (not made by blockmig)")
            journals.append(load(name))
        except (JournalError, UsageError) as exc:
            unreadable.append(UnreadableJournal(kind, name, path, str(exc), _wwids_named_in(path)))
    return sorted(journals, key=lambda journal: journal.data["created"]), unreadable


def _wwids_named_in(path: str) -> frozenset:
    """WWIDs (36001405...) in a damaged journal's bytes: enough to tell whose volume it may be."""
    try:
        raw = read_bounded(path, MAX_JOURNAL_BYTES, "journal")
    except (OSError, JournalError):
        return frozenset()
    return frozenset(match.decode() for match in _WWID_TEXT.findall(raw.lower()))


def unreadable_journals() -> list[UnreadableJournal]:
    """Plans, then migrations, whose journal cannot be read: what `blockmig status` lists as unreadable."""
    return (_list_journals(plans_root(), "plan.json", PlanJournal.load)[1]
            + _list_journals(state_root(), "journal.json", MigrationJournal.load)[1])


def refuse_unfinished_migration_of(wwid: str) -> None:
    """A new migration of a volume with one unfinished would fight it for the arrays and the host's map.

    A damaged journal cannot say its state: it blocks the volumes whose WWID its bytes still name, and,
    if it names none at all, every volume (it could be any one's); journals that name other volumes only
    leave this one free. Journals are written atomically, so damage is an edit or a disk fault: rare, and
    worth an admin's look before anything else moves.
    """
    journals, unreadable = _list_journals(state_root(), "journal.json", MigrationJournal.load)
    for journal in journals:
        if journal.data["source"]["wwid"] == wwid and journal.data["state"] not in ("done", "rolled_back"):
            raise MigrationError(
                f"migration {journal.id} of this volume is unfinished ({journal.data['state']}): "
                f"blockmig resume {journal.id} or blockmig rollback {journal.id}"
            )
    for damaged in unreadable:
        if wwid.lower() in damaged.wwids or not damaged.wwids:
            whose = "names this volume's WWID" if damaged.wwids else "names no WWID, so it could be this volume's"
            raise JournalError(f"migration journal {damaged.path} is unreadable ({damaged.reason}) and {whose}: "
                               "repair or move it away, then plan again")


class VolumeLock:
    """An exclusive lock on one source volume, held for the life of a blockmig process.

    The lock file lives in a directory only root can enter, is opened O_NOFOLLOW|O_CLOEXEC and is 0600:
    another user can neither flock it nor make root write through a planted link, and a child process
    (iscsiadm, multipathd) does not inherit it.
    """

    def __init__(self, wwid: str, migration_id: str):
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", wwid or ""):
            raise JournalError(f"cannot lock volume {wwid!r}: not a WWID")
        self.path = os.path.join(lock_root(), f"blockmig-{wwid}.lock")
        self.migration_id = migration_id
        self._fd: int | None = None

    def acquire(self) -> "VolumeLock":
        ensure_private_dir(os.path.dirname(self.path))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open lock {self.path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise JournalError(f"refusing lock {self.path}: not a regular file of uid {os.geteuid()}")
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise MigrationError(f"a migration of this volume is already running ({holder}; lock {self.path})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"migration {self.migration_id}, pid {os.getpid()}, since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> "VolumeLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
