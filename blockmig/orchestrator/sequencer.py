"""The sequencer: runs a table of steps over one journal; resume, failure, invalidation and rollback.

Each step declares what it is; the sequencer only reads those declarations:
  name                 its key in the journal (`steps.<name>`: state, attempts, facts)
  needs_control_plane  runs under the process-wide control-plane lock (else it runs beside other migrations);
                       a signal then waits for the step's end (`when_signalled` says why, to the admin)
  invalidates          steps whose result stops holding when this one is undone or redone
  run(migration)       does the step (again after a crash: it finds what an attempt did); returns facts
  after_failure(migration, failed)   called for every step, last first, once any step failed: leave
                       nothing half made, no host IO held
  check_undo(migration)  rollback is refused (nothing changed) if any step says it cannot be undone
  undo(migration)      rollback: called for every step, last first; each undo is idempotent
  forget(migration)    the step is invalidated: drop what it left outside the journal (a copy journal)

The journal is the single source of truth: a step is done when its entry says so,
so `run` after kill -9 simply carries on with the first step not done.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Protocol

from blockmig import signals
from blockmig.errors import BlockmigError, MigrationError
from blockmig.state import MigrationJournal


class Step(Protocol):
    name: str
    needs_control_plane: bool
    invalidates: tuple[str, ...]
    when_signalled: str

    def run(self, migration) -> dict | None: ...

    def after_failure(self, migration, failed: str) -> None: ...

    def check_undo(self, migration) -> None: ...

    def undo(self, migration) -> None: ...

    def forget(self, migration) -> None: ...


class BaseStep:
    """Defaults: under the control-plane lock, invalidates nothing, nothing to clean up, undo or forget."""

    name = ""
    needs_control_plane = True
    invalidates: tuple[str, ...] = ()
    when_signalled = ""  # what a signal waits for while the step runs (told to the admin); "" the default

    def run(self, migration) -> dict | None:
        raise NotImplementedError

    def after_failure(self, migration, failed: str) -> None:
        """Another step (or this one, `failed == self.name`) failed."""

    def check_undo(self, migration) -> None:
        """Raise if this step can no longer be undone (rollback then changes nothing)."""

    def undo(self, migration) -> None:
        """Rollback of this step (also when it never ran: check before undoing)."""

    def forget(self, migration) -> None:
        """This step's result is invalid (see `invalidates`): remove what the journal does not hold."""


class Sequencer:
    """Runs `steps` in order for one journal; `migration` is what each step gets (its resources and facts)."""

    def __init__(self, steps: list[Step], journal: MigrationJournal, control_plane: threading.RLock):
        self.steps = steps
        self.by_name = {step.name: step for step in steps}
        self.journal = journal
        self.control_plane = control_plane

    def names(self) -> list[str]:
        return [step.name for step in self.steps]

    def before(self, name: str, other: str) -> bool:
        """Whether step `name` comes before step `other` in the table."""
        names = self.names()
        return names.index(name) < names.index(other)

    def run(self, migration, until: str | None = None, refuse=None) -> bool:
        """Run the steps not done yet; with `until`, stop before that step. True when every step is done.

        `refuse(name)`: called before a step starts, may raise (a group member never switches alone).
        """
        for step in self.steps:
            if self.journal.is_done(step.name):
                continue
            if until and not self.before(step.name, until):
                return False
            if refuse:
                refuse(step.name)
            migration.emit({"event": "step", "step": step.name, "state": "started"})
            self.journal.mark_started(step.name)
            try:
                # A signal stops us here, between steps (the failure's cleanup lifts a suspend fence), or in
                # a data step at a chunk boundary; a control-plane step (the switch: finished or reverted
                # within --switch-timeout) runs to its end first.
                signals.check("before the step began")
                with contextlib.ExitStack() as guarded:
                    if step.needs_control_plane:
                        guarded.enter_context(self._control_plane(migration))
                        waits_for = step.when_signalled or f"step {step.name} goes on to its end"
                        guarded.enter_context(signals.deferred(waits_for, then_stop=False))
                    facts = step.run(migration) or {}
            except BaseException as exc:  # cleanup on anything; only our own errors are reworded
                self._fail(migration, step.name, exc)
            self.journal.mark_done(step.name, **facts)
            migration.emit({"event": "step", "step": step.name, "state": "done", **facts})
        return True

    def _control_plane(self, migration):
        """The migration's own view of the lock where it has one (it records waits), else the lock."""
        return getattr(migration, "control_plane", self.control_plane)

    def _fail(self, migration, name: str, exc: BaseException):
        # A signal (a first one, or a second after the one that stopped the step) waits for the cleanup.
        with self.control_plane, signals.deferred("lifting the fence and journaling", then_stop=False):
            cleanup_error = self.after_failure(migration, name)
        message = str(exc) or type(exc).__name__
        if cleanup_error:
            message += f"; cleaning up failed too: {cleanup_error}"
        self.journal.mark_failed(f"{name}: {message}")
        if not isinstance(exc, BlockmigError):
            raise exc
        raise MigrationError(
            f"migration {self.journal.id} stopped in step {name}: {message} "
            f"(blockmig resume {self.journal.id} or blockmig rollback {self.journal.id})"
        ) from exc

    def after_failure(self, migration, failed: str) -> str | None:
        """Every step's after_failure, last first; returns what went wrong meanwhile (reported, not
        swallowed)."""
        try:
            for step in reversed(self.steps):
                step.after_failure(migration, failed)
        except BlockmigError as exc:
            return str(exc)
        return None

    def invalidate(self, migration, name: str) -> None:
        """Step `name` and everything it invalidates (transitively) run again on resume."""
        forgotten: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop(0)
            if current not in forgotten:
                forgotten.append(current)
                pending += self.by_name[current].invalidates
        for current in forgotten:
            self.journal.data["steps"].pop(current, None)
        self.journal.save()
        for current in forgotten:
            self.by_name[current].forget(migration)

    def rollback(self, migration) -> None:
        """Every step's undo, last first; an undo that fails stops here and a later rollback carries on."""
        for step in self.steps:
            step.check_undo(migration)
        migration.emit({"event": "rollback", "id": self.journal.id})
        self.journal.set_state("rolling_back")
        for step in reversed(self.steps):
            step.undo(migration)
        self.journal.set_state("rolled_back")
