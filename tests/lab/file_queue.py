"""Lab guests side by side share tests/lab as one queue of files: each guest runs the next unclaimed file.

scripts/test starts every guest on the whole of tests/lab with BLOCKMIG_LAB_QUEUE=DIR (a folder of the
host's, shared with the guests). Longest files first (tests/lab/durations.txt), a guest claims a file
by making DIR/<file> (mkdir is atomic on the host's filesystem, also through 9p), runs that file's
tests, and claims the next; the files another guest claimed are not this guest's, so they are neither
run nor reported here (deselected, not skipped). A guest that finishes early takes over the rest, so
a wrong estimate costs minutes, not the difference between two static halves.
scripts/test checks afterwards that every file was claimed and every claimed file reported.

BLOCKMIG_LAB_BUDGET=SECONDS: a guest claims a file only while the file's estimate, with SLACK for a
slow day, still ends inside its budget; past it the guest stops and writes its report, so a run that
outgrows the guest's timeout shows what passed and which files nobody ran, not a killed guest's nothing.
"""

from __future__ import annotations

import os
import pathlib
import time
import uuid

DURATIONS = pathlib.Path(__file__).with_name("durations.txt")
SLACK = 1.2  # on a slow day; the budget keeps 150 s more for a file that runs over


def file_seconds() -> dict[str, float]:
    """Seconds per file from durations.txt (a file missing there counts as half the longest)."""
    seconds = {}
    for line in DURATIONS.read_text().splitlines() if DURATIONS.exists() else []:
        fields = line.split("#")[0].split()
        if len(fields) == 2:
            seconds[pathlib.Path(fields[0]).name] = float(fields[1])
    return seconds


def estimate(seconds: dict[str, float], name: str) -> float:
    """A file's seconds from file_seconds(); half the longest for a file missing there."""
    return seconds.get(name, max(seconds.values(), default=60.0) / 2)


def longest_first(names: list[str], seconds: dict[str, float]) -> list[str]:
    return sorted(names, key=lambda name: (-estimate(seconds, name), name))


def claim(queue: str, name: str) -> bool:
    try:
        os.mkdir(os.path.join(queue, name))
    except FileExistsError:
        return False
    return True


def pytest_runtestloop(session):
    queue = os.environ.get("BLOCKMIG_LAB_QUEUE")
    if not queue or session.config.option.collectonly:
        return None
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} error(s) during collection")
    by_file: dict[str, list] = {}
    for item in session.items:
        by_file.setdefault(item.path.name, []).append(item)
    mine = []
    budget = float(os.environ.get("BLOCKMIG_LAB_BUDGET", "inf"))
    began = time.monotonic()
    seconds = file_seconds()
    for name in longest_first(list(by_file), seconds):
        if session.shouldfail or session.shouldstop:
            break
        if time.monotonic() - began + SLACK * estimate(seconds, name) > budget:
            print(f"\n-- {name} not started: its estimate ends past the guest's budget of {budget:.0f} s",
                  flush=True)
            continue
        if not claim(queue, name):
            continue
        items = by_file[name]
        mine.append(name)
        for index, item in enumerate(items):
            nextitem = items[index + 1] if index + 1 < len(items) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
    with open(os.path.join(queue, f"ran-by-{uuid.uuid4().hex[:12]}"), "w") as handle:  # guests share pids
        handle.write("\n".join(mine) + "\n")
    return True
