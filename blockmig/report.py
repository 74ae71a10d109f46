"""The picture of a migration or a plan, drawn after the fact from what its runs recorded (timeline.py).

`load(ID)` gathers, for a migration or each member of a plan, its journal and its records and turns the
records into what is drawn: step intervals per volume, control-plane waits, copy and verify rates, delta
passes, the host IO hold and, where a host workload measured it, the longest single host IO.
`draw(model, path)` renders that with matplotlib (imported here only, so the rest of blockmig never
pays for it) on the Agg backend, as SVG or PNG by the file's suffix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from blockmig import timeline
from blockmig.errors import UsageError
from blockmig.state import MigrationJournal, PlanJournal

MATPLOTLIB_MISSING = ("matplotlib is not installed: apt-get install python3-matplotlib "
                      "or pip install 'blockmig[plot]'")
PLOT_SUFFIXES = (".svg", ".png")
STEP_COLOURS = {"plan": "#bdbdbd", "create_destination": "#9ecae1", "fence": "#c6dbef", "copy": "#3182bd",
                "verify": "#31a354", "switch": "#fd8d3c", "finish": "#756bb1", "rollback": "#969696"}
STEP_LABELS = {"create_destination": "create destination"}
MiB = 1 << 20


@dataclass
class Row:
    """One volume's story, in seconds since the picture's start."""

    migration_id: str
    label: str
    state: str
    steps: list[tuple[str, float, float, str]] = field(default_factory=list)  # name, start, end, how it ended
    waits: list[tuple[float, float]] = field(default_factory=list)  # control-plane waits
    rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # phase -> (time, MB/s)
    deltas: list[tuple[float, int, int | None]] = field(default_factory=list)  # time, bytes, pass (None: in hold)
    holds: list[tuple[float, float]] = field(default_factory=list)  # start, seconds
    host_io: tuple[float, float] | None = None  # the longest single host IO: when it ended, seconds
    failures: list[tuple[float, str]] = field(default_factory=list)
    rolled_back: float | None = None


@dataclass
class Picture:
    title: str
    start: float  # epoch seconds of time 0
    rows: list[Row]


def load(identifier: str) -> Picture:
    """The picture of a plan (a row per member) or of one migration."""
    if PlanJournal.exists(identifier):
        plan = PlanJournal.load(identifier)
        journals = [MigrationJournal.load(member) for member in plan.members]
        title = f"plan {plan.id}: {plan.data.get('state')}, switch {plan.data.get('policy')}, " \
                f"{len(journals)} volumes"
    else:
        journals = [MigrationJournal.load(identifier)]
        data = journals[0].data
        title = f"migration {data['id']}: {data['state']}, {data.get('mode', 'offline')}, " \
                f"{data['source'].get('size', 0) / MiB:.0f} MiB"
    records = {journal.id: timeline.load_records(journal.directory) for journal in journals}
    times = [record["t"] for found in records.values() for record in found if record["e"] != "planned"]
    start = min(times) if times else 0.0
    return Picture(title, start, [_row(journal, records[journal.id], start) for journal in journals])


def _row(journal: MigrationJournal, records: list[dict], start: float) -> Row:
    source = journal.data["source"]
    row = Row(journal.id, source.get("map") or source.get("device") or journal.id, journal.data["state"])
    open_steps: dict[str, float] = {}
    wait_began = None
    last = start
    progress: dict[str, tuple[float, int]] = {}

    def close_open(at: float, how: str) -> None:
        for name, began in open_steps.items():
            row.steps.append((name, began, at, how))
        open_steps.clear()

    for record in records:
        if record["e"] == "planned":
            continue
        at = record["t"] - start
        kind = record["e"]
        if kind == "run":
            close_open(last, "interrupted")  # the previous run ended without a word (kill -9, power loss)
            if record.get("action") == "rollback":
                open_steps["rollback"] = at
        elif kind == "step":
            if record["state"] == "started":
                open_steps[record["step"]] = at
            elif record["step"] in open_steps:
                row.steps.append((record["step"], open_steps.pop(record["step"]), at, "done"))
        elif kind == "control_plane_wait":
            if record["state"] == "started":
                wait_began = at
            elif wait_began is not None:
                row.waits.append((wait_began, at))
                wait_began = None
        elif kind == "phase":
            phase = record.get("phase") or "copy"
            if record["state"] == "started":
                progress[phase] = (at, record.get("from") or 0)
                row.rates.setdefault(phase, [])
            elif phase in progress and record.get("state") == "done":
                _add_rate(row, phase, progress, at, record.get("total") or journal.data["source"].get("size"))
        elif kind == "progress":
            phase = record.get("phase") or "copy"
            if phase in progress and record.get("bytes") is not None:
                _add_rate(row, phase, progress, at, record["bytes"])
        elif kind == "delta":
            row.deltas.append((at, int(record.get("bytes") or 0), record.get("pass")))
        elif kind == "io_resumed" and record.get("io_held_seconds") is not None:
            row.holds.append((at - record["io_held_seconds"], record["io_held_seconds"]))
        elif kind == "host_io":
            if row.host_io is None or record["seconds"] > row.host_io[1]:
                row.host_io = (at, record["seconds"])
        elif kind == "failed":
            close_open(at, "failed")
            row.failures.append((at, record.get("error", "")))
        elif kind == "rolled_back":
            close_open(at, "done")
            row.rolled_back = at
        last = at
    close_open(last, "running" if journal.data["state"] in ("running", "rolling_back") else "interrupted")
    final = journal.facts("switch").get("final_delta")
    if final and row.holds:  # the last delta, copied inside the hold
        row.deltas.append((row.holds[-1][0], int(final.get("bytes") or 0), None))
    return row


def _add_rate(row: Row, phase: str, progress: dict, at: float, done_bytes: int) -> None:
    """The rate since the previous sample of this phase, drawn as a step from there to here."""
    began, before = progress[phase]
    if at > began and done_bytes >= before:
        rate = (done_bytes - before) / (at - began) / 1e6
        row.rates[phase] += [(began, rate), (at, rate)]
    progress[phase] = (at, done_bytes)


def require_matplotlib():
    """matplotlib, or the one line that says how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(MATPLOTLIB_MISSING) from None
    return matplotlib


