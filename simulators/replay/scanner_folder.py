"""The scanner-folder sink: runs written as a scanner's real-time export writes them, one file per volume.

`mindeye-replay sink=folder folder.out_dir=DIR` writes, for every run of the source, at the TR or
N times faster (`speed`, as the wire replay), under DIR:

    scanner/001_SSSSSS_NNNNNN.dcm   one file per volume: series number S, 1-based volume number N
                                    (format=mosaic | enhanced; `.nii` for format=nifti); one file
                                    per slice for format=slices (N: the instance number)
    events/run-RR_events.tsv        the stimulus computer's log of run RR (BIDS: onset, duration,
                                    image_id (0-based, n/a for none), trial_type); onsets in seconds
                                    from the run's first volume; written whole when the run starts,
                                    or grown trial by trial as images appear (events_mode=at_onset)
    truth/run-RR_motion.tsv         ground truth for benchmarks (never read by the bridge), written
                                    when the run is over: per volume acquired its series and first
                                    file (n/a: dropped), the head relative to today's first volume
                                    (trans_x_mm .. rot_z_rad, mindeye.motion's convention), relative
                                    to the calibration position (calib_trans_x_mm ..), and fd_mm

RR is the run number the wire replay would send (the NSD file run). The k-th run written (k from 0)
is series `first_series + k`, with its own SeriesInstanceUID; the bridge watches `scanner/`, maps
series to runs and finds a run's trials at `../events/run-{run:02d}_events.tsv` from there. Formats
(`folder.format`; simulators.replay.scanner_formats): nifti, mosaic (Siemens classic DICOM), enhanced
(multi-frame DICOM), slices (one classic DICOM per slice, named by instance number). Acquisition
times in the headers are the wall clock at each volume's start, paced by `speed`.

Files appear atomically (written under a dot-name, then renamed), as a scanner's export does; with
`write_s` > 0 each file is instead written in place in `chunks` pieces over `write_s` seconds, so a
reader sees it half-written. With `motion` set, each volume is first moved by the simulated head
(simulators.replay.head_motion); the head keeps moving from run to run.

Faults (simulators.replay.faults, deterministic from the seed) become what goes wrong with files:
drop (a volume never written), duplicate (the volume again as `copyN_<name>`), reorder, delay and
jitter (files late, out of order), truncate (a file left cut short for good), corrupt (NIfTI's
header size and magic and DICOM's marker overwritten), restart (the series stops before `at_index`; `downtime_s` later
the run is acquired again from its first volume as the next series). Wire-only faults (wrong
shape or dtype, NaN) are refused.
"""
from __future__ import annotations

import csv
import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mindeye.motion import MOTION_PARAMS, framewise_displacement, volume_centre_mm
from mindeye.protocol import Events, RunStart, Volume
from simulators.replay.faults import CutFrame, Faults, Restart, apply_faults
from simulators.replay.head_motion import HeadMotion, MotionSpec, move_volume
from simulators.replay.scanner_formats import FORMATS, SeriesInfo, series_info, volume_files
from simulators.replay.sender import Pacer, Source, parse_speed
from simulators.replay.sources import Outgoing

TRUTH_COLUMNS = ["volume", "series_number", "file", *MOTION_PARAMS, *(f"calib_{name}" for name in MOTION_PARAMS),
                 "fd_mm"]
CORRUPTED_BYTES = ((0, 4), (128, 132), (344, 348))  # a corrupt fault's byte ranges
WIRE_ONLY_FAULTS = ("wrong_shape", "wrong_dtype", "nan")


@dataclass(frozen=True)
class FolderOptions:
    """Where and how to write (configs/replay.yaml `folder`, `motion`, `faults`)."""

    out_dir: Path
    format: str = "mosaic"
    first_series: int = 5
    write_s: float = 0.0  # > 0: write each file in place over this long (half-written files visible)
    chunks: int = 4
    motion: MotionSpec = MotionSpec()
    motion_seed: int = 0
    motion_order: int = 3  # spline order of the moved volumes: 3 (cubic) or 1 (linear, ~5x faster at NSD size)
    faults: Faults = Faults()
    fault_seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"folder.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.motion_order not in range(6):
            raise ValueError(f"motion.order must be a spline order 0..5, got {self.motion_order!r}")
        if self.write_s < 0 or self.chunks < 1:
            raise ValueError(f"folder.write_s must be >= 0 and folder.chunks >= 1, got {self.write_s}, {self.chunks}")
        wire_only = [name for name in WIRE_ONLY_FAULTS if getattr(self.faults, name) != getattr(Faults(), name)]
        if wire_only:
            raise ValueError(f"faults {', '.join(wire_only)} change wire messages and have no scanner-file form; "
                             f"with sink=folder use drop, duplicate, reorder, delay, jitter, truncate, corrupt or "
                             f"restart")
        if self.faults.restart.resume_from is not None:
            raise ValueError("faults.restart.resume_from: a restarted series is acquired again from its first "
                             "volume; leave resume_from unset with sink=folder")


