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
from datetime import datetime, timezone

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
    mode: str
    steps: list[tuple[str, float, float, str]] = field(default_factory=list)  # name, start, end, how it ended
    waits: list[tuple[float, float]] = field(default_factory=list)  # control-plane waits
    rates: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # phase -> (time, MB/s)
    # time, bytes, pass number, and "copied" (a delta pass) or "listed" (found small enough to leave to the
    # next step: the commit copies the last of it)
    deltas: list[tuple[float, int, int | None, str]] = field(default_factory=list)
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
    row = Row(journal.id, source.get("map") or source.get("device") or journal.id, journal.data["state"],
              journal.data.get("mode") or "offline")
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
            row.deltas.append((at, int(record.get("bytes") or 0), record.get("pass"), "listed"))
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
    # A listing was copied as a pass exactly when the next listing has a higher pass number.
    for index, (at, size, number, _) in enumerate(row.deltas[:-1]):
        if (row.deltas[index + 1][2] or 0) > (number or 0):
            row.deltas[index] = (at, size, number, "copied")
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
    figure = Figure(figsize=(12, 5.4 + 0.5 * len(rows)), layout="constrained")
    steps_ax, rate_ax, delta_ax = figure.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [1.3 + 0.5 * len(rows), 1.5, 1.3]})
    began = datetime.fromtimestamp(picture.start, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    figure.suptitle(f"{picture.title}, started {began}", fontsize=11)
    span = max([end for row in rows for _, _, end, _ in row.steps] + [1.0])
    _draw_steps(steps_ax, rows, span)
    _draw_rates(rate_ax, rows)
    _draw_deltas(delta_ax, rows, span)
    for ax in (rate_ax, delta_ax):
        for row in rows:
            for start, seconds in row.holds:
                ax.axvspan(start, start + seconds, color="#d62728", alpha=0.25, lw=0)
    delta_ax.set_xlim(0, span * 1.06)
    delta_ax.set_xlabel("seconds since the first run began")
    drawn = {name for row in rows for name, *_ in row.steps}
    legend = [Patch(facecolor=colour, label=STEP_LABELS.get(name, name))
              for name, colour in STEP_COLOURS.items() if name in drawn]
    if any(row.waits for row in rows):
        legend.append(Patch(facecolor="white", edgecolor="black", hatch="////",
                            label="waiting for another\nvolume's array work"))
    if any(row.holds for row in rows):
        legend.append(Patch(facecolor="#d62728", alpha=0.6, label="host IO held"))
    steps_ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    return figure


def _draw_steps(ax, rows: list[Row], span: float) -> None:
    """A row per volume: each step a bar (named where it is wide enough), control-plane waits hatched over
    it, the host IO hold in red above it, the longest host IO as a black line below it."""
    for y, row in enumerate(rows):
        for name, began, ended, how in row.steps:
            failed = how == "failed"
            bar = ax.barh(y, max(ended - began, 0.05), left=began, height=0.6,
                          color=STEP_COLOURS.get(name, "#ccc"), edgecolor="#d62728" if failed else "white",
                          linewidth=1.5 if failed else 0.5)
            bar.patches[0].set_gid(f"step:{name}:{how}")
            if ended - began > span * 0.07:
                ax.text((began + ended) / 2, y, STEP_LABELS.get(name, name), ha="center", va="center",
                        fontsize=8, color="white" if name in ("copy", "verify", "finish") else "black")
        for at, _, _, how in row.deltas:  # where each delta pass began, inside the copy or verify bar
            if how == "copied":
                ax.plot([at, at], [y - 0.3, y + 0.3], color="white", lw=1, gid="pass-tick")
        for began, ended in row.waits:
            wait = ax.barh(y, max(ended - began, 0.05), left=began, height=0.6, fill=False, hatch="////",
                           edgecolor="black", linewidth=0)
            wait.patches[0].set_gid("wait")
        for began, seconds in row.holds:
            hold = ax.barh(y, max(seconds, 0.05), left=began, height=0.85, color="#d62728", alpha=0.6)
            hold.patches[0].set_gid("hold")
            ax.annotate(f"host IO held {seconds:.1f} s", (began + seconds / 2, y - 0.43), xytext=(0, 1),
                        textcoords="offset points", fontsize=8, color="#b2182b", ha="center", va="bottom",
                        gid="label:hold")
        if row.host_io:
            ended, seconds = row.host_io
            ax.plot([ended - seconds, ended], [y + 0.4, y + 0.4], color="black", lw=2, gid="host-io")
            ax.annotate(f"longest host IO {seconds:.1f} s", (ended - seconds / 2, y + 0.43), xytext=(0, -1),
                        textcoords="offset points", fontsize=8, ha="center", va="top", gid="label:host-io")
        for at, error in row.failures:
            ax.plot([at], [y], marker="X", color="#d62728", markersize=11, gid="failed")
            ax.annotate(f"failed: {_shorten(error)}", (at, y - 0.32), xytext=(0, 1),
                        textcoords="offset points", fontsize=8, color="#b2182b",
                        ha="right" if at > span / 2 else "left", va="bottom",
                        gid="label:failed")
        if row.rolled_back is not None:
            ax.annotate("rolled back", (row.rolled_back, y), xytext=(4, 0), textcoords="offset points",
                        fontsize=8, va="center", gid="label:rolled-back")
    ax.set_yticks(range(len(rows)), [f"{row.label}\n{row.state}" for row in rows], fontsize=9)
    ax.set_ylim(len(rows) - 1 + 0.85, -0.85)
    ax.set_title("steps per volume", fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
def _draw_rates(ax, rows: list[Row]) -> None:
    """One migration: copy in the copy step's blue, verify in green; a plan: a colour per volume."""
    styles = {"copy": "-", "verify": "--", "verify-source": ":"}
    for number, row in enumerate(rows):
        for phase, points in row.rates.items():
            if not points:
                continue
            colour = STEP_COLOURS.get(phase.split("-")[0]) if len(rows) == 1 else _volume_colour(number)
            label = phase.replace("-", " ") if len(rows) == 1 else f"{row.label} {phase}"
            ax.plot([t for t, _ in points], [r for _, r in points], styles.get(phase, "-"), color=colour,
                    lw=1.4, label=label, gid=f"rate:{row.migration_id}:{phase}")
    ax.set_ylabel("MB/s")
    ax.set_ylim(bottom=0)
    ax.set_title("copy and verify rate", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _draw_deltas(ax, rows: list[Row], span: float) -> None:
    """Online: what the host wrote meanwhile, copied in each pass (a listing left to the next step dotted)."""
    width = span / 80
    for number, row in enumerate(rows):
        for at, size, pass_number, how in row.deltas:
            colour = "#6baed6" if len(rows) == 1 else _volume_colour(number)
            listed = how == "listed"
            bar = ax.bar(at, size / MiB, width=width, color=colour, edgecolor="black", linewidth=0.5,
                         fill=not listed, hatch="...." if listed else None)
            bar.patches[0].set_gid(f"listed:{pass_number}" if listed else f"delta:{pass_number}")
            name = "listed, left" if listed else f"pass {pass_number}"
            who = f"{row.label}\n" if len(rows) > 1 else ""
            ax.annotate(f"{who}{name}\n{_size(size)}", (at, size / MiB), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, gid="label:delta")
    ax.set_ylabel("MiB")
    ax.set_title("delta passes: what the host wrote since the previous pass, copied again", fontsize=10,
                 loc="left")
    ax.grid(axis="y", alpha=0.3)
    if not any(row.deltas for row in rows):
        offline = all(row.mode == "offline" for row in rows)
        text = "no delta passes" + (": offline, the source was fenced for the copy" if offline else "")
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#636363",
                gid="no-deltas")
    ax.set_ylim(bottom=0, top=max([size / MiB for row in rows for _, size, *_ in row.deltas] + [0.5]) * 1.6)


def _volume_colour(number: int) -> str:
    colours = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
    return colours[number % len(colours)]


def _size(size: int) -> str:
    return f"{size / MiB:.1f} MiB" if size >= MiB else f"{size / 1024:.0f} KiB"


def _shorten(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