def draw(picture: Picture, path: str):
    """Render the picture to `path` (.svg or .png); returns the matplotlib figure (tests read its artists)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {path}: the file name must end in .svg or .png")
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = picture.rows
    figure = Figure(figsize=(12, 5.2 + 0.45 * len(rows)), layout="constrained")
    steps_ax, rate_ax, delta_ax = figure.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [1.2 + 0.45 * len(rows), 1.6, 1.3]})
    figure.suptitle(picture.title, fontsize=11)
    _draw_steps(steps_ax, rows)
    _draw_rates(rate_ax, rows)
    _draw_deltas(delta_ax, rows)
    for ax in (rate_ax, delta_ax):
        for row in rows:
            for began, seconds in row.holds:
                ax.axvspan(began, began + seconds, color="#d62728", alpha=0.25, lw=0)
    delta_ax.set_xlabel("seconds since the migration started")
    legend = [Patch(facecolor=STEP_COLOURS[name], label=STEP_LABELS.get(name, name)) for name in STEP_COLOURS]
    legend += [Patch(facecolor="white", edgecolor="black", hatch="////", label="waiting for another volume"),
               Patch(facecolor="#d62728", alpha=0.6, label="host IO held")]
    steps_ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    return figure


def _draw_steps(ax, rows: list[Row]) -> None:
    """A row per volume: each step a bar, control-plane waits hatched over it, the hold in red on top."""
    for y, row in enumerate(rows):
        for name, began, ended, how in row.steps:
            bar = ax.barh(y, max(ended - began, 0.05), left=began, height=0.6, color=STEP_COLOURS.get(name, "#ccc"),
                          edgecolor="#d62728" if how == "failed" else "white", linewidth=1.5 if how == "failed" else 0.5)
            bar.patches[0].set_gid(f"step:{name}:{how}")
        for began, ended in row.waits:
            wait = ax.barh(y, max(ended - began, 0.05), left=began, height=0.6, fill=False, hatch="////",
                           edgecolor="black", linewidth=0)
            wait.patches[0].set_gid("wait")
        for began, seconds in row.holds:
            hold = ax.barh(y, max(seconds, 0.05), left=began, height=0.85, color="#d62728", alpha=0.6)
            hold.patches[0].set_gid("hold")
            ax.annotate(f"host IO held {seconds:.1f} s", (began + seconds, y - 0.42), xytext=(3, 0),
                        textcoords="offset points", fontsize=8, color="#b2182b", va="top", gid="label:hold")
        if row.host_io:
            ended, seconds = row.host_io
            ax.plot([ended - seconds, ended], [y + 0.38, y + 0.38], color="black", lw=2, gid="host-io")
            ax.annotate(f"longest host IO {seconds:.1f} s", (ended, y + 0.38), xytext=(3, 0),
                        textcoords="offset points", fontsize=8, va="center", gid="label:host-io")
        for at, error in row.failures:
            ax.plot([at], [y], marker="X", color="#d62728", markersize=11, gid="failed")
            ax.annotate(f"failed: {_shorten(error)}", (at, y + 0.32), xytext=(4, 0), textcoords="offset points",
                        fontsize=8, color="#b2182b", va="bottom", gid="label:failed")
        if row.rolled_back is not None:
            ax.annotate("rolled back", (row.rolled_back, y), xytext=(4, 0), textcoords="offset points",
                        fontsize=8, va="center", gid="label:rolled-back")
    ax.set_yticks(range(len(rows)), [f"{row.label}\n{row.state}" for row in rows], fontsize=9)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_title("steps per volume", fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)


def _draw_rates(ax, rows: list[Row]) -> None:
    styles = {"copy": "-", "verify": "--", "verify-source": ":"}
    for row in rows:
        for phase, points in row.rates.items():
            if points:
                who = f"{row.label} " if len(rows) > 1 else ""
                ax.plot([t for t, _ in points], [r for _, r in points], styles.get(phase, "-"), lw=1.4,
                        label=f"{who}{phase}", gid=f"rate:{row.migration_id}:{phase}")
    ax.set_ylabel("MB/s")
    ax.set_ylim(bottom=0)
    ax.set_title("copy and verify rate", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _draw_deltas(ax, rows: list[Row]) -> None:
    """Online: what the host wrote meanwhile, copied in each pass; the last one inside the hold."""
    span = max([end for row in rows for _, _, end, _ in row.steps] + [1.0])
    width = span / 80
    for row in rows:
        for at, size, number in row.deltas:
            in_hold = number is None
            bar = ax.bar(at, size / MiB, width=width, color="#d62728" if in_hold else "#6baed6",
                         edgecolor="black", linewidth=0.5)
            bar.patches[0].set_gid("delta:hold" if in_hold else f"delta:{number}")
            name = "in hold" if in_hold else f"pass {number}"
            ax.annotate(f"{name}\n{_size(size)}", (at, size / MiB), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, gid="label:delta")
    ax.set_ylabel("MiB")
    ax.set_title("delta passes: what the host wrote since the previous pass", fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.3)
    if not any(row.deltas for row in rows):
        ax.text(0.5, 0.5, "no delta passes (offline: the source was fenced for the copy)", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, color="#636363", gid="no-deltas")
    ax.set_ylim(bottom=0, top=max([size / MiB for row in rows for _, size, _ in row.deltas] + [0.5]) * 1.35)


def _size(size: int) -> str:
    return f"{size / MiB:.1f} MiB" if size >= MiB else f"{size / 1024:.0f} KiB"


def _shorten(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
