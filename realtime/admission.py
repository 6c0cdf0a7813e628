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

What the receiver remembers is bounded (`AdmissionLimits`, docs/protocol.md "Limits"): the runs open
at once (one more is refused `limit`), the finished runs kept to answer resends, the runs whose early
trials wait for their start, and the senders whose last seq is kept; past a bound the oldest are
forgotten. Within a run, decode keeps indices below MAX_RUN_VOLUMES, and what became of each index
takes one byte.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mindeye.protocol import Event, Events, Message, Reason, RunEnd, RunStart, Verdict, Volume
from mindeye.protocol.messages import MAX_TEXT

RunKey = tuple[str, int]  # (session, run)
_ACCEPTED, _MISSING = 1, 2  # what became of a volume index (0: nothing yet)


class Refusal(Exception):
    """The service refuses a message that decoded: `reason` is a `Reason`, the text says why."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: Reason | None
    detail: str  # at most MAX_TEXT characters, so that it fits an ack


@dataclass(frozen=True)
class AdmissionLimits:
    """Bounds on the receiver's state (docs/protocol.md, "Limits")."""

    max_open_runs: int = 4  # the start of one more run is refused `limit`, unless an open run has gone silent:
    max_silence_s: float = 300.0  # then the run silent the longest (this long at least) is finished to make room
    max_closed_runs: int = 256  # finished runs kept to answer resends; the oldest are forgotten
    max_waiting_runs: int = 8  # runs not started whose early trials wait; the oldest run's are dropped
    max_senders: int = 1024  # sender_ids whose last seq is kept; the least recently seen are forgotten


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


@dataclass(frozen=True, slots=True)  # a wide gap releases thousands at once
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
    marks: bytearray = field(default_factory=bytearray)  # per volume index: 0, _ACCEPTED or _MISSING
    held: dict[int, tuple[Any, Any, float]] = field(default_factory=dict)  # index -> (payload, info, arrival)
    next_index: int = 0  # the next volume to release
    newest: int = -1
    gap_deadline_s: float | None = None
    abandon_deadline_s: float | None = None  # a later run started: finish this one if silent until then
    last_heard_s: float = float("-inf")  # arrival of the last message this run accepted
    closed: bool = False

    @property
    def key(self) -> RunKey:
        return self.session, self.run

    @property
    def accepted(self) -> set[int]:
        return {index for index, mark in enumerate(self.marks) if mark == _ACCEPTED}

    @property
    def missing(self) -> set[int]:
        return {index for index, mark in enumerate(self.marks) if mark == _MISSING}

    def mark(self, start: int, stop: int, mark: int) -> None:
        if stop <= start:
            return
        if len(self.marks) < stop:
            self.marks.extend(bytes(stop - len(self.marks)))
        self.marks[start:stop] = bytes([mark]) * (stop - start)

    def marked(self, index: int) -> int:
        return self.marks[index] if index < len(self.marks) else 0


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
    runs_forgotten: int = 0  # closed runs past max_closed_runs
    waiting_dropped: int = 0  # runs whose early trials were dropped (max_waiting_runs, or their start refused)
    senders_forgotten: int = 0  # senders past max_senders


