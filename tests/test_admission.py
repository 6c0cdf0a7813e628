"""The receiver rules (docs/protocol.md) as realtime/admission.py applies them: verdicts and steps."""
from __future__ import annotations

import numpy as np
import pytest

from mindeye.protocol import Ack, Envelope, Event, Events, Reason, RunEnd, RunStart, Verdict, Volume, encode, messages
from realtime import admission as admission_module
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

    def volume(self, index: int, run: int = 1, fill: float = 1.0, shape=(2, 2, 2), subject: str = "subj01",
               session: str = "s1") -> Volume:
        return Volume.from_array(np.full(shape, fill, dtype=np.float32), session=session, subject=subject, run=run,
                                 index=index, acq_time_s=index * TR, tr_s=TR, affine=AFFINE, envelope=self.envelope())

    def run_start(self, run: int = 1, n_volumes: int | None = 6, shape=(2, 2, 2), session: str = "s1",
                  subject: str = "subj01") -> RunStart:
        return RunStart(session, subject, run, TR, n_volumes, "float32", shape,
                        tuple(map(tuple, AFFINE)), self.envelope())

    def run_end(self, n_volumes: int, run: int = 1, session: str = "s1") -> RunEnd:
        return RunEnd(session, run, n_volumes, self.envelope())

    def events(self, *events: Event, run: int = 1, session: str = "s1") -> Events:
        return Events(session, run, tuple(events), False, self.envelope())


def accept_run(message):
    """The service's run check, reduced: every subject but "nobody" is known, every geometry is fine."""
    if message.subject == "nobody":
        raise Refusal(Reason.UNKNOWN_SUBJECT, "no model for subject nobody")


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
    judgement, _ = admission.judge(sender.volume(3), 6.0)
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
    judgement, _ = admission.judge(sender.volume(4, run=1), 4.6)
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


# ---- bounds: what a run_start promised, and the receiver's own state --------------------------------------


def test_a_volume_past_run_starts_n_volumes_is_refused_and_run_end_may_not_promise_more(admission):
    sender = Sender()
    admission.judge(sender.run_start(n_volumes=6), 0.0)
    judgement, steps = admission.judge(sender.volume(6), 1.0)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.BAD_VALUE) and steps == []
    assert "volume 6" in judgement.detail and "6 volumes" in judgement.detail
    judgement, _ = admission.judge(sender.run_end(7), 1.1)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.CONFLICT)
    assert "7" in judgement.detail and "6" in judgement.detail
    judgement, steps = admission.judge(sender.run_end(0), 1.2)  # a run stopped early may end with fewer
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["finish"]


def test_a_late_run_start_may_not_promise_fewer_volumes_than_came(admission):
    sender = Sender()
    admission.judge(sender.volume(0), 0.0)
    admission.judge(sender.volume(4), 1.0)
    judgement, _ = admission.judge(sender.run_start(n_volumes=3), 1.1)
    assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.CONFLICT)
    assert "n_volumes 3" in judgement.detail and "volume 4" in judgement.detail
    judgement, _ = admission.judge(sender.run_start(n_volumes=5), 1.2)
    assert judgement.verdict == Verdict.ACCEPTED


def test_the_widest_gap_a_run_can_have_is_declared_missing_in_bounded_steps(admission):
    """With indices below MAX_RUN_VOLUMES (decode's limit), no gap can make the receiver loop for long: the
    steps a gap releases are bounded by that limit (a count, not a timing, so the test cannot flake)."""
    sender = Sender()
    admission.judge(sender.volume(0), 0.0)
    last = messages.MAX_RUN_VOLUMES - 1
    judgement, steps = admission.judge(sender.volume(last), 1.0)
    steps += admission.tick(2.0)
    judgement_end, end_steps = admission.judge(sender.run_end(last + 1), 2.1)
    assert judgement.verdict == judgement_end.verdict == Verdict.ACCEPTED
    missing = [step.index for step in steps if isinstance(step, MissingVolume)]
    assert missing == list(range(1, last)) and len(missing) <= messages.MAX_RUN_VOLUMES
    assert kinds(steps)[-1] == f"use{last}" and kinds(end_steps) == ["finish"]
    assert admission.counters.volumes_missing == last - 1
    run = admission.runs[("s1", 1)]
    assert run.accepted == {0, last} and len(run.missing) == last - 1


