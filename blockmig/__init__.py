"""blockmig: move a block volume between iSCSI arrays with a guarded copy, then switch the host."""

__version__ = "0.1.0"
