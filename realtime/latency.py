"""Per-session latency report of the realtime service.

The service appends one CSV row per published `result` (`LatencyLog`); `write_report` turns that
file into latency.json (the numbers of `LatencyReport`) and latency.png (per-trial stage times
and the distribution of end-to-end latency). Stages are those of `mindeye.protocol.TIMING_STAGES`
(docs/protocol.md, "result"), in ms.

Statistics cover decoded, non-recovered results only: a skipped trial ran only part of the
pipeline, and a recovered one was re-published from the journal after a restart, so its
end-to-end time measures the outage, not the service. Both are still counted.

The `hit` column is realtime.hits's top-1 verdict: 1 or 0 only for a decoded trial whose seen image
was a candidate, empty otherwise. A latency.csv written before that definition filled it for every
decoded trial with a known image; its hit rate is not comparable.

A scanner side that reads the scanner's files (mindeye-bridge) stamps each volume with when its file
was seen, read and registered, and with its head motion (protocol 1.3). The service appends one row
per accepted volume to volumes.csv (`VolumeLog`); the report then adds the bridge's stages per volume
- `file_read` (seen -> read), `register` (read -> registered: motion correction and resampling),
`send` (registered -> sent), `transit` (sent -> received by the service: two clocks, meaningful when
they are synchronised, as on one host) and `scanner_to_service` (seen -> received) - and framewise
displacement (volumes over `FD_THRESHOLD_MM` counted).

    mindeye-latency-report runs/subj01-nsd01/latency.csv   # or the folder holding it
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mindeye.cli import plain_command
from mindeye.errors import FormatError, MissingFileError
from mindeye.motion import MOTION_PARAMS
from mindeye.protocol import TIMING_STAGES, Result, Volume
from realtime.hits import Top1Tally, result_hit

log = logging.getLogger(__name__)

LATENCY_CSV = "latency.csv"
REPORT_JSON = "latency.json"
REPORT_PNG = "latency.png"
BEFORE_STAGES = ("session", "run", "trial", "image_id", "volume_index", "published_unix_s", "batch_size", "flags")
AFTER_STAGES = ("top1_image_id", "hit")
COLUMNS = (*BEFORE_STAGES, *TIMING_STAGES, *AFTER_STAGES)
PERCENTILES = (50, 90, 95, 99)
FLAG_SEPARATOR = ";"
VOLUMES_CSV = "volumes.csv"
VOLUME_COLUMNS = ("session", "run", "index", "received_unix_s", *MOTION_PARAMS, "fd_mm", "seen_unix_s",
                  "read_unix_s", "registered_unix_s", "sent_unix_s")
BRIDGE_STAGES = ("file_read", "register", "send", "transit", "scanner_to_service")  # ms, per volume
FD_THRESHOLD_MM = 0.5  # framewise displacement flagged, as in common real-time QA (Power et al. 2012's 0.5 mm)
# Bar colours of the stages within end_to_end; a stage added to TIMING_STAGES later gets a grey one.
STAGE_COLORS = {"receive": "tab:blue", "journal": "tab:cyan", "glm": "tab:green", "queue": "tab:pink",
                "decode": "tab:purple", "generate": "tab:orange", "publish": "tab:brown"}


# ---- writing ------------------------------------------------------------------------------------------

class _AppendedCsv:
    """A CSV appended and flushed row by row (a crash loses nothing already written). `__init__` creates
    the file with its header, or continues an existing one (a restarted service) whose header is the
    same; another header is a FormatError. A last line cut short by a crash is dropped."""

    def __init__(self, path_csv: Path, columns: tuple[str, ...]):
        self.path = Path(path_csv)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_header = _prepare_for_append(self.path, columns)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if needs_header:
            self._write(columns)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, cells: Iterable[Any]) -> None:
        self._writer.writerow(cells)
        self._file.flush()  # no fsync, which costs ms per row


class LatencyLog(_AppendedCsv):
    """One CSV row per published result."""

    def __init__(self, path_csv: Path):
        super().__init__(path_csv, COLUMNS)
        self._unknown_stages: set[str] = set()

    def add(self, result: Result, *, published_unix_s: float, batch_size: int | None = None) -> None:
        """Append `result`'s row; `batch_size` is how many trials were decoded together with it."""
        for flag in result.flags:
            if FLAG_SEPARATOR in flag:
                raise ValueError(f"result flag {flag!r} contains '{FLAG_SEPARATOR}', the CSV's flag separator")
        unknown = set(result.timings_ms) - set(TIMING_STAGES) - self._unknown_stages
        if unknown:  # a newer service may time more stages; this table has a fixed set of columns
            log.warning("latency log %s: stages %s are not in TIMING_STAGES and are not recorded", self.path,
                        sorted(unknown))
            self._unknown_stages |= unknown
        top1 = result.top_k[0].image_id if result.top_k else None
        hit = result_hit(result)  # empty unless the seen image was a candidate (realtime.hits)
        stage_cells = [_cell(result.timings_ms.get(stage), "{:.4f}") for stage in TIMING_STAGES]
        self._write([result.session, result.run, result.trial, _cell(result.image_id), result.volume_index,
                     f"{published_unix_s:.6f}", _cell(batch_size), FLAG_SEPARATOR.join(result.flags),
                     *stage_cells, _cell(top1), _cell(None if hit is None else int(hit))])


