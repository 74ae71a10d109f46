"""Online mode: which mode a migration gets, and the journal record of an online move.

Online means pass-through (pass_through.py): the destination joins the host's multipath map first and
passes the host's IO through to the source until the copy has converged, so it moves any host stack on
the map (a filesystem used directly, LVM, partitions) without holding host IO at a path change: the
default for every map. A bare disk (no map) moves offline only. This module is apart from
pass_through.py because plan.py and finish.py, whose steps pass_through.py imports, need it.
"""

from __future__ import annotations

from blockmig.errors import UsageError

PASS_THROUGH = "pass-through"
MODES = ("online", "offline", PASS_THROUGH)  # --mode pass-through: the same as online
DEFAULT_MAX_HOLD = 1.0


def choose_mode(requested: str | None, fence_given: bool, map_name: str | None, device: str,
                switch: str = "multipath") -> str:
    """The journal's mode ("offline" or "pass-through") for --mode `requested`, or the default: online
    for every multipath map, whatever uses it (a filesystem or database directly on it, LVM, partitions,
    a raw application, nothing), because no host IO waits for the copy; offline where the admin asked
    for a fence or a relogin switch, and for a bare disk (nothing to join a path beside)."""
    if requested not in (None, *MODES):
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    if requested == "offline":
        return "offline"
    if requested is not None:
        if fence_given:
            raise UsageError("--fence is for --mode offline: online mode lets the host write during the copy")
        if map_name is None:
            raise UsageError(f"--mode {requested} moves the host by its multipath map: {device} is a bare "
                             "disk, not a multipath map; use --mode offline with --switch relogin")
        return PASS_THROUGH
    if fence_given or map_name is None or switch == "relogin":
        return "offline"
    return PASS_THROUGH


def new_pass_through_state(max_hold: float, min_rate: int | None = None) -> dict:
    """The journal's `online` record of a pass-through move."""
    if not 0 < max_hold <= 60:
        raise UsageError(f"--max-hold {max_hold:g} s must be above 0 and at most 60 s")
    return {"mechanism": PASS_THROUGH, "max_hold": max_hold, "min_rate": min_rate, "pass1_done": False,
            "pass1_rate": None,
            "pass": 0, "passes": [], "intervals": []}


def pass_through_summary(journal) -> dict | None:
    """The pass-through's figures for the report and status."""
    state = journal.data.get("online")
    if not state or state.get("mechanism") != PASS_THROUGH:
        return None
    return {"mechanism": PASS_THROUGH, "passes": state["passes"], "intervals": state["intervals"],
            "max_hold": state["max_hold"]}
