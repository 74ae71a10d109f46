"""The handler's host-first pace of the migrator's writes (array/tcmu/pace.py), on a fake clock."""

import pytest

from blockmig.array.tcmu import pace

MiB = 1024 * 1024


class Clock:
    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def pacer(clock):
    pacer = pace.HostFirst(clock=clock, sleep=clock.sleep)
    assert pacer.pace(MiB) == 0.0  # the copy's first write: nothing to pace it by yet
    return pacer


def host_command(clock: Clock, pacer: pace.HostFirst, latency: float) -> None:
    fetched = clock.now
    clock.now += latency
    pacer.host_done(fetched)


def test_a_host_that_sent_nothing_never_slows_the_copy(pacer, clock):
    assert [pacer.pace(MiB) for _ in range(5)] == [0.0] * 5
    assert clock.slept == [] and pacer.yielded == 0.0


def test_while_the_hosts_commands_are_slower_than_its_best_the_delay_doubles_up_to_the_floor(pacer, clock):
    for _ in range(20):
        host_command(clock, pacer, 0.001)  # its best
    delays = []
    for _ in range(12):
        host_command(clock, pacer, 0.001 + pace.TARGET + 0.005)  # slowed by the write before
        delays.append(pacer.pace(MiB))
    assert delays[:3] == pytest.approx([pace.STEP, 3 * pace.STEP, 7 * pace.STEP])
    # the floor: a MiB a second, the copy's own time between two writes (here the host command's) counted
    assert max(delays) == pytest.approx(MiB / pace.FLOOR_RATE - (0.001 + pace.TARGET + 0.005))
    assert delays[-1] == max(delays)
    assert pacer.yielded == pytest.approx(sum(delays)) and clock.slept == pytest.approx(delays)


def test_a_floor_rate_given_caps_the_delay_by_it(clock):
    pacer = pace.HostFirst(floor_rate=8 * MiB, clock=clock, sleep=clock.sleep)
    pacer.pace(4 * MiB)
    host_command(clock, pacer, 0.001)
    for _ in range(10):
        host_command(clock, pacer, 0.1)
        pacer.pace(4 * MiB)
    assert pacer.delay == pytest.approx(0.5 - 0.1)  # 4 MiB at 8 MiB/s, less the copy's own 0.1 s


def test_a_big_chunk_waits_max_delay_at_most(pacer, clock):
    host_command(clock, pacer, 0.001)
    for _ in range(30):
        host_command(clock, pacer, 0.5)
        pacer.pace(256 * MiB)
    assert pacer.delay == pace.MAX_DELAY


def test_once_the_host_is_served_as_fast_as_its_best_the_delay_shrinks_a_step_a_write(pacer, clock):
    host_command(clock, pacer, 0.001)
    for _ in range(4):
        host_command(clock, pacer, 0.1)
        pacer.pace(MiB)
    hurt = pacer.delay
    assert hurt == pytest.approx(15 * pace.STEP)
    shrinking = []
    for _ in range(3):
        host_command(clock, pacer, 0.001 + pace.TARGET / 2)  # within the target
        shrinking.append(pacer.pace(MiB))
    assert shrinking == pytest.approx([hurt - pace.STEP, hurt - 2 * pace.STEP, hurt - 3 * pace.STEP])


def test_a_host_that_went_quiet_gets_the_copy_at_full_speed_again(pacer, clock):
    host_command(clock, pacer, 0.001)
    for _ in range(5):
        host_command(clock, pacer, 0.2)
        pacer.pace(MiB)
    assert pacer.delay > 0
    clock.now += pace.IDLE + 0.01
    assert pacer.pace(MiB) == 0.0 and pacer.delay == 0.0


def test_only_the_commands_since_the_last_write_count(pacer, clock):
    """A slow host command seen before one write does not slow the write after the next one."""
    host_command(clock, pacer, 0.001)
    host_command(clock, pacer, 0.3)
    assert pacer.pace(MiB) == pytest.approx(pace.STEP)
    host_command(clock, pacer, 0.001)
    assert pacer.pace(MiB) == 0.0