class VolumeLog(_AppendedCsv):
    """One CSV row per volume the service accepted: its motion and the bridge's times (empty cells for a
    sender that sends neither)."""

    def __init__(self, path_csv: Path):
        super().__init__(path_csv, VOLUME_COLUMNS)

    def add(self, volume: Volume, *, received_unix_s: float) -> None:
        motion, times = volume.motion, volume.bridge
        motion_cells = [""] * 7 if motion is None else [f"{v:.6g}" for v in (*motion.params_6, motion.fd_mm)]
        time_cells = [""] * 3 if times is None else [f"{t:.6f}" for t in (times.seen_unix_s, times.read_unix_s,
                                                                          times.registered_unix_s)]
        self._write([volume.session, volume.run, volume.index, f"{received_unix_s:.6f}", *motion_cells, *time_cells,
                     f"{volume.envelope.sent_unix_s:.6f}"])


def _cell(value: Any, spec: str = "{}") -> str:
    return "" if value is None else spec.format(value)


def _prepare_for_append(path: Path, columns: tuple[str, ...]) -> bool:
    """Whether `path` needs a header. Checks the header of an existing file, and cuts a last line left
    without its newline: a crash interrupted that write, and the row is incomplete."""
    content = path.read_bytes() if path.exists() else b""
    header = ",".join(columns).encode()
    complete = content[:content.rfind(b"\n") + 1]
    first_line = content.split(b"\n", 1)[0].rstrip(b"\r")
    if not (first_line == header if complete else header.startswith(content)):
        raise FormatError(path, f"line 1 (header) of {_log_name(columns)}",
                          header.decode(),
                          first_line[:300].decode("utf-8", errors="replace"))
    if len(complete) < len(content):
        log.warning("latency log %s: dropping a last line cut short (%d bytes), likely by a crash", path,
                    len(content) - len(complete))
        with open(path, "r+b") as file:
            file.truncate(len(complete))
    return not complete


# ---- reading ------------------------------------------------------------------------------------------

def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError
        return value
    return parse


