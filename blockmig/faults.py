"""Named points where a test can stop a running blockmig, to act on the real stack or kill it.

`BLOCKMIG_STOP_AT=switch:source-removed` (a comma-separated list) makes the
process stop itself with SIGSTOP when it reaches that point. A test then does
what it wants at that exact instant (kill -9, take the destination portal
away, ...) and sends SIGCONT or SIGKILL. No sleeps, no races, and in
production the variable is unset and this is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

STOP_AT_ENV = "BLOCKMIG_STOP_AT"


def checkpoint(name: str) -> None:
    if name in os.environ.get(STOP_AT_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGSTOP)
