"""The receiver rules (docs/protocol.md) as realtime/admission.py applies them: verdicts and steps."""
from __future__ import annotations

import numpy as np
import pytest

from mindeye.protocol import Envelope, Event, Events, Reason, RunEnd, RunStart, Verdict, Volume
from realtime.admission import (AddEvents, Admission, FinishRun, MissingVolume, Refusal, StartRun, UseVolume)

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
TR = 1.0


class Sender:
    """Stamps messages as one sender process would."""

    def __init__(self, sender_id: str = "scanner1"):
        self.sender_id, self.seq = sender_id, 0

    def envelope(self) -> Envelope:
        self.seq += 1
        return Envelope(self.sender_id, self.seq - 1, 0.0)

    def volume(self, index: int, run: int = 1, fill: float = 1.0, shape=(2, 2, 2), subject: str = "subj01") -> Volume:
        return Volume.from_array(np.full(shape, fill, dtype=np.float32), session="s1", subject=subject, run=run,
                                 index=index, acq_time_s=index * TR, tr_s=TR, affine=AFFINE, envelope=self.envelope())

    def run_start(self, run: int = 1, n_volumes: int | None = 6, shape=(2, 2, 2)) -> RunStart:
        return RunStart("s1", "subj01", run, TR, n_volumes, "float32", shape,
                        tuple(map(tuple, AFFINE)), self.envelope())

    def run_end(self, n_volumes: int, run: int = 1) -> RunEnd:
        return RunEnd("s1", run, n_volumes, self.envelope())

    def events(self, *events: Event, run: int = 1) -> Events:
        return Events("s1", run, tuple(events), False, self.envelope())


def accept_run(message):
    """The service's run check, reduced: every subject and geometry is fine."""


def read_volume(volume):
    """The service's volume check, reduced: NaN volumes are refused; the payload is the first value."""
    values = volume.array().reshape(-1)
    if np.isnan(values).any():
        raise Refusal(Reason.BAD_DATA, "NaN")
    return float(values[0])


def kinds(steps) -> list[str]:
    names = {StartRun: "start", AddEvents: "events", UseVolume: "use", MissingVolume: "missing", FinishRun: "finish"}
    return [names[type(s)] + (f"{s.index}" if isinstance(s, UseVolume | MissingVolume) else "") for s in steps]


@pytest.fixture
def admission():
    return Admission(accept_run, read_volume, gap_wait_s=1.0)


def test_in_order_run_is_used_volume_by_volume_and_finished_at_run_end(admission):
    sender = Sender()
    judgement, steps = admission.judge(sender.run_start(), 0.0)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["start"]
    for i in range(3):
        judgement, steps = admission.judge(sender.volume(i, fill=i), 1.0 + i)
        assert judgement.verdict == Verdict.ACCEPTED and judgement.reason is None
        assert kinds(steps) == [f"use{i}"] and steps[0].payload == i
    judgement, steps = admission.judge(sender.run_end(3), 5.0)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["finish"]
    judgement, _ = admission.judge(sender.volume(1), 6.0)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.RUN_CLOSED)


def test_duplicates_are_acked_as_such_and_used_once(admission):
    sender, restarted = Sender("a"), Sender("b")
    admission.judge(sender.run_start(), 0.0)
    admission.judge(sender.volume(0, fill=5), 1.0)
    judgement, steps = admission.judge(restarted.volume(0, fill=7), 1.5)  # another sender, other bytes
    assert judgement.verdict == Verdict.DUPLICATE and steps == []
    judgement, steps = admission.judge(restarted.run_start(), 1.6)
    assert judgement.verdict == Verdict.DUPLICATE and steps == []
    assert admission.counters.accepted == 2 and admission.counters.duplicate == 2


def test_a_volume_past_a_gap_waits_for_it_and_the_gap_fills_out_of_order(admission):
    sender = Sender()
    admission.judge(sender.run_start(), 0.0)
    admission.judge(sender.volume(0), 1.0)
    judgement, steps = admission.judge(sender.volume(2), 3.0)
    assert judgement.verdict == Verdict.ACCEPTED and steps == []  # held
    assert admission.next_deadline_s() == pytest.approx(4.0)
    assert admission.tick(3.9) == []
    judgement, steps = admission.judge(sender.volume(1), 3.5)
    assert (judgement.verdict, judgement.reason) == (Verdict.ACCEPTED, Reason.OUT_OF_ORDER)
    assert kinds(steps) == ["use1", "use2"] and admission.next_deadline_s() is None


def test_a_gap_is_declared_missing_after_the_wait_and_a_late_volume_is_refused(admission):
    sender = Sender()
    admission.judge(sender.run_start(), 0.0)
    admission.judge(sender.volume(0), 1.0)
    admission.judge(sender.volume(3), 4.0)
    admission.judge(sender.volume(4), 4.6)  # the wait runs from the first volume past the gap
    assert kinds(admission.tick(5.0)) == ["missing1", "missing2", "use3", "use4"]
    judgement, steps = admission.judge(sender.volume(2), 5.1)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.TOO_LATE) and steps == []
    assert admission.counters.volumes_missing == 2


def test_run_end_waits_for_the_last_missing_volumes_then_finishes(admission):
    sender = Sender()
    admission.judge(sender.run_start(), 0.0)
    admission.judge(sender.volume(0), 1.0)
    judgement, steps = admission.judge(sender.run_end(3), 3.0)
    assert judgement.verdict == Verdict.ACCEPTED and steps == []
    judgement, steps = admission.judge(sender.volume(1), 3.2)  # in time
    assert kinds(steps) == ["use1"]
    assert kinds(admission.tick(4.0)) == ["missing2", "finish"]


