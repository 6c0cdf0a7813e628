"""The bridge: the scanner's export folder in, motion-corrected volumes in the model's grid out, over the wire.

    file seen (watcher) -> read (scanner_files) -> registered (registration: session alignment once,
    motion correction per volume, one resampling into the model grid) -> sent (mindeye.protocol)

Series and runs: every series the scanner writes is one run on the wire. Runs are numbered in the order
their series begin (`first_run`, +1, ...), unless `runs_by_series` names a series number's run, so
nobody edits a mapping when the console's series numbers shift. A series is over when it has
`run_volumes` volumes, when a later series begins, or when no file of it came for `run_idle_s`; then
its `run_end` goes out with the volumes it had. A series that stopped short of `run_volumes` and was
followed by another is a restart: the operator re-acquires the run, which goes out as the next run
(an aborted series' volumes are never mixed into another run's). Its schedule is that of the run it
re-acquires: `design_run`, the run of the experiment's design a series follows, is its run minus the
restarts so far, and names the events file (`events_file`, relative to the series' folder).

Order: volumes go out in index order. One that comes past a gap waits for the gap at most
`gap_wait_s`, then the gap is declared missing (the service's GLM goes on without it); a file that
comes after its volume was declared missing is sent anyway, late (the service judges it). A volume
file written twice is sent once.

Acks and resume: every message's ack is matched to what it carried. What the service acked (accepted,
duplicate or rejected: answered either way) is written to out_dir/bridge_state.json as it comes, with
the series-to-run mapping and each run's last motion estimate. A restarted bridge reads it, finds
every file in the folder again and sends only what was not acked: nothing acked is sent twice,
nothing unacked is lost (a copy the service had after all is answered `duplicate`, protocol rule 2).
A message left unacked while later ones were acked was lost in transit, and is sent again; so is the
current run's start and schedule when the acks come from a new service process (protocol rule 6).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from mindeye.errors import FormatError, index_spans
from mindeye.motion import framewise_displacement
from mindeye.protocol import (Ack, CurveClient, Events, Message, ProtocolError, RunEnd, RunStart, Stamper, Verdict,
                              Volume, encode, read_bids_events, recv, volume_sender)
from mindeye.protocol.messages import BridgeTimes, Motion
from realtime.bridge.watcher import ExportWatcher, VolumeFiles

log = logging.getLogger(__name__)

STATE_FILE = "bridge_state.json"


@dataclass(frozen=True)
class BridgeSettings:
    out_dir: Path  # the session's bridge folder: state, session alignment, log
    session: str  # protocol ids
    subject: str
    endpoint: str = "tcp://127.0.0.1:5555"
    first_run: int = 1
    runs_by_series: dict[int, int] = field(default_factory=dict)  # series number -> run, where the site wants it
    run_volumes: int | None = None  # a complete run's volumes (NSD: 226); None: unknown
    run_idle_s: float = 30.0  # a series without a new file this long is over
    gap_wait_s: float = 3.0  # a missing volume is waited for this long, then declared missing
    tr_s: float | None = None  # when the files do not say
    # the run's BIDS events.tsv, from the series' folder; {design_run}, {run}, {series_number} filled in
    events_file: str | None = "../events/run-{design_run:02d}_events.tsv"
    resend_after_s: float = 5.0  # unacked while later messages were acked: lost, send again


@dataclass
class _Series:
    """One series of the export folder: its run, what arrived, what went out and was acked."""

    uid: str
    number: int
    run: int
    folder: str
    acked: set[int] = field(default_factory=set)  # volume indices the service answered
    acked_trials: set[int] = field(default_factory=set)
    last_params: list[float] | None = None  # motion of the last volume sent (for the next one's FD)
    ended: bool = False
    restart_of: int | None = None  # the run this series re-acquires
    design_run: int = 0  # the run of the design it follows (its events): run - restarts so far
    # not persisted: this process's view
    held: dict[int, VolumeFiles] = field(default_factory=dict)  # arrived, waiting for their turn
    sent: set[int] = field(default_factory=set)
    next_index: int = 0
    max_index: int = -1  # highest index that arrived (or was acked)
    gap_since_s: float | None = None
    last_file_s: float = field(default_factory=time.monotonic)
    started: bool = False  # run_start sent by this process
    tr_s: float | None = None
    events_stamp: tuple | None = None  # (mtime, size) of the events file last read
    sent_trials: set[int] = field(default_factory=set)

    def record(self) -> dict:
        return {"number": self.number, "run": self.run, "folder": self.folder, "acked": sorted(self.acked),
                "acked_trials": sorted(self.acked_trials), "last_params": self.last_params, "ended": self.ended,
                "restart_of": self.restart_of, "design_run": self.design_run}

    @classmethod
    def of_record(cls, uid: str, record: dict) -> _Series:
        series = cls(uid, record["number"], record["run"], record["folder"], set(record["acked"]),
                     set(record["acked_trials"]), record["last_params"], record["ended"], record["restart_of"],
                     record["design_run"])
        series.max_index = max(series.acked, default=-1)
        return series


@dataclass
class _Pending:
    """A message sent and not yet acked: what it carried, so its ack can be booked and it can be resent."""

    kind: str
    series: _Series
    item: Any  # the VolumeFiles of a volume; the trial numbers of an events message; None otherwise
    sent_s: float


class Bridge:
    """Build it, `run(stop)` until the event is set. `space.correct(scanner_volume)` gives the volume in
    the model grid and its motion (realtime.bridge.cli.ModelSpace); `read_volume(paths)` reads one
    (realtime.bridge.scanner_files)."""

    def __init__(self, settings: BridgeSettings, watcher: ExportWatcher, read_volume: Callable, space: Any, *,
                 context: zmq.Context | None = None, curve: CurveClient | None = None):
        self.settings, self.watcher, self.read_volume, self.space = settings, watcher, read_volume, space
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.series: dict[str, _Series] = {}
        self.counters = {"sent": 0, "resent": 0, "acked": 0, "rejected": 0, "missing": 0, "late": 0, "restarts": 0}
        self._pending: dict[int, _Pending] = {}
        self._service_id: str | None = None
        self._last_ack_s = 0.0
        self._dirty = False
        Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
        self._load_state()

    # ---- state ------------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return Path(self.settings.out_dir) / STATE_FILE

    def _load_state(self) -> None:
        if not self.state_path.is_file():
            return
        try:
            state = json.loads(self.state_path.read_text())
            if state["session"] != self.settings.session:
                raise FormatError(self.state_path, "bridge state's session", self.settings.session, state["session"])
            self.series = {uid: _Series.of_record(uid, record) for uid, record in state["series"].items()}
        except (ValueError, KeyError, TypeError) as error:
            raise FormatError(self.state_path, "bridge state", "the JSON a bridge writes", repr(error)[:200]) from None
        log.info("resuming session %s from %s: %s", self.settings.session, self.state_path, "; ".join(
            f"run {s.run} (series {s.number}): {len(s.acked)} volumes acked{', ended' if s.ended else ''}"
            for s in self.series.values()) or "nothing acked yet")

    def _save_state(self) -> None:
        """Write the state atomically (a kill mid-write leaves the previous one)."""
        if not self._dirty:
            return
        record = {"session": self.settings.session, "subject": self.settings.subject,
                  "series": {uid: series.record() for uid, series in self.series.items()}}
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self.state_path)
        self._dirty = False

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self, stop: Any) -> None:
        """Watch, send, book acks until `stop` (a threading.Event) is set. Open runs stay open: a bridge
        restarted on the same out_dir goes on with them."""
        self.open()
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def open(self) -> None:
        """Connect (a new sender id: the service sees a restarted bridge as a new sender) and start watching."""
        self._socket = volume_sender(self.context, self.settings.endpoint, curve=self.curve)
        self._stamper = Stamper()
        self.watcher.start()
        log.info("watching %s, sending to %s as session %s (%s)", self.watcher.folder, self.settings.endpoint,
                 self.settings.session, self.settings.subject)

    def close(self) -> None:
        """Stop watching, book the last acks, write the state, disconnect."""
        self.watcher.stop()
        self._read_acks(timeout_ms=500)
        self._save_state()
        self._socket.close(linger=2000)

    def step(self, timeout_s: float = 0.05) -> None:
        """One round: new volumes, release in order, end finished series, acks, resends."""
        for files in self.watcher.poll(timeout_s):
            self._arrive(files)
        now_s = time.monotonic()
        for series in list(self.series.values()):
            self._release(series, now_s)
        self._end_finished(now_s)
        self._read_acks()
        self._resend_lost(time.monotonic())
        self._save_state()

    # ---- arrivals and order -----------------------------------------------------------------------

    def _arrive(self, files: VolumeFiles) -> None:
        series = self.series.get(files.series_uid) or self._new_series(files)
        series.last_file_s = time.monotonic()
        series.max_index = max(series.max_index, files.index)
        where = f"volume {files.index} of series {series.number} (run {series.run})"
        if files.index in series.acked:
            return  # acked before a restart of the bridge
        if series.ended:
            log.warning("late file: %s came after its run ended; not sent (%s)", where, files.paths[0])
            self.counters["late"] += 1
        elif files.index in series.sent or files.index in series.held:
            log.warning("duplicate file: %s is already %s; ignored (%s)", where,
                        "sent" if files.index in series.sent else "waiting", files.paths[0])
        elif files.index < series.next_index:
            log.warning("late file: %s came after it was declared missing; sent anyway, the service judges it", where)
            self.counters["late"] += 1
            self._send_volume(series, files)
        else:
            series.held[files.index] = files

    def _new_series(self, files: VolumeFiles) -> _Series:
        run = self.settings.runs_by_series.get(files.series_number)
        if run is None:
            run = max([s.run for s in self.series.values()] + [self.settings.first_run - 1]) + 1
        series = _Series(files.series_uid, files.series_number, run, str(files.paths[0].parent))
        previous = [s for s in self.series.values() if not s.ended]
        for earlier in previous:  # the scanner acquires one series at a time: the earlier ones are over
            self._end_series(earlier, "a later series began")
        expected = self.settings.run_volumes
        cut_short = [s for s in self.series.values() if expected and s.max_index + 1 < expected]
        if cut_short and cut_short[-1] is list(self.series.values())[-1]:
            aborted = cut_short[-1]
            series.restart_of = aborted.run
            self.counters["restarts"] += 1
            log.warning("series restart: series %d stopped after %d of %d volumes; series %d re-acquires it and goes "
                        "out as run %d", aborted.number, aborted.max_index + 1, expected, files.series_number, run)
        series.design_run = run - sum(s.restart_of is not None for s in [*self.series.values(), series])
        log.info("new series %d (%s) -> run %d (design run %d)", files.series_number, files.series_uid, run,
                 series.design_run)
        self.series[files.series_uid] = series
        self._dirty = True
        return series

    def _release(self, series: _Series, now_s: float) -> None:
        """Send the held volumes that are next in order; declare a gap missing once it waited gap_wait_s."""
        while True:
            while series.next_index in series.acked:
                series.next_index += 1
            files = series.held.pop(series.next_index, None)
            if files is not None:
                self._send_volume(series, files)
                series.next_index += 1
                series.gap_since_s = None
                continue
            if not series.held:
                return
            if series.gap_since_s is None:
                series.gap_since_s = now_s
            if now_s - series.gap_since_s < self.settings.gap_wait_s:
                return
            first_held = min(series.held)
            missing = [i for i in range(series.next_index, first_held) if i not in series.acked]
            log.warning("missing volume: %s of series %d (run %d) never came within %.1f s; going on without",
                        index_spans(missing), series.number, series.run, self.settings.gap_wait_s)
            self.counters["missing"] += len(missing)
            series.next_index, series.gap_since_s = first_held, None

    def _end_finished(self, now_s: float) -> None:
        expected = self.settings.run_volumes
        for series in self.series.values():
            if series.ended or series.held:
                continue
            if expected is not None and series.next_index >= expected:
                self._end_series(series, f"all {expected} volumes")
            elif series.max_index >= 0 and now_s - series.last_file_s >= self.settings.run_idle_s:
                self._end_series(series, f"no file for {self.settings.run_idle_s:g} s")

    def _end_series(self, series: _Series, why: str) -> None:
        for index in sorted(series.held):  # a gap still open: what came after it goes out now
            self._send_volume(series, series.held.pop(index))
        n_volumes = series.max_index + 1
        if series.started or series.acked:  # a run the service knows of
            self._send(RunEnd(self.settings.session, series.run, n_volumes, self._stamper.envelope()), series)
        series.ended, self._dirty = True, True
        log.info("run %d (series %d) ended with %d volumes: %s", series.run, series.number, n_volumes, why)

    # ---- one volume -------------------------------------------------------------------------------

    def _send_volume(self, series: _Series, files: VolumeFiles) -> None:
        read_start_s = time.perf_counter()
        try:
            scanner_volume = self.read_volume(files.paths)
        except FormatError as error:
            log.error("volume %d of series %d not sent, its files cannot be read: %s", files.index, series.number,
                      error)
            return
        read_s = time.perf_counter()
        corrected = self.space.correct(scanner_volume)
        registered_s = time.perf_counter()
        if not series.started:
            self._start_run(series, scanner_volume, corrected.data_xyz.shape)
        motion = None
        if corrected.params_6 is not None:
            previous = series.last_params if series.last_params is not None else corrected.params_6
            fd_mm = float(framewise_displacement(np.stack([previous, corrected.params_6]))[1])
            motion = Motion(tuple(float(p) for p in corrected.params_6), fd_mm)
            series.last_params = [float(p) for p in corrected.params_6]
        # One wall-clock reading, the read time placed before it by the monotonic clock: never backwards.
        registered_unix_s = max(files.seen_unix_s, time.time())
        times = BridgeTimes(files.seen_unix_s, max(files.seen_unix_s, registered_unix_s - (registered_s - read_s)),
                            registered_unix_s)
        volume = Volume.from_array(corrected.data_xyz, session=self.settings.session, subject=self.settings.subject,
                                   run=series.run, index=files.index, acq_time_s=files.index * series.tr_s,
                                   tr_s=series.tr_s, affine=self.space.grid_affine, envelope=self._stamper.envelope(),
                                   motion=motion, bridge=times)
        self._send(volume, series, files)
        series.sent.add(files.index)
        log.debug("volume %d of run %d: read %.1f ms, registered %.1f ms, fd %s", files.index, series.run,
                  1e3 * (read_s - read_start_s), 1e3 * (registered_s - read_s),
                  "-" if motion is None else f"{motion.fd_mm:.3f} mm")

    def _start_run(self, series: _Series, scanner_volume: Any, shape: tuple[int, int, int]) -> None:
        series.tr_s = self.settings.tr_s or scanner_volume.tr_s
        if series.tr_s is None:
            raise FormatError(scanner_volume.paths[0], "repetition time", "a TR in the header or tr_s=SECONDS",
                              "none")
        self._send(RunStart(self.settings.session, self.settings.subject, series.run, series.tr_s,
                            self.settings.run_volumes, "float32", tuple(shape),
                            tuple(map(tuple, self.space.grid_affine)), self._stamper.envelope()), series)
        series.started = True
        self._send_events(series)

    def _send_events(self, series: _Series) -> None:
        """The trials of the series' events file not sent yet (the file may grow as the run goes)."""
        if self.settings.events_file is None:
            return
        path = Path(series.folder) / self.settings.events_file.format(series_number=series.number, run=series.run,
                                                                      design_run=series.design_run)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        if (stat.st_mtime, stat.st_size) == series.events_stamp:
            return
        series.events_stamp = (stat.st_mtime, stat.st_size)
        try:
            events = read_bids_events(path)
        except FormatError as error:
            log.error("events of run %d not sent: %s", series.run, error)
            return
        new = tuple(e for e in events if e.trial not in series.sent_trials and e.trial not in series.acked_trials)
        if new:
            self._send(Events(self.settings.session, series.run, new, False, self._stamper.envelope()), series,
                       tuple(e.trial for e in new))
            series.sent_trials.update(e.trial for e in new)

    # ---- sending and acks -------------------------------------------------------------------------

    def _send(self, message: Message, series: _Series, item: Any = None) -> None:
        try:
            self._socket.send_multipart(encode(message), copy=False)
        except zmq.Again:
            log.error("the service at %s takes no messages (send queue full): %s %s of run %d not sent now; it goes "
                      "out again once acks flow", self.settings.endpoint, message.TYPE,
                      getattr(message, "index", ""), series.run)
        self._pending[message.envelope.seq] = _Pending(message.TYPE, series, item, time.monotonic())
        self.counters["sent"] += 1
        if message.TYPE == Volume.TYPE:
            self._send_events(series)  # the schedule may have grown with the run

    def _read_acks(self, timeout_ms: int = 0) -> None:
        while self._socket.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            try:
                ack = recv(self._socket, 0)
            except ProtocolError as error:
                log.error("unreadable answer from the service: %s", error)
                continue
            if not isinstance(ack, Ack):
                continue
            self._book(ack)

    def _book(self, ack: Ack) -> None:
        if self._service_id is not None and ack.envelope.sender_id != self._service_id:
            log.warning("the service restarted (new id %s): sending the open runs' start and schedule again",
                        ack.envelope.sender_id)
            self._service_id = ack.envelope.sender_id
            for series in self.series.values():
                if series.started and not series.ended:
                    series.started, series.sent_trials, series.events_stamp = False, set(), None
            self._last_ack_s = time.monotonic()  # whatever the old process left unacked is resent
        self._service_id = ack.envelope.sender_id
        pending = self._pending.pop(ack.acked_seq, None) if ack.acked_seq is not None else None
        if pending is None:
            return
        self.counters["acked"] += 1
        self._last_ack_s = max(self._last_ack_s, pending.sent_s)
        if ack.verdict == Verdict.REJECTED:
            self.counters["rejected"] += 1
            log.warning("the service rejected %s%s of run %d: %s %s", pending.kind,
                        f" {pending.item.index}" if pending.kind == Volume.TYPE else "", pending.series.run,
                        ack.reason, ack.detail)
        if pending.kind == Volume.TYPE:
            pending.series.acked.add(pending.item.index)
        elif pending.kind == Events.TYPE:
            pending.series.acked_trials.update(pending.item)
        self._dirty = True

    def _resend_lost(self, now_s: float) -> None:
        """Messages older than resend_after_s while a later one was acked never reached the service."""
        lost = [(seq, p) for seq, p in self._pending.items()
                if now_s - p.sent_s >= self.settings.resend_after_s and p.sent_s < self._last_ack_s]
        for seq, pending in lost:
            del self._pending[seq]
            self.counters["resent"] += 1
            log.warning("no ack for %s%s of run %d after %.0f s while later messages were acked: sending it again",
                        pending.kind, f" {pending.item.index}" if pending.kind == Volume.TYPE else "",
                        pending.series.run, now_s - pending.sent_s)
            if pending.kind == Volume.TYPE:
                self._send_volume(pending.series, pending.item)
            elif pending.kind == RunEnd.TYPE:
                pending.series.ended = False
                self._end_series(pending.series, "its run_end was lost")
            elif pending.kind == Events.TYPE:
                pending.series.sent_trials -= set(pending.item)
                pending.series.events_stamp = None
                self._send_events(pending.series)


