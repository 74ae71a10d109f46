"""Migration and plan ids: the one check, because an id becomes a directory name under the state root.

Letters, digits, '.', '_' and '-', starting with a letter or digit, at most 41 characters: no '/', no '..',
no NUL, nothing a path could climb out of the state directory with, short enough for an iface name.
"""

from __future__ import annotations

import re

from blockmig.errors import UsageError

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}")


def is_valid_id(value) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value, what: str = "id") -> str:
    """`value` if it is an id, else UsageError (exit 2) naming `what`."""
    if not is_valid_id(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise UsageError(f"{what}: {shown} is not an id: use letters, digits, '.', '_', '-' "
                         "(at most 41, starting with a letter or digit)")
    return value
