"""What the replayer streams: runs as lists of `Outgoing` messages, each with its intended send time.

Three sources share one interface, `runs() -> Iterator[list[Outgoing]]` (one list per run, read when
reached, so a session of NSD runs is never in memory at once):

- `NSDSource`: runs of the NSD layout (real NSD or the synthetic world): volumes from the
  pre-processed time series, TR from its header, trials from the per-run design file.
- `NiftiSource`: any 4D NIfTI, with trials from a BIDS-style events.tsv when given.
- `JournalSource`: a recorded session journal, frame for frame, at the recorded arrival times.

Send times follow the scanner: `run_start` and `events` at the run's start, volume i once its
acquisition is over, at (i + 1) x TR, `run_end` with the last volume.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mindeye.errors import FormatError
from mindeye.journal import read_journal
from mindeye.nsd import NSDLayout, read_design, read_timeseries, subject_name, task_runs
from mindeye.nsd.design import IMAGE_SECONDS
from mindeye.nsd.files import read_tr
from mindeye.protocol import (DTYPES, Envelope, Event, Events, Message, ProtocolError, RunEnd, RunStart, Volume,
                              read_bids_events)

UNSENT = Envelope("unsent", 0, 0.0)  # placeholder: the sender stamps its own envelope at send time
RESTART = "sender_restart"  # the `type` of the marker at which the sender restarts (a fault)
RECORD = "record"  # the `type` of a journal record whose header cannot be read
MAX_PLAUSIBLE_TR_S = 60.0
Tamper = Callable[[list[bytes]], list[bytes]]  # a frame-level fault, applied to the encoded frames


@dataclass(frozen=True)
class Outgoing:
    """One message to send: when (seconds after the replay starts), what, and which run and volume.

    Either `message` is set (stamped with the sender's next envelope when sent) or `frames` is
    (recorded frames, sent exactly as they are); `tampers` then alter the frames (faults)."""

    at_s: float
    type: str  # protocol message type, or RESTART, or RECORD
    session: str | None
    run: int | None
    index: int | None  # volume index within the run (volumes only)
    message: Message | None = None
    frames: tuple[bytes, ...] | None = None
    tampers: tuple[Tamper, ...] = field(default=())

    def describe(self) -> dict:
        """The fields a fault log names a message by."""
        return {"type": self.type, "session": self.session, "run": self.run, "index": self.index}


def run_messages(volumes_xyzt: np.ndarray, *, tr_s: float, affine: np.ndarray, events: Sequence[Event],
                 session: str, subject: str, run: int, start_s: float = 0.0, dtype: str | None = None,
                 events_mode: str = "upfront") -> list[Outgoing]:
    """One run as sent live, in send order: `run_start`, the trials, the volumes, `run_end`.

    `events_mode`: "upfront" sends the whole schedule with `run_start` (complete); "at_onset" sends
    each trial when its image appears, as a stimulus computer would (the last one marked complete)."""
    if events_mode not in ("upfront", "at_onset"):
        raise ValueError(f"events_mode must be 'upfront' or 'at_onset', got {events_mode!r}")
    dtype = dtype or volumes_xyzt.dtype.name
    if dtype not in DTYPES:
        raise ValueError(f"run {run}: volumes are {volumes_xyzt.dtype.name}, which the protocol does not carry; "
                         f"set dtype to one of {', '.join(DTYPES)}")
    n_volumes = volumes_xyzt.shape[3]
    shape = tuple(volumes_xyzt.shape[:3])
    where = dict(session=session, run=run)
    plan = [Outgoing(start_s, RunStart.TYPE, session, run, None,
                     RunStart(session, subject, run, tr_s, n_volumes, dtype, shape, affine, UNSENT))]
    if events_mode == "upfront":
        plan.append(Outgoing(start_s, Events.TYPE, session, run, None, Events(**where, events=tuple(events),
                                                                             complete=True, envelope=UNSENT)))
    else:
        plan += [Outgoing(start_s + event.onset_s, Events.TYPE, session, run, None,
                          Events(**where, events=(event,), complete=k == len(events) - 1, envelope=UNSENT))
                 for k, event in enumerate(events)]
    for index in range(n_volumes):
        volume = Volume.from_array(volumes_xyzt[..., index].astype(dtype, copy=False), session=session,
                                   subject=subject, run=run, index=index, acq_time_s=index * tr_s, tr_s=tr_s,
                                   affine=affine, envelope=UNSENT)
        plan.append(Outgoing(start_s + (index + 1) * tr_s, Volume.TYPE, session, run, index, volume))
    plan.append(Outgoing(start_s + n_volumes * tr_s, RunEnd.TYPE, session, run, None,
                         RunEnd(**where, n_volumes=n_volumes, envelope=UNSENT)))
    return sorted(plan, key=lambda item: item.at_s)  # stable: at equal times, construction order


def design_events(image_id_t: np.ndarray, tr_s: float) -> tuple[Event, ...]:
    """Trials from an NSD per-run design vector ((T,) 0-based image id at onset volumes, -1 elsewhere):
    onset = onset volume x TR, NSD's 3-s image duration."""
    onsets = np.flatnonzero(image_id_t >= 0)
    return tuple(Event(trial, float(volume * tr_s), IMAGE_SECONDS, int(image_id_t[volume]), "image")
                 for trial, volume in enumerate(onsets))


TASK_RUNS = "task"  # NSDSource.run_numbers: the session's task runs, in order (`task_runs`)


@dataclass(frozen=True)
class NSDSource:
    """Runs of one NSD session: `layout.timeseries` volumes, `layout.design` trials.

    `run_numbers`: file run numbers, or "task" for the session's task runs in order (NSD sessions
    with resting-state runs hold 14 runs, 1 and 14 at rest, so the 12 task runs are files 2-13)."""

    layout: NSDLayout
    subject: int
    session: int
    run_numbers: Sequence[int] | str
    session_id: str | None = None  # protocol session id; default "subjNN-nsdSS"
    dtype: str | None = None  # convert volumes (e.g. float32, so NaN faults can be carried)
    events_mode: str = "upfront"
    run_gap_s: float = 0.0  # pause between runs

    def __post_init__(self) -> None:
        if isinstance(self.run_numbers, str) and self.run_numbers != TASK_RUNS:
            raise ValueError(f"runs must be a list of run numbers or {TASK_RUNS!r}, got {self.run_numbers!r}")

    def runs(self) -> Iterator[list[Outgoing]]:
        session_id = self.session_id or f"{subject_name(self.subject)}-nsd{self.session:02d}"
        run_numbers = (task_runs(self.layout, self.subject, self.session) if self.run_numbers == TASK_RUNS
                       else self.run_numbers)
        start_s = 0.0
        for run in run_numbers:
            series = read_timeseries(self.layout.timeseries(self.subject, self.session, run))
            image_id_t = read_design(self.layout.design(self.subject, self.session, run), series.n_volumes)
            plan = run_messages(series.data_xyzt, tr_s=series.tr, affine=series.affine,
                                events=design_events(image_id_t, series.tr), session=session_id,
                                subject=subject_name(self.subject), run=run, start_s=start_s, dtype=self.dtype,
                                events_mode=self.events_mode)
            yield plan
            start_s = plan[-1].at_s + self.run_gap_s


@dataclass(frozen=True)
class NiftiSource:
    """Any 4D NIfTI as one run; TR from the header unless `tr_s` overrides it."""

    path: Path
    subject_id: str
    session_id: str | None = None  # default: the file name, made a protocol identifier
    run: int = 1
    tr_s: float | None = None
    events_tsv: Path | None = None
    dtype: str | None = None
    events_mode: str = "upfront"

    def runs(self) -> Iterator[list[Outgoing]]:
        image = nib.load(self.path)
        if len(image.shape) != 4:
            raise FormatError(self.path, "image", "4D (X, Y, Z, T)", f"{len(image.shape)}D shape {image.shape}")
        tr_s = self.tr_s if self.tr_s is not None else read_tr(image)
        if not 0 < tr_s <= MAX_PLAUSIBLE_TR_S:
            raise FormatError(self.path, "TR in the header", f"a repetition time in (0, {MAX_PLAUSIBLE_TR_S:g}] s",
                              f"{tr_s:g} s (milliseconds labelled as seconds?); pass tr_s to override it")
        events = read_bids_events(self.events_tsv) if self.events_tsv is not None else ()
        session_id = self.session_id or _identifier(re.sub(r"\.nii(\.gz)?$", "", Path(self.path).name))
        yield run_messages(np.asanyarray(image.dataobj), tr_s=tr_s, affine=image.affine, events=events,
                           session=session_id, subject=self.subject_id, run=self.run, dtype=self.dtype,
                           events_mode=self.events_mode)


@dataclass(frozen=True)
class JournalSource:
    """A recorded journal, each record's frames sent exactly as received, at the recorded inter-arrival
    times. A run ends after its `run_end` record (records whose header cannot be read stay in place).
    The recorded envelopes travel too: a receiver that already heard them rejects them `seq_regressed`,
    and so does it a duplicate fault's copy."""

    path: Path

    def runs(self) -> Iterator[list[Outgoing]]:
        plan: list[Outgoing] = []
        first_received = None
        for record in read_journal(self.path):
            first_received = record.received_unix_s if first_received is None else first_received
            at_s = record.received_unix_s - first_received
            try:
                message = record.message()
            except ProtocolError:
                plan.append(Outgoing(at_s, RECORD, None, None, None, frames=record.frames))
                continue
            plan.append(Outgoing(at_s, message.TYPE, getattr(message, "session", None), getattr(message, "run", None),
                                 getattr(message, "index", None) if message.TYPE == Volume.TYPE else None,
                                 frames=record.frames))
            if message.TYPE == RunEnd.TYPE:
                yield plan
                plan = []
        if plan:
            yield plan


def _identifier(text: str) -> str:
    """`text` made a protocol identifier: unsafe characters become '-', at most 64 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-")[:64]
    return cleaned or "nifti"