class Admission:
    """Verdicts and processing steps for the messages of the volume socket (docs/protocol.md, rules 1-5, 7)."""

    def __init__(self, check_run: CheckRun, read_volume: ReadVolume, gap_wait_s: float | None = None,
                 limits: AdmissionLimits = AdmissionLimits()):
        """`gap_wait_s`: how long a gap may stay open, from the arrival of the first volume past it;
        None waits one TR of the run."""
        self.check_run, self.read_volume = check_run, read_volume
        self.gap_wait_s = gap_wait_s
        self.limits = limits
        self.runs: dict[RunKey, RunState] = {}  # open runs, and the newest closed ones
        self.counters = AdmissionCounters()
        self._last_seq: OrderedDict[str, int] = OrderedDict()  # least recently seen first
        self._early_events: dict[RunKey, dict[int, Event]] = {}  # events of runs not started yet, oldest first
        self._closed: deque[RunKey] = deque()  # the closed runs in self.runs, in the order they closed

    # -- public ------------------------------------------------------------------------------------

    def judge(self, message: Message, now_s: float, info: Any = None) -> tuple[Judgement, list[Step]]:
        """The verdict on `message`, received at `now_s`, and the steps it releases."""
        steps: list[Step] = []
        judgement = self._sequence(message) or self._judge(message, now_s, info, steps)
        if len(judgement.detail) > MAX_TEXT:  # it may quote a message's fields
            judgement = Judgement(judgement.verdict, judgement.reason, judgement.detail[:MAX_TEXT])
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
        self._last_seq.move_to_end(envelope.sender_id)
        if len(self._last_seq) > self.limits.max_senders:
            self._last_seq.popitem(last=False)
            self.counters.senders_forgotten += 1
        return None

    def _judge(self, message: Message, now_s: float, info: Any, steps: list[Step]) -> Judgement:
        try:
            if not isinstance(message, Volume | RunStart | Events | RunEnd):
                raise Refusal(Reason.UNKNOWN_TYPE, f"a '{message.TYPE}' message has no place on the volume socket")
            state = self.runs.get((message.session, message.run))
            if state is not None and state.closed:
                return self._resent(message, state)
            if isinstance(message, Volume):
                judgement = self._volume(message, state, now_s, info, steps)
            elif isinstance(message, RunStart):
                judgement = self._run_start(message, state, now_s, steps)
            elif isinstance(message, Events):
                judgement = self._events(message, state, steps)
            else:
                judgement = self._run_end(message, state, now_s, steps)
            heard = self.runs.get((message.session, message.run))
            if heard is not None and not heard.closed:
                heard.last_heard_s = now_s
            return judgement
        except Refusal as refusal:
            return Judgement(Verdict.REJECTED, refusal.reason, refusal.detail)

    def _resent(self, message: Volume | RunStart | Events | RunEnd, state: RunState) -> Judgement:
        """Rule 4 for a finished run: a copy of what it judged gets the answer it would have got while
        open (a resend must not read as a refusal of what was accepted); anything new is run_closed."""
        finished = f"run {state.run} of session {state.session} is finished"
        if isinstance(message, Volume) and not _differences(state, message):
            if state.marked(message.index) == _ACCEPTED:
                return Judgement(Verdict.DUPLICATE, None, f"volume {message.index} already accepted; {finished}")
            if state.marked(message.index) == _MISSING:
                raise Refusal(Reason.TOO_LATE, f"volume {message.index} came after it was declared missing; "
                                               f"{finished}")
        if (isinstance(message, RunStart) and state.announced and message.n_volumes == state.n_volumes
                and not _differences(state, message)):
            return Judgement(Verdict.DUPLICATE, None, f"run {message.run} already started; {finished}")
        if isinstance(message, RunEnd) and message.n_volumes == state.end_volumes:
            return Judgement(Verdict.DUPLICATE, None, f"run {message.run} already ended; {finished}")
        if isinstance(message, Events) and all(state.events.get(e.trial) == e for e in message.events):
            return Judgement(Verdict.DUPLICATE, None, f"all {len(message.events)} trials already known; {finished}")
        raise Refusal(Reason.RUN_CLOSED, f"{finished}, and this {message.TYPE} is not a copy of what it accepted")

    def _admit_run(self, message: RunStart | Volume, now_s: float, steps: list[Step]) -> None:
        """May this message start its run: room for one more open run (made by finishing the run silent the
        longest, if silent for `max_silence_s`), then the service's check. A start refused by the check
        drops the run's waiting trials; one refused for room keeps them, for a resend."""
        open_runs = [state for state in self.runs.values() if not state.closed]
        if len(open_runs) >= self.limits.max_open_runs:
            quietest = min(open_runs, key=lambda state: state.last_heard_s)
            if now_s - quietest.last_heard_s >= self.limits.max_silence_s:
                self._finish(quietest, steps)
                open_runs.remove(quietest)
        if len(open_runs) >= self.limits.max_open_runs:
            self._supersede(message, now_s)  # the scanner has moved on all the same
            names = ", ".join(f"{state.session} run {state.run}" for state in open_runs)
            raise Refusal(Reason.LIMIT, f"run {message.run} of session {message.session} cannot start: "
                                        f"{len(open_runs)} runs are open ({names}), the limit is "
                                        f"{self.limits.max_open_runs}; a run_end, the start of a later run "
                                        f"of the same session, or {self.limits.max_silence_s:g} s of silence "
                                        f"closes them")
        try:
            self.check_run(message)  # a subject the service cannot decode, or a geometry off its ROI
        except Refusal as refusal:
            waiting = self._early_events.pop((message.session, message.run), None)
            if not waiting:
                raise
            self.counters.waiting_dropped += 1
            raise Refusal(refusal.reason, f"{refusal.detail}; the run's {len(waiting)} waiting trial(s) were "
                                          f"dropped") from None

    def _supersede(self, message: RunStart | Volume, now_s: float) -> None:
        """The start of another run of a session (rule 4): the scanner has moved on, so the session's open
        runs without a run_end are finished once they have been silent for the gap wait (their last
        messages may still be overtaken in transit: by jitter, or by a restarted sender's new connection).
        A deadline already set is kept, so that resends of the new run cannot put it off."""
        for other in self.runs.values():
            if (other.session == message.session and not other.closed and other.run != message.run
                    and other.end_volumes is None and other.abandon_deadline_s is None):
                other.abandon_deadline_s = now_s + self._wait_s(other)

    def _start(self, message: RunStart | Volume, announced: bool, now_s: float, steps: list[Step]) -> RunState:
        """A new run (rule 4)."""
        self._supersede(message, now_s)
        state = RunState(message.session, message.run, message.subject, message.tr_s, Geometry.of(message), announced,
                         n_volumes=message.n_volumes if isinstance(message, RunStart) else None)
        self.runs[state.key] = state
        steps.append(StartRun(state))
        early = self._early_events.pop(state.key, None)
        if early:
            state.events.update(early)
            steps.append(AddEvents(state, tuple(sorted(early.values(), key=lambda e: e.trial))))
        return state

    def _run_start(self, message: RunStart, state: RunState | None, now_s: float, steps: list[Step]) -> Judgement:
        if state is None:
            self._admit_run(message, now_s, steps)
            self._start(message, announced=True, now_s=now_s, steps=steps)
            return Judgement(Verdict.ACCEPTED, None, "")
        differences = _differences(state, message)
        if state.announced and state.n_volumes != message.n_volumes:
            differences.append(f"n_volumes {message.n_volumes} != {state.n_volumes}")
        if not state.announced and message.n_volumes is not None:  # the run began with its volumes
            if message.n_volumes <= state.newest:
                differences.append(f"n_volumes {message.n_volumes}, but volume {state.newest} was accepted")
            elif state.end_volumes is not None and message.n_volumes < state.end_volumes:
                differences.append(f"n_volumes {message.n_volumes} < run_end's {state.end_volumes}")
        if differences:
            raise Refusal(Reason.CONFLICT, f"run_start of run {message.run} contradicts the run: "
                                           + "; ".join(differences))
        if state.announced:
            return Judgement(Verdict.DUPLICATE, None, f"run {message.run} already started")
        state.announced, state.n_volumes = True, message.n_volumes  # the run began with a volume
        return Judgement(Verdict.ACCEPTED, None, f"run {message.run} had begun with its volumes")

    def _events(self, message: Events, state: RunState | None, steps: list[Step]) -> Judgement:
        key = (message.session, message.run)
        known = state.events if state is not None else self._early_events.get(key, {})
        new = []
        for event in message.events:
            if event.trial not in known:
                new.append(event)
            elif known[event.trial] != event:
                raise Refusal(Reason.CONFLICT, f"trial {event.trial} of run {message.run} differs from the one "
                                               f"accepted: {event} != {known[event.trial]}")
        if not new:
            return Judgement(Verdict.DUPLICATE, None, f"all {len(message.events)} trials already known")
        if state is not None:
            known.update((event.trial, event) for event in new)
            steps.append(AddEvents(state, tuple(new)))
            return Judgement(Verdict.ACCEPTED, None, "")
        self._early_events.setdefault(key, {}).update((event.trial, event) for event in new)
        waiting = f"run {message.run} has not started: its trials wait for it"
        if len(self._early_events) <= self.limits.max_waiting_runs:
            return Judgement(Verdict.ACCEPTED, None, waiting)
        (session, run), dropped = next(iter(self._early_events.items()))
        del self._early_events[session, run]
        self.counters.waiting_dropped += 1
        return Judgement(Verdict.ACCEPTED, Reason.LIMIT, f"{waiting}; trials may wait for at most "
                                                         f"{self.limits.max_waiting_runs} runs, so the {len(dropped)} "
                                                         f"trial(s) of run {run} of session {session}, waiting the "
                                                         f"longest, were dropped")

    def _volume(self, message: Volume, state: RunState | None, now_s: float, info: Any, steps: list[Step]) -> Judgement:
        index = message.index
        if state is not None:
            differences = _differences(state, message)
            if differences:
                raise Refusal(Reason.CONFLICT,
                              f"volume {index} contradicts run {message.run}: " + "; ".join(differences))
            if state.end_volumes is not None and index >= state.end_volumes:
                raise Refusal(Reason.RUN_CLOSED, f"volume {index} is past the end of run {message.run} "
                                                 f"({state.end_volumes} volumes)")
            if state.n_volumes is not None and index >= state.n_volumes:
                raise Refusal(Reason.BAD_VALUE, f"volume {index} is past the end of run {message.run}: its "
                                                f"run_start said {state.n_volumes} volumes")
            if state.marked(index) == _ACCEPTED:
                return Judgement(Verdict.DUPLICATE, None, f"volume {index} of run {message.run} already accepted")
            if state.marked(index) == _MISSING:
                raise Refusal(Reason.TOO_LATE, f"volume {index} of run {message.run} came after it was declared "
                                               f"missing")
        else:
            self._admit_run(message, now_s, steps)  # the run begins with this volume (the receiver may have restarted)
        payload = self.read_volume(message)  # may refuse (NaN): nothing changes then
        if state is None:
            state = self._start(message, announced=False, now_s=now_s, steps=steps)
        filled_gap = index < state.newest
        if state.abandon_deadline_s is not None:  # still arriving: not abandoned yet
            state.abandon_deadline_s = now_s + self._wait_s(state)
        state.mark(index, index + 1, _ACCEPTED)
        state.newest = max(state.newest, index)
        state.held[index] = (payload, info, now_s)
        self._release(state, now_s, steps)
        if filled_gap:
            self.counters.out_of_order += 1
            return Judgement(Verdict.ACCEPTED, Reason.OUT_OF_ORDER, f"volume {index} filled a gap")
        return Judgement(Verdict.ACCEPTED, None, "")

    def _run_end(self, message: RunEnd, state: RunState | None, now_s: float, steps: list[Step]) -> Judgement:
        if state is None:
            raise Refusal(Reason.BAD_VALUE, f"run_end for run {message.run} of session {message.session}, which "
                                            f"never started")
        if state.end_volumes is not None:
            if state.end_volumes != message.n_volumes:
                raise Refusal(Reason.CONFLICT, f"run_end says {message.n_volumes} volumes, an earlier one said "
                                               f"{state.end_volumes}")
            return Judgement(Verdict.DUPLICATE, None, f"run {message.run} already ended")
        if state.n_volumes is not None and message.n_volumes > state.n_volumes:
            raise Refusal(Reason.CONFLICT, f"run_end says {message.n_volumes} volumes, its run_start said "
                                           f"{state.n_volumes}")
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
        elif state.gap_deadline_s is None:  # after run_end only the last volumes are missing: wait for them once
            state.gap_deadline_s = now_s + self._wait_s(state)
        if state.end_volumes is not None and state.next_index >= state.end_volumes:
            self._finish(state, steps)

    def _close_gap(self, state: RunState, steps: list[Step]) -> None:
        """Declare missing every volume before the first held one (or, after run_end, before the end)."""
        start, stop = state.next_index, min(state.held) if state.held else state.end_volumes
        state.mark(start, stop, _MISSING)
        steps.extend(MissingVolume(state, index) for index in range(start, stop))
        self.counters.volumes_missing += stop - start
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
        self._closed.append(state.key)
        if len(self._closed) > self.limits.max_closed_runs:
            del self.runs[self._closed.popleft()]
            self.counters.runs_forgotten += 1

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
