"""The migration journal: what a migration knows, and which of its steps are done.

One directory per migration, /var/lib/blockmig/migrations/<ID>/, holds journal.json
(this module), the engine's copy journal and the manifest. Every change is
written atomically (the copy engine's writer: temp file, fsync, rename), so
after kill -9 the journal is the last complete state and `resume` or
`rollback` can carry on from it.

A lock per source WWID (fcntl.flock on /run/lock/blockmig-<wwid>.lock) keeps
two blockmig processes off one volume. The kernel drops it when the holder dies,
so a resume after kill -9 can take it at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from datetime import datetime, timezone

from blockmig.datapath.journal import write_json_atomically
from blockmig.errors import JournalError, MigrationError

FORMAT = "blockmig-migration/1"
PLAN_FORMAT = "blockmig-plan/1"
STEPS = ("plan", "create_destination", "fence", "copy", "verify", "switch", "finish")


def state_root() -> str:
    """Where migrations live; BLOCKMIG_STATE_DIR moves it (unit tests, several labs on one box)."""
    return os.environ.get("BLOCKMIG_STATE_DIR", "/var/lib/blockmig/migrations")


def plans_root() -> str:
    """Plans live next to the migrations folder, so BLOCKMIG_STATE_DIR moves both."""
    return os.path.join(os.path.dirname(os.path.abspath(state_root())), "plans")


def lock_root() -> str:
    return os.environ.get("BLOCKMIG_LOCK_DIR", "/run/lock")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _read_journal(path: str, format_name: str, kind: str, journal_id: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise JournalError(f"no {kind} {journal_id} (no {path})") from None
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise JournalError(f"{path} is not valid JSON ({exc})") from None
    if data.get("format") != format_name or data.get("id") != journal_id:
        raise JournalError(f"{path} is not the journal of {kind} {journal_id}")
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
        write_json_atomically(self.path, self.data)


class MigrationJournal(_Journal):
    """The journal of one migration: a JSON document saved on every change."""

    # -- identity and files ------------------------------------------------
    @property
    def directory(self) -> str:
        return os.path.join(state_root(), self.id)

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
        if not migration_id or "/" in migration_id or migration_id.startswith("."):
            raise MigrationError(f"invalid migration id {migration_id!r}")
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
        return cls(_read_journal(os.path.join(state_root(), migration_id, "journal.json"), FORMAT, "migration",
                                 migration_id))

    @classmethod
    def list_all(cls) -> list["MigrationJournal"]:
        root = state_root()
        if not os.path.isdir(root):
            return []
        journals = []
        for name in sorted(os.listdir(root)):
            if os.path.exists(os.path.join(root, name, "journal.json")):
                journals.append(cls.load(name))
        return sorted(journals, key=lambda journal: journal.data["created"])

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
            "online": {k: v for k, v in (self.data.get("online") or {}).items() if k != "trackings"} or None,
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
        return os.path.join(plans_root(), self.id, "plan.json")

    @property
    def members(self) -> list[str]:
        return self.data["members"]

    @classmethod
    def create(cls, plan_id: str, **fields) -> "PlanJournal":
        plan = cls({"format": PLAN_FORMAT, "id": plan_id, "created": _now(), **fields})
        if os.path.exists(plan.path):
            raise MigrationError(f"plan {plan_id} already exists ({plan.path})")
        plan.save()
        return plan

    @classmethod
    def exists(cls, plan_id: str) -> bool:
        return os.path.exists(os.path.join(plans_root(), plan_id, "plan.json"))

    @classmethod
    def load(cls, plan_id: str) -> "PlanJournal":
        return cls(_read_journal(os.path.join(plans_root(), plan_id, "plan.json"), PLAN_FORMAT, "plan", plan_id))

    @classmethod
    def list_all(cls) -> list["PlanJournal"]:
        root = plans_root()
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        plans = [cls.load(name) for name in names if cls.exists(name)]
        return sorted(plans, key=lambda plan: plan.data["created"])


def migration_exists(migration_id: str) -> bool:
    return os.path.exists(os.path.join(state_root(), migration_id, "journal.json"))


class VolumeLock:
    """An exclusive lock on one source volume, held for the life of a blockmig process."""

    def __init__(self, wwid: str, migration_id: str):
        self.path = os.path.join(lock_root(), f"blockmig-{wwid}.lock")
        self.migration_id = migration_id
        self._fd: int | None = None

    def acquire(self) -> "VolumeLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise MigrationError(f"a migration of this volume is already running ({holder}; lock {self.path})") from None
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