def test_resends_after_a_run_closed_are_answered_as_before_it_closed(admission):
    """A sender in doubt resends; once the run is finished, what it resends is still recognised."""
    sender = Sender()
    admission.judge(sender.run_start(n_volumes=4), 0.0)
    admission.judge(sender.events(Event(0, 1.0, 3.0, 11, "image")), 0.0)
    admission.judge(sender.volume(0), 1.0)
    admission.judge(sender.volume(2), 3.0)
    admission.tick(4.0)  # volume 1 declared missing
    _, steps = admission.judge(sender.run_end(3), 5.0)
    assert kinds(steps) == ["finish"]
    answers = {name: admission.judge(message, 6.0)[0] for name, message in [
        ("volume 0", sender.volume(0)), ("volume 2", sender.volume(2)), ("run_end", sender.run_end(3)),
        ("run_start", sender.run_start(n_volumes=4)), ("events", sender.events(Event(0, 1.0, 3.0, 11, "image"))),
        ("missing volume 1", sender.volume(1)),
        ("volume 3", sender.volume(3)), ("another run_end", sender.run_end(2)),
        ("another run_start", sender.run_start(n_volumes=5)), ("new trial", sender.events(Event(1, 9.0, 3.0, 12, "x"))),
        ("changed trial", sender.events(Event(0, 1.0, 3.0, 99, "image"))),
        ("volume of another geometry", sender.volume(0, shape=(2, 2, 3)))]}
    verdicts = {name: (j.verdict, j.reason) for name, j in answers.items()}
    assert verdicts == {
        "volume 0": (Verdict.DUPLICATE, None), "volume 2": (Verdict.DUPLICATE, None),
        "run_end": (Verdict.DUPLICATE, None), "run_start": (Verdict.DUPLICATE, None),
        "events": (Verdict.DUPLICATE, None),
        "missing volume 1": (Verdict.REJECTED, Reason.TOO_LATE),
        **{name: (Verdict.REJECTED, Reason.RUN_CLOSED) for name in (
            "volume 3", "another run_end", "another run_start", "new trial", "changed trial",
            "volume of another geometry")}}
    assert all("finished" in answers[name].detail for name in answers)


def test_a_detail_quoting_long_fields_still_fits_an_ack(admission):
    sender, label = Sender(), "x" * 4096
    admission.judge(sender.events(Event(0, 1.0, 3.0, 1, label)), 0.0)
    judgement, _ = admission.judge(sender.events(Event(0, 1.0, 3.0, 2, label)), 0.1)
    assert judgement.reason == Reason.CONFLICT and len(judgement.detail) <= 4096
    encode(Ack(0, judgement.verdict, judgement.reason, judgement.detail, Envelope("service", 0, 0.0)))


def _limited(**limits) -> Admission:
    return Admission(accept_run, read_volume, gap_wait_s=1.0, limits=admission_module.AdmissionLimits(**limits))


def test_default_limits():
    limits = admission_module.AdmissionLimits()
    assert (limits.max_open_runs, limits.max_silence_s, limits.max_closed_runs, limits.max_waiting_runs,
            limits.max_senders) == (4, 300.0, 256, 8, 1024)
    assert Admission(accept_run, read_volume).limits == limits


def test_a_run_past_the_open_run_limit_is_refused_until_one_closes():
    admission, sender = _limited(max_open_runs=2), Sender()
    admission.judge(sender.run_start(session="a"), 0.0)
    admission.judge(sender.volume(0, session="b"), 0.1)  # a run may begin with its volume
    for message in (sender.run_start(session="c"), sender.volume(0, session="c")):
        judgement, steps = admission.judge(message, 0.2)
        assert (judgement.verdict, judgement.reason) == (Verdict.REJECTED, Reason.LIMIT) and steps == []
        assert "a run 1, b run 1" in judgement.detail and "run_end" in judgement.detail
    assert ("c", 1) not in admission.runs and admission.counters.rejected_by_reason["limit"] == 2
    _, steps = admission.judge(sender.run_end(1, session="b"), 0.3)
    assert kinds(steps) == ["finish"]
    judgement, steps = admission.judge(sender.run_start(session="c"), 0.4)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["start"]


def test_a_later_run_refused_for_the_limit_still_lets_the_sessions_silent_run_close():
    """The scanner moved on: the refused start of run 2 finishes run 1 once it is silent, so a resend succeeds."""
    admission, sender = _limited(max_open_runs=2), Sender()
    admission.judge(sender.run_start(session="a"), 0.0)
    admission.judge(sender.run_start(session="b"), 0.0)
    admission.judge(sender.volume(0, session="a"), 0.5)
    judgement, _ = admission.judge(sender.run_start(run=2, session="a"), 1.0)
    assert judgement.reason == Reason.LIMIT
    judgement, _ = admission.judge(sender.run_start(run=2, session="a"), 1.5)  # a resend: not later than before
    assert judgement.reason == Reason.LIMIT and admission.next_deadline_s() == pytest.approx(2.0)
    steps = admission.tick(2.0)
    assert kinds(steps) == ["finish"] and steps[0].run.key == ("a", 1)
    judgement, steps = admission.judge(sender.run_start(run=2, session="a"), 2.1)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["start"]


