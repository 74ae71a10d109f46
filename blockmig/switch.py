"""The host switch (blockmig/orchestrator/host_switch.py), under the name the lab tests use."""

from blockmig.host.devices import map_disks
from blockmig.host.iscsi import parse_portal
from blockmig.orchestrator.host_switch import DEFAULT_SWITCH_TIMEOUT, HostSwitch, switch_group

__all__ = ["DEFAULT_SWITCH_TIMEOUT", "HostSwitch", "map_disks", "parse_portal", "switch_group"]