def test_refused_content_changes_nothing_and_a_clean_copy_is_accepted(admission):
    sender = Sender()
    admission.judge(sender.run_start(), 0.0)
    judgement, steps = admission.judge(sender.volume(0, fill=np.nan), 1.0)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.BAD_DATA) and steps == []
    judgement, steps = admission.judge(sender.volume(0, fill=2.0), 1.1)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["use0"] and steps[0].payload == 2.0


def test_sequence_numbers_regressing_are_refused_and_gaps_counted(admission):
    sender = Sender()
    admission.judge(sender.run_start(), 0.0)
    sender.seq = 5  # messages 1-4 lost in transit
    admission.judge(sender.volume(0), 1.0)
    assert admission.counters.messages_lost == 4
    sender.seq = 3
    judgement, _ = admission.judge(sender.volume(1), 2.0)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.SEQ_REGRESSED)


def test_conflicts_with_the_run_are_refused(admission):
    sender = Sender()
    admission.judge(sender.run_start(), 0.0)
    admission.judge(sender.events(Event(0, 2.0, 3.0, 11, "image")), 0.0)
    judgement, _ = admission.judge(sender.volume(0, shape=(2, 2, 3)), 1.0)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.CONFLICT) and "shape" in judgement.detail
    judgement, _ = admission.judge(sender.run_start(n_volumes=9), 1.0)
    assert judgement.reason == Reason.CONFLICT and "n_volumes" in judgement.detail
    judgement, _ = admission.judge(sender.events(Event(0, 2.0, 3.0, 12, "image")), 1.0)
    assert judgement.reason == Reason.CONFLICT and "trial 0" in judgement.detail
    judgement, steps = admission.judge(sender.events(Event(0, 2.0, 3.0, 11, "image"), Event(1, 6.0, 3.0, 5, "image")),
                                       1.0)
    assert judgement.verdict == Verdict.ACCEPTED and [e.trial for e in steps[0].events] == [1]


def test_a_run_may_start_with_a_volume_and_early_events_wait_for_it(admission):
    sender = Sender()
    judgement, steps = admission.judge(sender.events(Event(0, 2.0, 3.0, 11, "image")), 0.0)
    assert judgement.verdict == Verdict.ACCEPTED and steps == []
    judgement, steps = admission.judge(sender.volume(0), 1.0)  # a receiver that restarted missed run_start
    assert kinds(steps) == ["start", "events", "use0"]
    judgement, steps = admission.judge(sender.run_start(), 1.5)
    assert judgement.verdict == Verdict.ACCEPTED and steps == []


def test_a_new_run_of_the_session_finishes_the_previous_one_once_it_is_silent(admission):
    sender = Sender()
    admission.judge(sender.run_start(run=1), 0.0)
    admission.judge(sender.volume(0, run=1), 1.0)
    admission.judge(sender.volume(3, run=1), 3.0)  # held past a gap when run 1 is cut short
    judgement, steps = admission.judge(sender.run_start(run=2), 3.1)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["start"]
    judgement, steps = admission.judge(sender.volume(1, run=1), 3.5)  # run 1's last messages may trail
    assert kinds(steps) == ["use1"]
    assert kinds(admission.tick(4.4)) == ["missing2", "use3"]  # the gap's wait ran out (from volume 3, at 3.0)
    steps = admission.tick(4.5)  # silent for the wait since volume 1: finished
    assert kinds(steps) == ["finish"] and steps[0].run.run == 1
    judgement, _ = admission.judge(sender.volume(2, run=1), 4.6)
    assert judgement.reason == Reason.RUN_CLOSED


def test_a_new_run_leaves_an_ended_run_to_fill_its_gaps(admission):
    """A restarted sender's messages may overtake the old connection's: run 2 starting does not cut
    run 1 short once run 1's run_end has said how many volumes to wait for."""
    sender = Sender()
    admission.judge(sender.run_start(run=1), 0.0)
    admission.judge(sender.volume(1, run=1), 1.0)  # volume 0 still in flight on the old connection
    admission.judge(sender.run_end(2, run=1), 1.1)
    judgement, steps = admission.judge(sender.run_start(run=2), 1.2)
    assert kinds(steps) == ["start"]
    judgement, steps = admission.judge(Sender("old").volume(0, run=1), 1.3)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["use0", "use1", "finish"]


def test_replaying_the_same_messages_and_times_rebuilds_the_same_verdicts():
    """The restart path: a journal replayed with its arrival times gives what the live service decided."""
    sender = Sender()
    messages = [(sender.run_start(), 0.0), (sender.volume(0), 1.0), (sender.volume(2), 3.0), (sender.volume(2), 3.1),
                (sender.volume(4), 5.0), (sender.volume(1), 6.5), (sender.run_end(5), 7.0)]

    def trace():
        admission, out = Admission(accept_run, read_volume, gap_wait_s=1.0), []
        for message, at_s in messages:
            out += kinds(admission.tick(at_s))
            judgement, steps = admission.judge(message, at_s)
            out += [str(judgement.verdict), str(judgement.reason)] + kinds(steps)
        return out

    first = trace()
    assert first == trace()
    assert "too_late" in first and "missing1" in first and first[-1] == "finish"
