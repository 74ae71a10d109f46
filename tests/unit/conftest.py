"""Fixtures for the data path: real loop devices that are always detached."""

from __future__ import annotations

import os

import pytest
from datapath_helpers import LoopDevices


@pytest.fixture
def loops(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("loop device tests need root (losetup)")
    devices = LoopDevices(tmp_path)
    try:
        yield devices
    finally:
        devices.detach_all()
