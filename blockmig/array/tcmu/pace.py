"""Host first: while the host's IO passes through, the migrator's pass-1 writes yield to it.

Pass 1 only: the delta passes run at full speed, as the copy converges only if they outrun the host's
writes (paced, a busy host out-dirtied them: 20 delta passes did not converge in the lab).

The host's commands and the copy's chunks share the array's CPU and the source array; unpaced, a copy
under the lab's emulated CPU cut a raw writer's rate during pass 1 to 0.3x its rate alone. As md's
resync drops to its minimum speed while the array has other IO, and LEDBAT backs off when its traffic
adds delay to others, the handler delays each migrator write by `delay`: doubled (plus STEP) while the
host's commands since the last migrator write took more than TARGET longer than the host's own best
(the shortest of its last BASE_SAMPLES), cut by STEP when they did not, and 0 once the host has sent
nothing for IDLE seconds (an idle host: full speed). The delay never exceeds what keeps the copy at
its floor rate (`--min-rate`; by default FLOOR_RATE, md's speed_limit_min of 1000 KB/s), nor MAX_DELAY:
a host that never idles still sees its move end. The migrator's write waits before the guard's
admission, so the claim's order is untouched: the pace only stretches the time between one
acknowledgement and the next write.
"""

from __future__ import annotations

import threading
import time
from collections import deque

IDLE = 0.25
TARGET = 0.010
STEP = 0.010
BASE_SAMPLES = 512
FLOOR_RATE = 1024 * 1024
MAX_DELAY = 2.0


class HostFirst:
    """`host_done(fetched)` for each host command; `pace(length)` before each migrator write."""

    def __init__(self, floor_rate: int = FLOOR_RATE, clock=time.monotonic, sleep=time.sleep):
        self._floor_rate, self._clock, self._sleep = floor_rate, clock, sleep
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=BASE_SAMPLES)
        self._window_longest = 0.0  # of host commands done since the last migrator write
        self._last_host = float("-inf")
        self._last_write = float("-inf")  # when the last pace began
        self.delay = 0.0
        self.yielded = 0.0  # seconds the migrator's writes waited in all

    def host_done(self, fetched: float) -> None:
        now = self._clock()
        latency = now - fetched
        with self._lock:
            self._latencies.append(latency)
            self._window_longest = max(self._window_longest, latency)
            self._last_host = now

    def pace(self, length: int) -> float:
        """Wait as the host's latency asks before a migrator write of `length` bytes; the seconds waited."""
        with self._lock:
            now = self._clock()
            # the floor counts the copy's own time for the last write too (not only the waits)
            own = now - self._last_write - self.delay
            ceiling = max(0.0, min(length / self._floor_rate - own, MAX_DELAY))
            if now - self._last_host > IDLE:
                self.delay = 0.0
            elif self._window_longest > min(self._latencies) + TARGET:
                self.delay = min(self.delay * 2 + STEP, ceiling)
            else:
                self.delay = max(min(self.delay - STEP, ceiling), 0.0)
            self._window_longest = 0.0
            delay = self.delay
        if delay:
            self._sleep(delay)
        with self._lock:
            self.yielded += delay
            self._last_write = self._clock() - delay
        return delay