@dataclass
class FolderSummary:
    out_dir: Path
    runs: int = 0
    volumes: int = 0
    files: list[Path] = field(default_factory=list)
    fault_records: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0

    def format(self) -> str:
        faults = f", {len(self.fault_records)} fault(s)" if self.fault_records else ""
        return (f"wrote {self.runs} run(s), {self.volumes} volume(s) in {len(self.files)} file(s) to "
                f"{self.out_dir / 'scanner'}{faults} in {self.elapsed_s:.1f} s (events: {self.out_dir / 'events'}, "
                f"truth: {self.out_dir / 'truth'})")


@dataclass
class _Writer:
    """What writing a session needs between runs: options, pacing, the head, and the clocks."""

    options: FolderOptions
    pacer: Pacer
    speed_factor: float | None
    sleep: Callable[[float], None]
    start_of_day: datetime.datetime
    head: HeadMotion | None = None
    summary: FolderSummary | None = None

    def acquired(self, at_s: float) -> datetime.datetime:
        """The wall-clock time of a moment `at_s` into the (paced) replay."""
        return self.start_of_day + datetime.timedelta(seconds=at_s / self.speed_factor if self.speed_factor else at_s)

    def series(self, plan: list[Outgoing], run_start: RunStart, info: SeriesInfo, n_acquired: int,
               start_s: float) -> list[dict]:
        """Write one series begun at `start_s` (the plan's events and volumes, in plan order, paced) and
        return its truth rows."""
        options, out_dir = self.options, Path(self.options.out_dir)
        affine = np.asarray(run_start.affine, dtype=float)
        if self.head is None:
            self.head = HeadMotion(options.motion, volume_centre_mm(run_start.shape, affine), options.motion_seed)
        trajectory = self.head.next_volumes(n_acquired, run_start.tr_s)  # the head moves whatever is written
        events, copies, first_files = [], {}, {}
        for item in plan:
            if item.type == Events.TYPE:
                self.pacer.wait_until(item.at_s)
                events += item.message.events  # the log grows as trials happen (events_mode=at_onset)
                _write_events(out_dir / "events" / f"run-{info.run:02d}_events.tsv", events)
            if item.type != Volume.TYPE or item.index >= n_acquired:
                continue
            volume_xyz = item.message.array()
            if not options.motion.still:
                volume_xyz = move_volume(volume_xyz, affine, trajectory.calibration_t6[item.index],
                                         order=options.motion_order)
            files = volume_files(volume_xyz, affine, info, item.index,
                                 self.acquired(start_s + item.index * run_start.tr_s), options.format)
            self.pacer.wait_until(item.at_s)
            copy = copies[item.index] = copies.get(item.index, -1) + 1  # > 0: a duplicate fault's copy
            for name, payload in files:
                path = out_dir / "scanner" / (f"copy{copy}_{name}" if copy else name)
                _write_file(path, _tampered(payload, item.tampers), options.write_s, options.chunks, self.sleep)
                first_files.setdefault(item.index, path)
                self.summary.files.append(path)
            self.summary.volumes += 1
        fd_t = framewise_displacement(trajectory.within_t6) if n_acquired else np.zeros(0)
        numbers_t = np.column_stack([trajectory.within_t6, trajectory.calibration_t6, fd_t]) if n_acquired else []
        return [{"volume": str(index), "series_number": str(info.series_number),
                 "file": first_files[index].name if index in first_files else "n/a",  # n/a: dropped
                 **{key: f"{value:.6f}" for key, value in zip(TRUTH_COLUMNS[3:], numbers_t[index])}}
                for index in range(n_acquired)]