def _number(minimum: float | None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise ValueError
        return value
    return parse


def _identifier(text: str) -> str:
    if not text:
        raise ValueError
    return text


def _hit(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError
    return text == "1"


def _flags(text: str) -> tuple[str, ...]:
    return tuple(text.split(FLAG_SEPARATOR)) if text else ()


# column -> (parser, what it expects, whether the cell may be empty -> None)
_PARSERS: dict[str, tuple[Callable[[str], Any], str, bool]] = {
    "session": (_identifier, "a session id", False),
    "run": (_integer(1), "an integer >= 1", False),
    "trial": (_integer(0), "an integer >= 0", False),
    "image_id": (_integer(0), "an integer >= 0 or empty", True),
    "volume_index": (_integer(0), "an integer >= 0", False),
    "published_unix_s": (_number(None), "a finite number (unix seconds)", False),
    "batch_size": (_integer(1), "an integer >= 1 or empty", True),
    "flags": (_flags, "flags joined by ';'", False),
    **{stage: (_number(0.0), "a number of ms >= 0 or empty", True) for stage in TIMING_STAGES},
    "top1_image_id": (_integer(0), "an integer >= 0 or empty", True),
    "hit": (_hit, "1, 0 or empty", True),
}


def _log_name(columns: tuple[str, ...]) -> str:
    return f"a {'latency' if columns == COLUMNS else 'volume'} log"


def _past_header(file, path: Path, columns: tuple[str, ...]):
    """A csv reader of `file` past its header line, which must be `columns` (FormatError otherwise)."""
    reader = csv.reader(file)
    header = next(reader, None)
    if header != list(columns):
        raise FormatError(path, f"line 1 (header) of {_log_name(columns)}", ",".join(columns),
                          "an empty file" if header is None else ",".join(header)[:300])
    return reader


def read_latency_csv(path: str | Path) -> list[dict]:
    """The rows of a latency log, in publication order, as dicts keyed by `COLUMNS`: ints, floats
    (stages in ms), a tuple of flags, a bool `hit`; None for empty cells. FormatError names the
    line and column of the first bad cell."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "latency log", f"the service writes {LATENCY_CSV} in its session folder")
    with open(path, newline="", encoding="utf-8") as file:
        reader = _past_header(file, path, COLUMNS)
        rows = []
        for cells in reader:
            if not cells:  # a blank line, e.g. from editing by hand
                continue
            if len(cells) != len(COLUMNS):
                raise FormatError(path, f"line {reader.line_num}", f"{len(COLUMNS)} comma-separated cells",
                                  f"{len(cells)}")
            rows.append({column: _parse_cell(path, reader.line_num, column, text)
                         for column, text in zip(COLUMNS, cells)})
    return rows


def _parse_cell(path: Path, line: int, column: str, text: str) -> Any:
    parse, expected, may_be_empty = _PARSERS[column]
    if text == "" and may_be_empty:
        return None
    try:
        return parse(text)
    except ValueError:
        raise FormatError(path, f"line {line}, column '{column}'", expected, repr(text[:60])) from None


def read_volumes_csv(path: str | Path) -> list[dict]:
    """The rows of a volume log as dicts keyed by `VOLUME_COLUMNS`: numbers, None for empty cells."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as file:
        reader = _past_header(file, path, VOLUME_COLUMNS)
        rows = []
        for cells in reader:
            if len(cells) != len(VOLUME_COLUMNS):
                raise FormatError(path, f"line {reader.line_num}", f"{len(VOLUME_COLUMNS)} cells", f"{len(cells)}")
            try:
                rows.append({column: cell if column == "session" else (None if cell == "" else float(cell))
                             for column, cell in zip(VOLUME_COLUMNS, cells)})
            except ValueError:
                raise FormatError(path, f"line {reader.line_num}", "numbers or empty cells",
                                  repr(cells)[:200]) from None
    return rows


def bridge_stages_ms(row: dict) -> dict[str, float | None]:
    """The bridge's stages of one volume-log row, in ms (None where the sender gave no times)."""
    seen, read, registered = row["seen_unix_s"], row["read_unix_s"], row["registered_unix_s"]
    if seen is None:
        return dict.fromkeys(BRIDGE_STAGES)
    sent, received = row["sent_unix_s"], row["received_unix_s"]
    return {"file_read": 1e3 * (read - seen), "register": 1e3 * (registered - read),
            "send": 1e3 * (sent - registered), "transit": 1e3 * (received - sent),
            "scanner_to_service": 1e3 * (received - seen)}


def _statistics(values_ms: np.ndarray) -> dict[str, float]:
    percentiles = np.percentile(values_ms, PERCENTILES)  # numpy's default linear interpolation
    return {"n": int(values_ms.size), "mean": float(values_ms.mean()),
            **{f"p{q}": float(p) for q, p in zip(PERCENTILES, percentiles)}, "max": float(values_ms.max())}


def summarize_volumes(rows: list[dict]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(bridge stage -> statistics in ms, framewise displacement summary) of a volume log's rows."""
    stages = {}
    per_volume = [bridge_stages_ms(row) for row in rows]
    for stage in BRIDGE_STAGES:
        values_ms = np.array([v[stage] for v in per_volume if v[stage] is not None], dtype=np.float64)
        if values_ms.size:
            stages[stage] = _statistics(values_ms)
    fd_mm = np.array([row["fd_mm"] for row in rows if row["fd_mm"] is not None], dtype=np.float64)
    motion = {} if fd_mm.size == 0 else {
        "volumes": int(fd_mm.size), "fd_mean_mm": float(fd_mm.mean()), "fd_max_mm": float(fd_mm.max()),
        "threshold_mm": FD_THRESHOLD_MM, "volumes_over_threshold": int((fd_mm > FD_THRESHOLD_MM).sum())}
    return stages, motion


# ---- summary ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyReport:
    """Counts of a session's results and per-stage latency statistics (ms) over decoded, non-recovered ones."""

    n_results: int
    n_decoded: int  # not skipped (recovered ones included)
    n_skipped: int
    n_late: int
    n_recovered: int
    stages: dict[str, dict[str, float]]  # stage -> {"n", "mean", "p50", "p90", "p95", "p99", "max"}, stage order
    top1_hits: int
    top1_countable: int  # decoded results whose seen image was a candidate (realtime.hits)
    top1_hit_rate: float | None  # top1_hits / top1_countable
    bridge_stages: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # volumes.csv, when there
    motion: dict[str, float] = dataclasses.field(default_factory=dict)  # framewise displacement summary

    def format(self) -> str:
        """A table for the terminal."""
        tally = Top1Tally(self.top1_hits, self.top1_countable, self.n_results)
        lines = [f"{self.n_results} results: {self.n_decoded} decoded, {self.n_skipped} skipped, "
                 f"{self.n_late} late, {self.n_recovered} recovered; top-1 hit rate {tally.format()}",
                 "stage statistics over decoded, non-recovered results, in ms:"]
        statistics = ["mean", *(f"p{q}" for q in PERCENTILES), "max"]
        lines.append(f"{'stage':<12}{'n':>6}" + "".join(f"{name:>10}" for name in statistics))
        for stage, values in self.stages.items():
            lines.append(f"{stage:<12}{values['n']:>6}" + "".join(f"{values[name]:>10.2f}" for name in statistics))
        if not self.stages:
            lines.append("(no decoded, non-recovered result)")
        if self.bridge_stages:
            lines.append("the bridge's stages per volume, in ms (transit: two clocks, see docs/bridge.md):")
            lines.append(f"{'stage':<19}{'n':>6}" + "".join(f"{name:>10}" for name in statistics))
            for stage, values in self.bridge_stages.items():
                lines.append(f"{stage:<19}{values['n']:>6}" + "".join(f"{values[name]:>10.2f}" for name in statistics))
        if self.motion:
            lines.append(f"head motion: {self.motion['volumes']} volumes, framewise displacement mean "
                         f"{self.motion['fd_mean_mm']:.3f} mm, max {self.motion['fd_max_mm']:.3f} mm, "
                         f"{self.motion['volumes_over_threshold']} over {self.motion['threshold_mm']:g} mm")
        return "\n".join(lines)


def _is_measured(row: dict) -> bool:
    """Whether a row's timings describe the live pipeline: decoded, and not re-published after a restart."""
    return "skipped" not in row["flags"] and "recovered" not in row["flags"]


def summarize(rows: list[dict], volume_rows: list[dict] = ()) -> LatencyReport:
    """The report of rows as `read_latency_csv` returns them (and `read_volumes_csv`'s, when there)."""
    measured = [row for row in rows if _is_measured(row)]
    stages = {}
    for stage in TIMING_STAGES:
        values_ms = np.array([row[stage] for row in measured if row[stage] is not None], dtype=np.float64)
        if values_ms.size:
            stages[stage] = _statistics(values_ms)
    tally = Top1Tally()
    for row in rows:
        tally.add(row["hit"])  # the log wrote it with realtime.hits; empty: not countable
    bridge_stages, motion = summarize_volumes(list(volume_rows))
    return LatencyReport(
        n_results=len(rows),
        n_decoded=sum("skipped" not in row["flags"] for row in rows),
        n_skipped=sum("skipped" in row["flags"] for row in rows),
        n_late=sum("late" in row["flags"] for row in rows),
        n_recovered=sum("recovered" in row["flags"] for row in rows),
        stages=stages,
        top1_hits=tally.hits, top1_countable=tally.countable, top1_hit_rate=tally.rate,
        bridge_stages=bridge_stages, motion=motion)


def write_report(path_csv: str | Path, out_dir: str | Path | None = None) -> LatencyReport:
    """Write latency.json (the report) and latency.png (the plot) next to `path_csv`, or in `out_dir`;
    a volumes.csv beside `path_csv` adds the bridge's stages and head motion."""
    path_csv = Path(path_csv)
    out_dir = path_csv.parent if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_latency_csv(path_csv)
    volumes_csv = path_csv.parent / VOLUMES_CSV
    report = summarize(rows, read_volumes_csv(volumes_csv) if volumes_csv.is_file() else ())
    (out_dir / REPORT_JSON).write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    sessions = ", ".join(dict.fromkeys(row["session"] for row in rows)) or path_csv.name
    _plot(rows, report, out_dir / REPORT_PNG, title=f"latency of {sessions}")
    return report


# ---- plot ---------------------------------------------------------------------------------------------

def _plot(rows: list[dict], report: LatencyReport, path_png: Path, title: str) -> None:
    """Top: stacked stage times per result in publication order, end-to-end over them; bottom: the CDF
    of end-to-end latency with its percentiles."""
    # Imported here: the service imports this module for LatencyLog and never plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    per_trial, distribution = figure.subplots(2, 1, height_ratios=(3, 2))
    figure.suptitle(f"{title}: {report.n_results} results, {report.n_skipped} skipped, {report.n_late} late, "
                    f"{report.n_recovered} recovered", fontsize=13)
    _plot_per_trial(per_trial, rows, report)
    _plot_distribution(distribution, rows, report)
    figure.savefig(path_png)


def _plot_per_trial(axes: Any, rows: list[dict], report: LatencyReport) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_title("stage times per trial (stacked) and end-to-end latency")
    axes.set_xlabel("result, in publication order")
    axes.set_ylabel("time (ms)")
    if not rows:
        axes.text(0.5, 0.5, "no result logged", ha="center", transform=axes.transAxes)
        return
    order = np.arange(len(rows))
    measured = np.array([_is_measured(row) for row in rows], dtype=bool)
    bottom_ms = np.zeros(len(rows))
    stage_bars = []
    for stage in TIMING_STAGES[:-1]:  # every stage but end_to_end, which spans them
        stage_ms = np.array([row[stage] or 0.0 for row in rows]) * measured
        if stage in report.stages:
            stage_bars.append(axes.bar(order, stage_ms, bottom=bottom_ms, width=1.0 if len(rows) > 60 else 0.8,
                                       linewidth=0, color=STAGE_COLORS.get(stage, "lightgray"),
                                       label=f"{stage} (mean {report.stages[stage]['mean']:.3g} ms)"))
        bottom_ms += stage_ms
    end_to_end_ms = np.array([np.nan if row["end_to_end"] is None or not m else row["end_to_end"]
                              for row, m in zip(rows, measured)])
    markers = axes.plot(order, end_to_end_ms, color="black", linewidth=1.0, marker="o", markersize=2.5,
                        label="end_to_end")
    late = np.array(["late" in row["flags"] for row in rows], dtype=bool) & measured
    if late.any():
        markers += axes.plot(order[late], end_to_end_ms[late], linestyle="none", marker="o", markersize=7,
                             markerfacecolor="none", markeredgecolor="tab:red", label="late")
    # Results without live timings are marked on the axis, so they do not stretch its scale.
    for flag, marker, color in (("skipped", "x", "tab:red"), ("recovered", "s", "dimgray")):
        flagged = order[np.array([flag in row["flags"] for row in rows], dtype=bool)]
        if flagged.size:
            markers += axes.plot(flagged, np.zeros(flagged.size), linestyle="none", marker=marker, color=color,
                                 markersize=7, clip_on=False, label=f"{flag} (not timed)")
    _mark_runs(axes, rows)
    axes.set_xlim(-0.5, len(rows) - 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(bottom=0)
    handles = markers + stage_bars[::-1]  # stages listed top to bottom, as they are stacked
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, frameon=False)
    axes.grid(axis="y", alpha=0.3)


def _mark_runs(axes: Any, rows: list[dict]) -> None:
    """A dotted line where the run changes, labelled with the run number at the top."""
    starts = [i for i, row in enumerate(rows) if i == 0 or (row["session"], row["run"]) != (rows[i - 1]["session"],
                                                                                               rows[i - 1]["run"])]
    for i in starts:
        if i > 0:
            axes.axvline(i - 0.5, color="gray", linestyle=":", linewidth=1)
        axes.annotate(f"run {rows[i]['run']}", (i - 0.5, 1.0), xycoords=("data", "axes fraction"),
                      xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, color="dimgray")


def _plot_distribution(axes: Any, rows: list[dict], report: LatencyReport) -> None:
    end_to_end_ms = np.sort([row["end_to_end"] for row in rows if _is_measured(row) and row["end_to_end"] is not None])
    axes.set_title("end-to-end latency: empirical CDF over decoded, non-recovered results")
    axes.set_xlabel("end-to-end latency (ms)")
    axes.set_ylabel("fraction of results")
    if end_to_end_ms.size == 0:
        axes.text(0.5, 0.5, "no decoded, non-recovered result with an end-to-end time", ha="center",
                  transform=axes.transAxes)
        return
    fraction = np.arange(1, end_to_end_ms.size + 1) / end_to_end_ms.size
    axes.step(end_to_end_ms, fraction, where="post", color="black", linewidth=1.5, label="CDF")
    statistics = report.stages["end_to_end"]
    for q, color in zip((50, 95, 99), ("tab:green", "tab:orange", "tab:red")):
        axes.axvline(statistics[f"p{q}"], color=color, linestyle="--", linewidth=1.2,
                     label=f"p{q} = {statistics[f'p{q}']:.1f} ms")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, frameon=False)
    axes.grid(alpha=0.3)


# ---- command line -------------------------------------------------------------------------------------

@plain_command("mindeye-latency-report")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mindeye-latency-report",
        description="Summarize the realtime service's per-result latency log: write latency.json (counts and "
                    "per-stage mean/p50/p90/p95/p99/max in ms over decoded, non-recovered results) and latency.png "
                    "(stage times per trial, CDF of end-to-end latency), then print the table.",
        epilog="Skipped results (not decoded: the decode queue overflowed) and recovered ones (re-published from "
               "the journal after a restart, so their times measure the outage) are counted but not timed.")
    parser.add_argument("path", type=Path, help=f"a {LATENCY_CSV} written by the service, or the folder holding one")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for latency.json and latency.png (default: the CSV's folder)")
    args = parser.parse_args(argv)
    path_csv = args.path / LATENCY_CSV if args.path.is_dir() else args.path
    report = write_report(path_csv, args.out)
    print(report.format())
    print(f"wrote {(args.out or path_csv.parent) / REPORT_JSON} and {(args.out or path_csv.parent) / REPORT_PNG}")


if __name__ == "__main__":
    main()