def test_at_the_open_run_limit_a_run_silent_long_enough_is_finished_to_make_room():
    """Runs abandoned without run_end in other sessions must not refuse every later run for ever."""
    admission, sender = _limited(max_open_runs=2, max_silence_s=60.0), Sender()
    admission.judge(sender.run_start(session="a"), 0.0)
    admission.judge(sender.run_start(session="b"), 0.0)
    admission.judge(sender.volume(0, session="b"), 30.0)
    judgement, _ = admission.judge(sender.run_start(session="c"), 59.0)  # "a" silent 59 s: not yet
    assert judgement.reason == Reason.LIMIT and "60 s of silence" in judgement.detail
    judgement, steps = admission.judge(sender.run_start(session="c"), 60.0)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["finish", "start"]
    assert steps[0].run.key == ("a", 1) and not admission.runs[("b", 1)].closed


def test_a_run_whose_last_volumes_never_come_after_a_gap_still_finishes(admission):
    """run_end while a volume is held past a gap: the gap closes, then the missing last volume is waited for
    once more and the run finishes (it used to stay open for ever, its last trials never published)."""
    sender = Sender()
    admission.judge(sender.run_start(n_volumes=None), 0.0)
    admission.judge(sender.volume(0), 0.0)
    admission.judge(sender.volume(2), 0.5)
    admission.judge(sender.run_end(4), 0.6)
    assert kinds(admission.tick(1.5)) == ["missing1", "use2"]
    assert admission.next_deadline_s() == pytest.approx(2.5)
    assert kinds(admission.tick(2.5)) == ["missing3", "finish"]
    assert admission.runs[("s1", 1)].closed


def test_the_oldest_closed_runs_are_forgotten():
    admission, sender = _limited(max_closed_runs=2), Sender()
    for run in (1, 2, 3):
        admission.judge(sender.run_start(run=run), run)
        admission.judge(sender.run_end(0, run=run), run + 0.5)
    assert set(admission.runs) == {("s1", 2), ("s1", 3)} and admission.counters.runs_forgotten == 1
    judgement, _ = admission.judge(sender.run_end(0, run=2), 4.0)
    assert judgement.verdict == Verdict.DUPLICATE


def test_early_trials_of_too_many_waiting_runs_drop_the_oldest():
    admission, sender = _limited(max_waiting_runs=2), Sender()
    for run in (1, 2):
        judgement, _ = admission.judge(sender.events(Event(0, 1.0, 3.0, run, "image"), run=run), 0.0)
        assert (judgement.verdict, judgement.reason) == (Verdict.ACCEPTED, None)
    judgement, _ = admission.judge(sender.events(Event(0, 1.0, 3.0, 3, "image"), run=3), 0.0)
    assert (judgement.verdict, judgement.reason) == (Verdict.ACCEPTED, Reason.LIMIT)
    assert "run 1 of session s1" in judgement.detail
    judgement, _ = admission.judge(sender.events(Event(1, 5.0, 3.0, 3, "image"), run=3), 0.0)  # not a new run
    assert (judgement.verdict, judgement.reason) == (Verdict.ACCEPTED, None)
    assert admission.counters.waiting_dropped == 1
    _, steps = admission.judge(sender.run_start(run=1), 1.0)
    assert kinds(steps) == ["start"]  # its trials were dropped: the sender must send them again
    _, steps = admission.judge(sender.run_start(run=3), 1.0)
    assert kinds(steps) == ["start", "events"] and [e.trial for e in steps[1].events] == [0, 1]


def test_a_refused_run_start_drops_its_waiting_trials(admission):
    sender = Sender()
    admission.judge(sender.events(Event(0, 1.0, 3.0, 5, "image")), 0.0)
    judgement, _ = admission.judge(sender.volume(0, subject="nobody"), 1.0)
    assert judgement.reason == Reason.UNKNOWN_SUBJECT and "1 waiting trial" in judgement.detail
    judgement, _ = admission.judge(sender.run_start(subject="nobody"), 1.1)
    assert judgement.reason == Reason.UNKNOWN_SUBJECT
    judgement, steps = admission.judge(sender.run_start(), 1.2)
    assert judgement.verdict == Verdict.ACCEPTED and kinds(steps) == ["start"]
    assert admission.counters.waiting_dropped == 1


def test_the_least_recently_seen_senders_are_forgotten():
    admission = _limited(max_senders=2)
    a, b, c = Sender("a"), Sender("b"), Sender("c")
    admission.judge(a.run_start(), 0.0)
    admission.judge(b.run_start(), 0.0)
    admission.judge(a.run_start(), 0.0)  # a seen again: b is now the least recent
    admission.judge(c.run_start(), 0.0)  # b forgotten
    b.seq = c.seq = 0
    assert admission.judge(b.run_start(), 0.1)[0].reason != Reason.SEQ_REGRESSED  # a new sender to the receiver
    assert admission.judge(c.run_start(), 0.1)[0].reason == Reason.SEQ_REGRESSED
    assert admission.counters.senders_forgotten == 2  # b, then a (the least recent when b came back)
