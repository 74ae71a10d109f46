"""The public API of one migration (the orchestrator lives in blockmig/orchestrator/)."""

from blockmig.host.devices import HostDevice, resolve_host_device
from blockmig.orchestrator.migration import (
    CONTROL_PLANE,
    STEPS,
    Migration,
    migrate,
    migration_status,
    release_fence,
    resume_migration,
    rollback_migration,
    run_migration,
    run_until,
    switch_members,
)
from blockmig.orchestrator.plan import FENCES, SWITCHES, MigrationRequest, plan_migration
from blockmig.orchestrator.progress import EventHandler

__all__ = [
    "CONTROL_PLANE",
    "FENCES",
    "STEPS",
    "SWITCHES",
    "EventHandler",
    "HostDevice",
    "Migration",
    "MigrationRequest",
    "migrate",
    "migration_status",
    "plan_migration",
    "release_fence",
    "resolve_host_device",
    "resume_migration",
    "rollback_migration",
    "run_migration",
    "run_until",
    "switch_members",
]
