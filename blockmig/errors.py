"""The one error hierarchy. Every message is a single line a storage admin can act on.

The CLI catches BlockmigError, prints its message to stderr and exits with
`exit_code`; anything else escaping is a bug and shows a traceback.
"""


class BlockmigError(Exception):
    exit_code = 1


class UsageError(BlockmigError):
    """Bad input, refused before anything was changed."""

    exit_code = 2


class DeviceError(BlockmigError):
    """A block device (or image file) cannot be opened, sized or used as asked."""


class GuardRefusedWrite(BlockmigError):
    """The destination guard refused a write whose address is not the reserved one."""

    def __init__(self, designated: int, reserved: int | None):
        self.designated = designated
        self.reserved = reserved
        expected = "the pass is complete" if reserved is None else f"reserved write address is {reserved}"
        super().__init__(f"guard refused write at byte {designated}: {expected}; nothing written")


class VerifyError(BlockmigError):
    """Data read back does not match the manifest."""


class JournalError(BlockmigError):
    """The journal is missing, unreadable, or belongs to another job."""


class ArrayError(BlockmigError):
    """The storage array (LIO) refused or lacks something."""


class HostError(BlockmigError):
    """The host side (open-iscsi, multipath, udev) failed or timed out."""


class MigrationError(BlockmigError):
    """A migration step cannot proceed in the state it finds."""


class LabError(BlockmigError):
    """The lab (VM or lab arrays) cannot be built, started or reached."""


class Interrupted(BlockmigError):
    """SIGINT, SIGTERM or SIGHUP: blockmig stopped at a safe point; the journal says where to resume.

    The exit code is the shell's convention for a death by that signal (128 + its number):
    130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.
    """

    def __init__(self, signum: int, detail: str = ""):
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signal_name}" + (f": {detail}" if detail else ""))
