"""The receiver rules of docs/protocol.md as a state machine: a verdict for every message, and the
processing steps it releases, in order.

`Admission.judge(message, now_s)` answers one decoded message with a `Judgement` (the ack's verdict,
reason and detail) and the `Step`s the service must carry out, in order: start a run, add trials,
use a volume, declare one missing, finish a run. Volumes are released strictly in index order; one
that comes past a gap is held until the gap fills or `gap_wait_s` has passed since the first held
volume arrived (`tick(now_s)`), when the gap is declared missing. Nothing here reads a clock: the
caller passes the arrival time, so replaying a journal with its recorded arrival times rebuilds the
very same state, verdicts and steps (the restart path of the service).

What the rules leave to the service goes through two callbacks, called before a message is
accepted: `check_run(message)` on the `run_start` or volume that starts a run (is the subject
known, does the geometry match its ROI), and `read_volume(volume)` on every volume (its payload,
the ROI values, if the data are usable). Either raises `Refusal`, and then nothing changes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mindeye.protocol import Event, Events, Message, Reason, RunEnd, RunStart, Verdict, Volume

RunKey = tuple[str, int]  # (session, run)


class Refusal(Exception):
    """The service refuses a message that decoded: `reason` is a `Reason`, the text says why."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: Reason | None
    detail: str


@dataclass(frozen=True)
class Geometry:
    dtype: str
    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]

    @classmethod
    def of(cls, message: RunStart | Volume) -> Geometry:
        return cls(message.dtype, tuple(message.shape), message.affine)


# ---- the steps a judgement releases ------------------------------------------------------------------

@dataclass(frozen=True)
class StartRun:
    run: RunState


@dataclass(frozen=True)
class AddEvents:
    run: RunState
    events: tuple[Event, ...]


@dataclass(frozen=True)
class UseVolume:
    run: RunState
    index: int
    payload: Any  # what `read_volume` returned (the ROI values)
    info: Any  # what the caller passed to `judge` with the volume (its arrival timings)


@dataclass(frozen=True)
class MissingVolume:
    run: RunState
    index: int


@dataclass(frozen=True)
class FinishRun:
    run: RunState


Step = StartRun | AddEvents | UseVolume | MissingVolume | FinishRun


@dataclass(eq=False)
class RunState:
    """What the receiver knows of one run."""

    session: str
    run: int
    subject: str
    tr_s: float
    geometry: Geometry
    announced: bool  # a run_start came (else the run began with a volume: the receiver may have restarted)
    n_volumes: int | None = None  # from run_start, when the sender knew it
    end_volumes: int | None = None  # from run_end
    events: dict[int, Event] = field(default_factory=dict)
    accepted: set[int] = field(default_factory=set)
    missing: set[int] = field(default_factory=set)
    held: dict[int, tuple[Any, Any, float]] = field(default_factory=dict)  # index -> (payload, info, arrival)
    next_index: int = 0  # the next volume to release
    newest: int = -1
    gap_deadline_s: float | None = None
    abandon_deadline_s: float | None = None  # a later run started: finish this one if silent until then
    closed: bool = False

    @property
    def key(self) -> RunKey:
        return self.session, self.run


CheckRun = Callable[[RunStart | Volume], None]
ReadVolume = Callable[[Volume], Any]