def write_folder(source: Source, options: FolderOptions, *, speed: str | float = "real",
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 wall_clock: Callable[[], datetime.datetime] = datetime.datetime.now) -> FolderSummary:
    """Write every run of `source` into `options.out_dir` as the scanner would (module docstring)."""
    speed_factor = parse_speed(speed)
    out_dir = Path(options.out_dir)
    for folder in ("scanner", "events", "truth"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    writer = _Writer(options, Pacer(speed_factor, clock, sleep), speed_factor, sleep, wall_clock(),
                     summary=FolderSummary(out_dir))
    started, series_number = time.monotonic(), options.first_series
    file_faults = replace(options.faults, restart=Restart())  # a series restart is the scanner's, below
    for ordinal, clean in enumerate(source.runs()):
        if ordinal == 0:
            writer.pacer.start()
            writer.start_of_day = wall_clock()
        run_start = next(item.message for item in clean if item.type == RunStart.TYPE)
        plan, records = apply_faults(clean, file_faults, options.fault_seed)
        records = [_file_fault(record) for record in records]
        truth = []
        for acquisition, n_acquired, start_s in _acquisitions(plan, run_start, clean[0].at_s, options.faults.restart,
                                                              records):
            info = series_info(run_start, series_number)
            truth += writer.series(acquisition, run_start, info, n_acquired, start_s)
            series_number += 1
        _write_tsv(out_dir / "truth" / f"run-{run_start.run:02d}_motion.tsv", TRUTH_COLUMNS, truth)
        writer.summary.fault_records += records
        writer.summary.runs += 1
    writer.summary.elapsed_s = time.monotonic() - started
    return writer.summary


def _acquisitions(plan: list[Outgoing], run_start: RunStart, start_s: float, restart: Restart,
                  records: list[dict]) -> list[tuple[list[Outgoing], int, float]]:
    """The run's series as (plan, volumes acquired, start time): one, or, with a restart at volume i, a
    series stopped before volume i and, `downtime_s` later, the whole run acquired again as the next series."""
    n_volumes = run_start.n_volumes
    if restart.at_index is None or restart.at_index >= n_volumes or (restart.runs is not None
                                                                    and run_start.run not in restart.runs):
        return [(plan, n_volumes, start_s)]
    records.append({"fault": "series_restart", "session": run_start.session, "run": run_start.run,
                    "index": restart.at_index, "downtime_s": restart.downtime_s})
    stopped_s = start_s + restart.at_index * run_start.tr_s  # volume at_index would have started then
    aborted = [item for item in plan if (item.index < restart.at_index if item.type == Volume.TYPE
                                         else item.at_s < stopped_s)]
    again_s = stopped_s + restart.downtime_s
    again = [replace(item, at_s=item.at_s + again_s - start_s) for item in plan]
    return [(aborted, restart.at_index, start_s), (again, n_volumes, again_s)]


def _file_fault(record: dict) -> dict:
    """A fault log record in file terms: what happened to the file, not to the wire frames."""
    record = {key: value for key, value in record.items() if key not in ("decode_error", "mode", "at_fractions")}
    if record["fault"] == "corrupt":
        record["effect"] = f"bytes {', '.join(f'{start}-{stop - 1}' for start, stop in CORRUPTED_BYTES)} overwritten"
    return record


def _tampered(payload: bytes, tampers) -> bytes:
    """A file's bytes after the plan's faults: cut short (truncate: it stays half-written), or made
    unreadable (corrupt: CORRUPTED_BYTES overwritten: NIfTI's header size and magic, DICOM's marker)."""
    for tamper in tampers:
        if isinstance(tamper, CutFrame):
            payload = payload[:int(len(payload) * tamper.keep_fraction)]
        else:
            payload = bytearray(payload)
            for start, stop in CORRUPTED_BYTES:
                payload[start:stop] = b"\xff" * (stop - start)
            payload = bytes(payload)
    return payload


# ---- files ------------------------------------------------------------------------------------------------

def _write_file(path: Path, payload: bytes, write_s: float, chunks: int, sleep: Callable[[float], None]) -> None:
    """Atomically (dot-name, then rename), or in place in `chunks` pieces over `write_s` seconds."""
    if write_s <= 0:
        partial = path.with_name(f".{path.name}.part")
        partial.write_bytes(payload)
        os.replace(partial, path)
        return
    piece = -(-len(payload) // chunks)
    with open(path, "wb") as file:
        for start in range(0, len(payload), piece):
            file.write(payload[start:start + piece])
            file.flush()
            if start + piece < len(payload):
                sleep(write_s / chunks)


def _write_events(path: Path, events) -> None:
    rows = [{"onset": f"{event.onset_s:.3f}", "duration": f"{event.duration_s:.3f}",
             "image_id": "n/a" if event.image_id is None else str(event.image_id), "trial_type": event.label}
            for event in events]
    _write_tsv(path, ["onset", "duration", "image_id", "trial_type"], rows)


def _write_tsv(path: Path, columns: list[str], rows: list[dict]) -> None:
    partial = path.with_name(f".{path.name}.part")
    with open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, columns, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


