"""Progress of the copy and the verify: phase, bytes done, rate and ETA added to the engine's events."""

from __future__ import annotations

import time
from typing import Callable

EventHandler = Callable[[dict], None]


class Progress:
    """Passes the engine's events on, adding phase, bytes done, rate (B/s) and ETA (s) to each chunk."""

    def __init__(self, emit: EventHandler, phase: str):
        self.emit = emit
        self.phase = phase
        self.began = time.monotonic()
        self.start_bytes = 0
        self.total = 0
        self.seconds = 0.0

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind in ("start", "verify_start"):
            self.began = time.monotonic()
            self.total = event["size"]
            self.start_bytes = event.get("resume_from", 0)
        elif kind in ("chunk", "verified_chunk"):
            done = event["reserved_address"] if kind == "chunk" else event["end"]
            elapsed = time.monotonic() - self.began
            rate = (done - self.start_bytes) / elapsed if elapsed > 0 else None
            event = {
                **event,
                "bytes": done,
                "total": self.total,
                "rate": rate,
                "eta": (self.total - done) / rate if rate else None,
            }
        elif kind in ("done", "verify_done"):
            self.seconds = round(time.monotonic() - self.began, 3)
        self.emit({**event, "phase": self.phase})