@dataclass
class AdmissionCounters:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    out_of_order: int = 0
    volumes_missing: int = 0
    messages_lost: int = 0  # seq gaps of a sender: messages that never arrived
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class Admission:
    """Verdicts and processing steps for the messages of the volume socket (docs/protocol.md, rules 1-5)."""

    def __init__(self, check_run: CheckRun, read_volume: ReadVolume, gap_wait_s: float | None = None):
        """`gap_wait_s`: how long a gap may stay open, from the arrival of the first volume past it;
        None waits one TR of the run."""
        self.check_run, self.read_volume = check_run, read_volume
        self.gap_wait_s = gap_wait_s
        self.runs: dict[RunKey, RunState] = {}
        self.counters = AdmissionCounters()
        self._last_seq: dict[str, int] = {}
        self._early_events: dict[RunKey, dict[int, Event]] = {}  # events of runs not started yet

    # -- public ------------------------------------------------------------------------------------

    def judge(self, message: Message, now_s: float, info: Any = None) -> tuple[Judgement, list[Step]]:
        """The verdict on `message`, received at `now_s`, and the steps it releases."""
        steps: list[Step] = []
        judgement = self._sequence(message) or self._judge(message, now_s, info, steps)
        self._count(judgement)
        return judgement, steps

    def tick(self, now_s: float) -> list[Step]:
        """Declare missing the gaps whose wait is over at `now_s`; the steps that releases."""
        steps: list[Step] = []
        for run in list(self.runs.values()):
            if run.gap_deadline_s is not None and now_s >= run.gap_deadline_s:
                self._close_gap(run, steps)
                self._release(run, now_s, steps)
            if not run.closed and run.abandon_deadline_s is not None and now_s >= run.abandon_deadline_s:
                self._finish(run, steps)
        return steps

    def next_deadline_s(self) -> float | None:
        deadlines = [deadline for run in self.runs.values() if not run.closed
                     for deadline in (run.gap_deadline_s, run.abandon_deadline_s) if deadline is not None]
        return min(deadlines, default=None)

    # -- rules ------------------------------------------------------------------------------------

    def _sequence(self, message: Message) -> Judgement | None:
        """Rule 5: a seq must grow per sender_id; a jump counts messages lost in transit."""
        envelope = message.envelope
        last = self._last_seq.get(envelope.sender_id)
        if last is not None and envelope.seq <= last:
            return Judgement(Verdict.REJECTED, Reason.SEQ_REGRESSED,
                             f"seq {envelope.seq} of sender {envelope.sender_id} is not above its last, {last}")
        if last is not None:
            self.counters.messages_lost += envelope.seq - last - 1
        self._last_seq[envelope.sender_id] = envelope.seq
        return None

    def _judge(self, message: Message, now_s: float, info: Any, steps: list[Step]) -> Judgement:
        try:
            if isinstance(message, Volume):
                return self._volume(message, now_s, info, steps)
            if isinstance(message, RunStart):
                return self._run_start(message, now_s, steps)
            if isinstance(message, Events):
                return self._events(message, steps)
            if isinstance(message, RunEnd):
                return self._run_end(message, now_s, steps)
            raise Refusal(Reason.UNKNOWN_TYPE, f"a '{message.TYPE}' message has no place on the volume socket")
        except Refusal as refusal:
            return Judgement(Verdict.REJECTED, refusal.reason, refusal.detail)

    def _open_run(self, session: str, run: int) -> RunState | None:
        state = self.runs.get((session, run))
        if state is not None and state.closed:
            raise Refusal(Reason.RUN_CLOSED, f"run {run} of session {session} is finished")
        return state

    def _start(self, message: RunStart | Volume, announced: bool, now_s: float, steps: list[Step]) -> RunState:
        """A new run (rule 4). The scanner has moved on, so the session's open runs without a run_end
        are finished once they have been silent for the gap wait (their last messages may still be
        overtaken in transit: by jitter, or by a restarted sender's new connection)."""
        for other in self.runs.values():
            if (other.session == message.session and not other.closed and other.run != message.run
                    and other.end_volumes is None):
                other.abandon_deadline_s = now_s + self._wait_s(other)
        state = RunState(message.session, message.run, message.subject, message.tr_s, Geometry.of(message), announced,
                         n_volumes=message.n_volumes if isinstance(message, RunStart) else None)
        self.runs[state.key] = state
        steps.append(StartRun(state))
        early = self._early_events.pop(state.key, None)
        if early:
            state.events.update(early)
            steps.append(AddEvents(state, tuple(sorted(early.values(), key=lambda e: e.trial))))
        return state

    def _run_start(self, message: RunStart, now_s: float, steps: list[Step]) -> Judgement:
        state = self._open_run(message.session, message.run)
        if state is None:
            self.check_run(message)  # a subject the service cannot decode, or a geometry off its ROI
            self._start(message, announced=True, now_s=now_s, steps=steps)
            return Judgement(Verdict.ACCEPTED, None, "")
        differences = _differences(state, message)
        if state.announced and state.n_volumes != message.n_volumes:
            differences.append(f"n_volumes {message.n_volumes} != {state.n_volumes}")
        if differences:
            raise Refusal(Reason.CONFLICT, f"run_start of run {message.run} contradicts the run: "
                                           + "; ".join(differences))
        if state.announced:
            return Judgement(Verdict.DUPLICATE, None, f"run {message.run} already started")
        state.announced, state.n_volumes = True, message.n_volumes  # the run began with a volume
        return Judgement(Verdict.ACCEPTED, None, f"run {message.run} had begun with its volumes")

    def _events(self, message: Events, steps: list[Step]) -> Judgement:
        state = self._open_run(message.session, message.run)
        known = state.events if state is not None else self._early_events.setdefault((message.session, message.run), {})
        new = []
        for event in message.events:
            if event.trial not in known:
                new.append(event)
            elif known[event.trial] != event:
                raise Refusal(Reason.CONFLICT, f"trial {event.trial} of run {message.run} differs from the one "
                                               f"accepted: {event} != {known[event.trial]}")
        if not new:
            return Judgement(Verdict.DUPLICATE, None, f"all {len(message.events)} trials already known")
        known.update((event.trial, event) for event in new)
        if state is not None:
            steps.append(AddEvents(state, tuple(new)))
        return Judgement(Verdict.ACCEPTED, None, "" if state is not None else
                         f"run {message.run} has not started: its trials wait for it")

    def _volume(self, message: Volume, now_s: float, info: Any, steps: list[Step]) -> Judgement:
        state = self._open_run(message.session, message.run)
        index = message.index
        if state is not None:
            differences = _differences(state, message)
            if differences:
                raise Refusal(Reason.CONFLICT, f"volume {index} contradicts run {message.run}: " + "; ".join(differences))
            if state.end_volumes is not None and index >= state.end_volumes:
                raise Refusal(Reason.RUN_CLOSED, f"volume {index} is past the end of run {message.run} "
                                                 f"({state.end_volumes} volumes)")
            if index in state.accepted:
                return Judgement(Verdict.DUPLICATE, None, f"volume {index} of run {message.run} already accepted")
            if index in state.missing:
                raise Refusal(Reason.TOO_LATE, f"volume {index} of run {message.run} came after it was declared "
                                               f"missing")
        if state is None:
            self.check_run(message)  # the run begins with this volume (the receiver may have restarted)
        payload = self.read_volume(message)  # may refuse (NaN): nothing changes then
        if state is None:
            state = self._start(message, announced=False, now_s=now_s, steps=steps)
        filled_gap = index < state.newest
        if state.abandon_deadline_s is not None:  # still arriving: not abandoned yet
            state.abandon_deadline_s = now_s + self._wait_s(state)
        state.accepted.add(index)
        state.newest = max(state.newest, index)
        state.held[index] = (payload, info, now_s)
        self._release(state, now_s, steps)
        if filled_gap:
            self.counters.out_of_order += 1
            return Judgement(Verdict.ACCEPTED, Reason.OUT_OF_ORDER, f"volume {index} filled a gap")
        return Judgement(Verdict.ACCEPTED, None, "")

    def _run_end(self, message: RunEnd, now_s: float, steps: list[Step]) -> Judgement:
        state = self._open_run(message.session, message.run)
        if state is None:
            raise Refusal(Reason.BAD_VALUE, f"run_end for run {message.run} of session {message.session}, which "
                                            f"never started")
        if state.end_volumes is not None:
            if state.end_volumes != message.n_volumes:
                raise Refusal(Reason.CONFLICT, f"run_end says {message.n_volumes} volumes, an earlier one said "
                                               f"{state.end_volumes}")
            return Judgement(Verdict.DUPLICATE, None, f"run {message.run} already ended")
        if message.n_volumes <= state.newest:
            raise Refusal(Reason.CONFLICT, f"run_end says {message.n_volumes} volumes, but volume {state.newest} "
                                           f"was accepted")
        state.end_volumes, state.abandon_deadline_s = message.n_volumes, None
        if state.next_index < state.end_volumes and not state.held:  # only the last volumes are missing
            state.gap_deadline_s = now_s + self._wait_s(state)
        self._release(state, now_s, steps)
        return Judgement(Verdict.ACCEPTED, None, "")

    # -- ordering ---------------------------------------------------------------------------------

    def _release(self, state: RunState, now_s: float, steps: list[Step]) -> None:
        """Use the held volumes that are next in order; (re)arm the gap's deadline; finish a complete run."""
        while state.next_index in state.held:
            payload, info, _ = state.held.pop(state.next_index)
            steps.append(UseVolume(state, state.next_index, payload, info))
            state.next_index += 1
        if state.held:
            first_arrival_s = min(arrival for _, _, arrival in state.held.values())
            state.gap_deadline_s = first_arrival_s + self._wait_s(state)
        elif state.end_volumes is None or state.next_index >= state.end_volumes:
            state.gap_deadline_s = None
        if state.end_volumes is not None and state.next_index >= state.end_volumes:
            self._finish(state, steps)

    def _close_gap(self, state: RunState, steps: list[Step]) -> None:
        """Declare missing every volume before the first held one (or, after run_end, before the end)."""
        stop = min(state.held) if state.held else state.end_volumes
        for index in range(state.next_index, stop):
            state.missing.add(index)
            steps.append(MissingVolume(state, index))
            self.counters.volumes_missing += 1
        state.next_index = stop
        state.gap_deadline_s = None

    def _finish(self, state: RunState, steps: list[Step]) -> None:
        if state.held:  # a run cut short: what came is used, the gaps are missing
            while state.held:
                self._close_gap(state, steps)
                while state.next_index in state.held:
                    payload, info, _ = state.held.pop(state.next_index)
                    steps.append(UseVolume(state, state.next_index, payload, info))
                    state.next_index += 1
        state.closed, state.gap_deadline_s, state.abandon_deadline_s = True, None, None
        steps.append(FinishRun(state))

    def _wait_s(self, state: RunState) -> float:
        return state.tr_s if self.gap_wait_s is None else self.gap_wait_s

    def _count(self, judgement: Judgement) -> None:
        if judgement.verdict == Verdict.ACCEPTED:
            self.counters.accepted += 1
        elif judgement.verdict == Verdict.DUPLICATE:
            self.counters.duplicate += 1
        else:
            self.counters.rejected += 1
            reasons = self.counters.rejected_by_reason
            reasons[str(judgement.reason)] = reasons.get(str(judgement.reason), 0) + 1


def _differences(state: RunState, message: RunStart | Volume) -> list[str]:
    """What in `message` contradicts the run's subject, TR and geometry."""
    found = []
    if message.subject != state.subject:
        found.append(f"subject {message.subject} != {state.subject}")
    if abs(message.tr_s - state.tr_s) > 1e-6 * state.tr_s:
        found.append(f"tr_s {message.tr_s} != {state.tr_s}")
    geometry = Geometry.of(message)
    for name in ("dtype", "shape", "affine"):
        if getattr(geometry, name) != getattr(state.geometry, name):
            found.append(f"{name} {getattr(geometry, name)} != {getattr(state.geometry, name)}")
    return found
