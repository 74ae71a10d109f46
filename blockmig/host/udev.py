"""Waiting for the host's device nodes and reading their identity.

Logins, rescans and deletes finish asynchronously (the SCSI scan, udev's
rules, multipathd's event handling), so every host step waits for the state
it needs with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pyudev

from blockmig.errors import HostError
from blockmig.host.runner import run_command, time_left

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
POLL_INTERVAL = 0.1


def wait_until(check: Callable[[], T], what: str, timeout: float = DEFAULT_TIMEOUT) -> T:
    """Call `check` until it returns something truthy; return that, or HostError after `timeout` s."""
    import tenacity  # here: it imports asyncio, a third of a `blockmig status` start under TCG (0.8 of 2.6 s)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(POLL_INTERVAL),
        retry=tenacity.retry_if_result(lambda result: not result),
    )
    try:
        return retrying(check)
    except tenacity.RetryError:
        raise HostError(f"timed out after {timeout:g} s waiting for {what}") from None


def wait_for_path(path: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Wait for a device node or udev symlink to exist; return its resolved /dev path."""
    wait_until(lambda: os.path.exists(path), f"{path} to appear", timeout)
    return os.path.realpath(path)


def wait_for_path_gone(path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    wait_until(lambda: not os.path.lexists(path), f"{path} to go away", timeout)


def wait_for_udev(name: str, timeout: float = DEFAULT_TIMEOUT) -> pyudev.Device:
    """Wait until udev has processed block device `name` (its rules ran, its database entry exists).

    Listens to udev's own events rather than polling, so a caller that
    acts on udev's properties (multipathd's `add path`) acts at once.
    """
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("block")
    monitor.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            device = pyudev.Devices.from_name(context, "block", name)
        except pyudev.DeviceNotFoundError:
            device = None
        if device is not None and device.is_initialized:
            return device
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HostError(f"timed out after {timeout:g} s waiting for udev to process {name}")
        monitor.poll(timeout=min(remaining, 1.0))  # the next block event, whichever device it is about


def settle(timeout: float = DEFAULT_TIMEOUT) -> None:
    """Let udev finish the events queued so far (symlinks, multipath's claim of new paths)."""
    bound, _ = time_left(timeout)  # inside a phase with a deadline, udevadm's own timeout is what is left
    result = run_command(["udevadm", "settle", f"--timeout={max(int(bound), 1)}"], "udevadm settle failed",
                         timeout + 5)
    if result.returncode != 0:
        raise HostError(f"udevadm settle failed: {result.stderr.strip() or result.returncode}")


def disk_name(device: str) -> str:
    """'sdb' for '/dev/sdb', 'sdb' or a by-path link to it."""
    return os.path.basename(os.path.realpath(device)) if device.startswith("/") else device


def disk_wwid(device: str) -> str:
    """The WWID multipath uses for a SCSI disk: udev's ID_SERIAL (e.g. 36001405…).

    Read from udev's database via pyudev; falls back to the kernel's VPD 0x83
    designator in sysfs while udev has not processed the disk yet.
    """
    name = disk_name(device)
    try:
        udev_device = pyudev.Devices.from_name(pyudev.Context(), "block", name)
        serial = udev_device.properties.get("ID_SERIAL")
        if serial:
            return serial
    except pyudev.DeviceNotFoundError:
        pass
    try:
        with open(f"/sys/block/{name}/device/wwid") as f:
            designator = f.read().strip()
    except OSError as exc:
        raise HostError(f"cannot read the WWID of {name}: {exc.strerror}") from exc
    return wwid_from_sysfs(designator)


def wwid_from_sysfs(designator: str) -> str:
    """Turn the kernel's 'naa.6001405…' into the '36001405…' form udev and multipath print."""
    kind, _, value = designator.partition(".")
    if kind == "naa":
        return "3" + value.lower()
    if kind == "eui":
        return "2" + value.lower()
    raise HostError(f"unexpected SCSI designator {designator!r}; cannot derive a WWID")


def scsi_disks() -> list[str]:
    """Names of the SCSI disks the host has now (sda, sdb, …)."""
    return sorted(name for name in os.listdir("/sys/block") if name.startswith("sd"))


def disks_with_wwid(wwid: str) -> list[str]:
    return [name for name in scsi_disks() if _safe_wwid(name) == wwid]


def _safe_wwid(name: str) -> str | None:
    try:
        return disk_wwid(name)
    except HostError:
        return None