@dataclass(frozen=True)
class InGrid:
    """A volume in the model grid, and the head's position when it was acquired (None: not estimated)."""

    data_xyz: np.ndarray  # float32, the model grid's shape
    params_6: np.ndarray | None


class ModelSpace:
    """Takes each scanner volume into the model grid (the grid of the subject's ROI mask). With a
    calibration reference (realtime.bridge.registration.CalibrationReference): on the session's first
    volume, the session alignment (made from it and saved in `session_dir`, or loaded from there when a
    restarted bridge made it before), then per volume motion correction and one resampling (cubic at the
    ROI's voxels `roi_xyz` when given, linear elsewhere: see registration.py). Without one, volumes must
    already be in the grid (a scanner side that corrects motion itself)."""

    def __init__(self, grid_shape: tuple[int, int, int], grid_affine: np.ndarray, session_dir: Path,
                 calibration: Any = None, roi_xyz: np.ndarray | None = None):
        self.grid_shape, self.grid_affine = tuple(int(n) for n in grid_shape), np.asarray(grid_affine, dtype=float)
        self.session_dir, self.calibration, self.roi_xyz = Path(session_dir), calibration, roi_xyz
        self._corrector = None

    def correct(self, volume: Any) -> InGrid:
        if self.calibration is None:
            if volume.data_xyz.shape != self.grid_shape or not np.allclose(volume.affine, self.grid_affine, atol=1e-3):
                raise FormatError(volume.paths[0], "volume's grid (motion correction is off)",
                                  f"the model grid {list(self.grid_shape)}", f"{list(volume.data_xyz.shape)} with "
                                  f"affine {np.round(volume.affine, 3).tolist()}; turn motion correction on")
            return InGrid(np.asarray(volume.data_xyz, dtype=np.float32), None)
        if self._corrector is None:
            self._corrector = self._start(volume)
        corrected = self._corrector.correct(volume.data_xyz, volume.affine)
        return InGrid(corrected.data_xyz, corrected.params_6)

    def _start(self, volume: Any) -> Any:
        from realtime.bridge.registration import SESSION_ALIGNMENT, MotionCorrector, SessionAlignment

        if (self.session_dir / SESSION_ALIGNMENT).is_file():
            alignment = SessionAlignment.load(self.session_dir)
            log.info("session alignment loaded from %s", self.session_dir / SESSION_ALIGNMENT)
        else:
            started_s = time.perf_counter()
            alignment = SessionAlignment.create(volume.data_xyz, volume.affine, self.calibration)
            path = alignment.save(self.session_dir)
            log.info("session alignment to the calibration reference in %.1f s: translation %s mm, rotation %s deg; "
                     "saved in %s", time.perf_counter() - started_s, np.round(alignment.params_6[:3], 2).tolist(),
                     np.round(np.degrees(alignment.params_6[3:]), 2).tolist(), path)
        return MotionCorrector(alignment.reference_xyz, alignment.reference_affine, self.grid_shape, self.grid_affine,
                               alignment, roi_xyz=self.roi_xyz)
