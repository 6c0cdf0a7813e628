"""The realtime service: volumes in over ZeroMQ, one decoded result per trial out, nothing lost.

One ingest loop (the calling thread) owns the volume ROUTER, the journal, the admission rules and
the GLMs; a decode thread owns the model and the result PUB (realtime/decoder.py). Per message:

    arrival -> decode (protocol checks) -> journal append -> verdict (realtime/admission.py) -> ack
            -> steps in order: start a run, add trials, use a volume (ROI -> incremental GLM), finish
            -> each trial whose beta became ready goes to the decode thread (never waited for)

Every message received is journaled before it is judged or processed (the journal is what came
over the wire); a malformed one as a bounded note of its reason and header prefix, never in full.
A service started on an out_dir that holds a journal first replays it through the very same
decoding limits, admission rules and GLMs, with the recorded arrival times, so it rebuilds the
exact state it had: volumes accepted before the crash are duplicates when the restarted sender
resends them, each trial counts once, and a record today's rules refuse is skipped with its reason,
never re-executed. Trials already in results.jsonl are not published again; trials whose beta was
ready but never published are (flag `recovered`), once a viewer has resubscribed or
`resume_hold_s` has passed.

Each volume accepted live is also a row of volumes.csv: when it came and, from a scanner side that
sends them (mindeye-bridge, protocol 1.3), its head motion and the bridge's stage times; the viewer
plots its framewise displacement, and the latency report summarises both.

out_dir holds: journal.mej (the session journal), results.jsonl (every published result),
latency.csv (+ latency.json / latency.png at shutdown), volumes.csv, betas/<session>_run-NN.npz (each
finished run's betas), service.log.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path

import zmq

from mindeye.errors import index_spans
from mindeye.journal import JournalWriter, read_journal
from mindeye.protocol import (Ack, Message, ProtocolError, Reason, Stamper, Verdict, Volume, bound_endpoint, decode,
                              recv_frames, result_publisher, send, volume_receiver)
from mindeye.protocol.messages import MAX_FRAMES
from mindeye.protocol.transport import CurveServer
from realtime.admission import AddEvents, Admission, FinishRun, MissingVolume, RunKey, StartRun, Step, UseVolume
from realtime.backends import DecodeBackend
from realtime.decoder import Arrival, DecodeWorker, ResultsLog, TrialJob
from realtime.glm import OnlineGLMSettings
from realtime.latency import LATENCY_CSV, VOLUMES_CSV, LatencyLog, VolumeLog, write_report
from realtime.pipeline import RunPipeline, SubjectRois, TrialOutcome

log = logging.getLogger(__name__)

JOURNAL_FILE, RESULTS_FILE = "journal.mej", "results.jsonl"


@dataclass(frozen=True)
class ServiceSettings:
    out_dir: Path
    volumes_endpoint: str = "tcp://127.0.0.1:5555"
    results_endpoint: str = "tcp://127.0.0.1:5556"
    journal_fsync: str | int = "always"
    gap_wait_s: float | None = None  # None: one TR
    glm: Mapping[str, float] = field(default_factory=dict)  # OnlineGLMSettings' fields but tr and grace_volumes
    max_pending: int = 64  # live trials waiting to decode before the oldest is skipped: latency vs completeness
    max_batch: int = 8
    late_after_ms: float | None = 2000.0
    status_every_s: float = 0.5
    resume_hold_s: float = 10.0  # after a restart, results wait this long at most for a viewer to resubscribe
    allow_insecure: bool = False  # bind a non-loopback endpoint without CURVE


@dataclass
class _LiveRun:
    pipeline: RunPipeline
    arrivals: dict[int, Arrival | None] = field(default_factory=dict)  # volume index -> its arrival


class RealtimeService:
    """Build it, then `run(stop_event)` until the event is set; `ready` is set once it listens, and
    `volumes_endpoint` / `results_endpoint` then say where (with the port chosen for `:*`)."""

    def __init__(self, settings: ServiceSettings, backend: DecodeBackend, rois: SubjectRois, *,
                 viewer=None, context: zmq.Context | None = None, curve: CurveServer | None = None):
        for subject in rois.rois:
            if subject in backend.subjects() and backend.n_voxels(subject) != rois.n_voxels(subject):
                raise ValueError(f"{subject}: the ROI has {rois.n_voxels(subject)} voxels, the model's aligner "
                                 f"{backend.n_voxels(subject)}: not the same subject space")
        missing = sorted(set(rois.rois) - set(backend.subjects()))
        if missing:
            raise ValueError(f"no model for subjects {missing} (the backend has {backend.subjects()})")
        self.settings, self.backend, self.rois, self.viewer = settings, backend, rois, viewer
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.admission = Admission(rois.check_run, rois.read_volume, settings.gap_wait_s)
        self.runs: dict[RunKey, _LiveRun] = {}
        self.counters = {"messages": 0, "malformed": 0, "recovered_records": 0, "internal_errors": 0}
        self.ready = threading.Event()
        self._stamper = Stamper()

    # -- lifecycle -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        out_dir = Path(self.settings.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        journal_path = out_dir / JOURNAL_FILE
        journal = JournalWriter(journal_path, fsync=self.settings.journal_fsync)  # cuts a torn tail, locks
        results_log = ResultsLog(out_dir / RESULTS_FILE)
        latency_log = LatencyLog(out_dir / LATENCY_CSV)
        self._volume_log = VolumeLog(out_dir / VOLUMES_CSV)
        insecure = self.settings.allow_insecure
        receiver = volume_receiver(self.context, self.settings.volumes_endpoint, curve=self.curve,
                                   allow_insecure=insecure)
        publisher = result_publisher(self.context, self.settings.results_endpoint, curve=self.curve,
                                     allow_insecure=insecure)
        self.volumes_endpoint, self.results_endpoint = bound_endpoint(receiver), bound_endpoint(publisher)
        sinks = [results_log, lambda r, t, b: latency_log.add(r, published_unix_s=t, batch_size=b)]
        if self.viewer is not None:
            sinks.append(lambda r, t, b: self.viewer.show(r))
        self.worker = DecodeWorker(self.backend, publisher, sinks=sinks, max_pending=self.settings.max_pending,
                                   max_batch=self.settings.max_batch, late_after_ms=self.settings.late_after_ms,
                                   hold_for_subscriber_s=self.settings.resume_hold_s if journal.next_index else 0.0)
        self._published = results_log.published
        try:
            self.worker.start()
            if journal.next_index:
                self._recover(journal_path)
            self.ready.set()
            log.info("listening for volumes on %s, publishing results on %s", self.volumes_endpoint,
                     self.results_endpoint)
            self._ingest(receiver, journal, stop)
        finally:
            self.worker.stop()
            receiver.close()
            publisher.close()
            journal.close()
            results_log.close()
            latency_log.close()
            self._volume_log.close()
            log.info("latency report:\n%s", write_report(out_dir / LATENCY_CSV).format())

    def _recover(self, journal_path: Path) -> None:
        """Rebuild the state from the journal: the same rules, fed the recorded arrival times."""
        log.info("resuming from %s", journal_path)
        for record in read_journal(journal_path):
            self.counters["recovered_records"] += 1
            with self._contained(f"journal record {record.index}"):
                self._process(self.admission.tick(record.received_unix_s), recovering=True)
                if record.refusal is not None:
                    continue  # a malformed message's note: refused then, nothing to redo
                try:
                    message = record.message()
                except ProtocolError as error:  # accepted by an older, laxer service: today's limits refuse it
                    log.warning("journal record %d skipped: %s", record.index, error)
                    continue
                _, steps = self.admission.judge(message, record.received_unix_s, None)
                self._process(steps, recovering=True)
        log.info("recovered %d journal records: %d runs, %d trials already published",
                 self.counters["recovered_records"], len(self.admission.runs), len(self._published))

    # -- ingest ---------------------------------------------------------------------------------------

    def _ingest(self, receiver: zmq.Socket, journal: JournalWriter, stop: threading.Event) -> None:
        next_status_s = 0.0
        while not stop.is_set():
            now_s = time.time()
            deadline_s = self.admission.next_deadline_s()
            timeout_ms = 50 if deadline_s is None else max(0, min(50, int((deadline_s - now_s) * 1000) + 1))
            with self._contained("a message"):
                self._process(self.admission.tick(now_s))
                if receiver.poll(timeout_ms, zmq.POLLIN):
                    self._receive(receiver, journal)
            if self.viewer is not None and time.monotonic() >= next_status_s:
                self.viewer.set_status(self.status())
                next_status_s = time.monotonic() + self.settings.status_every_s

    def _receive(self, receiver: zmq.Socket, journal: JournalWriter) -> None:
        # peer id + one frame over the protocol's limit: enough for decode to refuse the rest unread
        frames, n_frames = recv_frames(receiver, 1 + MAX_FRAMES + 1)
        arrived_s, arrived_unix_s = time.perf_counter(), time.time()
        peer, body = frames[0].bytes, frames[1:]
        self.counters["messages"] += 1
        message: Message | None = None
        try:
            message = decode(body)
        except ProtocolError as error:
            refusal = error
            if n_frames - 1 > len(body):  # the frames past the limit were dropped unread: say how many came
                refusal = ProtocolError(Reason.FRAME_COUNT, f"message has {n_frames - 1} frames, the limit is "
                                                            f"{MAX_FRAMES}", seq=error.seq)
        decoded_s = time.perf_counter()
        if message is None:
            journal.append_refused(body, arrived_unix_s, refusal.code, str(refusal), n_frames=n_frames - 1)
            self.counters["malformed"] += 1
            if self.counters["malformed"] <= 100 or self.counters["malformed"] % 1000 == 0:  # a flood: a sample
                log.warning("refused a malformed message (%d so far): %.300s", self.counters["malformed"], refusal)
            send(receiver, Ack.rejecting(refusal, self._stamper.envelope()), peer=peer)
            return
        journal.append(body, arrived_unix_s)
        journaled_s = time.perf_counter()
        arrival = Arrival(arrived_s, (decoded_s - arrived_s) * 1000, (journaled_s - decoded_s) * 1000)
        judgement, steps = self.admission.judge(message, arrived_unix_s, arrival)
        if judgement.reason is not None:
            log.log(logging.WARNING if judgement.verdict == "rejected" else logging.INFO, "%s %s (seq %d): %s %s",
                    message.TYPE, getattr(message, "index", ""), message.envelope.seq, judgement.verdict,
                    judgement.detail)
        send(receiver, Ack(message.envelope.seq, judgement.verdict, judgement.reason, judgement.detail,
                           self._stamper.envelope()), peer=peer)
        if isinstance(message, Volume) and judgement.verdict == Verdict.ACCEPTED:
            self._volume_log.add(message, received_unix_s=arrived_unix_s)
            if self.viewer is not None and message.motion is not None:
                self.viewer.show_motion(message)
        self._process(steps)

    @contextlib.contextmanager
    def _contained(self, what: str):
        """A bug met while handling one message is logged and counted, and the service goes on with the
        next: one message must not end a visit (nor, replayed from the journal, every restart after it)."""
        try:
            yield
        except Exception:
            self.counters["internal_errors"] += 1
            log.exception("internal error while handling %s; going on with the next", what)

    # -- processing -----------------------------------------------------------------------------------

    def _process(self, steps: list[Step], recovering: bool = False) -> None:
        missing: dict[tuple[str, int], list[int]] = {}  # one log line per gap, not per volume
        for step in steps:
            if isinstance(step, StartRun):
                run = step.run
                settings = OnlineGLMSettings(run.tr_s, **self.settings.glm, grace_volumes=1)
                # grace 1: admission releases volumes in order, so a skipped index is already missing
                self.runs[run.key] = _LiveRun(RunPipeline(run, self.rois.n_voxels(run.subject), settings))
                log.info("run %d of session %s (%s) started", run.run, run.session, run.subject)
            elif isinstance(step, AddEvents):
                live = self.runs[step.run.key]
                self._hand_over(live, live.pipeline.add_events(step.events), glm_ms=0.0, recovering=recovering)
            elif isinstance(step, UseVolume):
                live = self.runs[step.run.key]
                live.arrivals[step.index] = step.info
                started_s = time.perf_counter()
                outcomes = live.pipeline.use_volume(step.index, step.payload)
                self._hand_over(live, outcomes, (time.perf_counter() - started_s) * 1000, recovering)
            elif isinstance(step, MissingVolume):
                missing.setdefault(step.run.key, []).append(step.index)
            elif isinstance(step, FinishRun):
                live = self.runs.pop(step.run.key)
                started_s = time.perf_counter()
                outcomes = live.pipeline.finish()
                self._hand_over(live, outcomes, (time.perf_counter() - started_s) * 1000, recovering)
                path = live.pipeline.save(Path(self.settings.out_dir) / "betas" /
                                          f"{step.run.session}_run-{step.run.run:02d}.npz")
                log.info("run %d of session %s finished; betas in %s", step.run.run, step.run.session, path)
        for (session, run), indices in missing.items():
            one = len(indices) == 1
            log.warning("run %d of session %s: %s %s never came; the GLM goes on without %s", run, session,
                        "volume" if one else "volumes", index_spans(indices), "it" if one else "them")

    def _hand_over(self, live: _LiveRun, outcomes: list[TrialOutcome], glm_ms: float, recovering: bool) -> None:
        for outcome in outcomes:
            run, event = outcome.run, outcome.event
            if (run.session, run.run, event.trial) in self._published:
                continue  # published before a restart
            ready_volume = outcome.beta.ready_volume if outcome.beta is not None else run.next_index - 1
            arrival = None if recovering else live.arrivals.get(ready_volume)
            if arrival is None and not recovering:  # ready at the end of a run, not at a volume
                arrival = Arrival(time.perf_counter(), 0.0, 0.0)
            self.worker.submit(TrialJob(run.session, run.subject, run.run, event.trial, event.image_id,
                                        max(ready_volume, 0), outcome.betas_v, outcome.problem, arrival, glm_ms))

    def status(self) -> dict:
        counters = self.admission.counters
        return {"messages": self.counters["messages"], "accepted": counters.accepted,
                "duplicate": counters.duplicate, "rejected": counters.rejected,
                "rejected_by_reason": ", ".join(f"{reason} {n}" for reason, n in sorted(
                    counters.rejected_by_reason.items())) or "none", "volumes_missing": counters.volumes_missing,
                "out_of_order": counters.out_of_order, "messages_lost": counters.messages_lost,
                "malformed": self.counters["malformed"], "internal_errors": self.counters["internal_errors"],
                "open_runs": len(self.runs),
                "decode_pending": self.worker.pending, **{f"trials_{k}": v for k, v in self.worker.counters.items()}}
