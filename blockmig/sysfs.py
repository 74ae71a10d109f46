"""Small kernel files (sysfs attributes, /proc) read the forgiving way."""


def read_attribute(path: str) -> str:
    """The file's text without surrounding white space; '' when it is missing or unreadable.

    Devices come and go under us (a disk deleted, a session logged out), so a
    vanished attribute simply means "not there".
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""
