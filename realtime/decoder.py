"""Decoding and publishing, on their own thread, so that ingest never waits for the model.

Ingest hands each trial over with `DecodeWorker.submit`, which never blocks. The worker takes the
pending trials of one subject as one batch (up to `max_batch`: a batch costs little more than one
trial), decodes them through the backend, encodes the images as PNG and publishes one `result` per
trial on the PUB socket, then shows it in the viewer and writes it to the results and latency logs.
If decoding falls behind, at most `max_pending` live trials wait: the oldest one beyond that is not
decoded but published at once with the `skipped` flag (every trial gets a result, and the viewer
says which ones were dropped). Trials recovered from the journal after a restart are all decoded:
they are a bounded burst, and nobody is waiting on their latency.

A restarted service holds its results (`hold_for_subscriber_s`) until a viewer's subscription
reaches the XPUB or that time has passed: what it recovers in its first second would otherwise go
out before any viewer has reconnected, and a PUB/SUB result sent to nobody is gone.
"""
from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zmq
from PIL import Image

from mindeye.protocol import Result, Retrieval, Stamper, new_subscriptions, send
from mindeye.protocol.messages import header_of

if TYPE_CHECKING:  # the backends import torch: a viewer that imports this module must not wait for it
    from realtime.backends import DecodeBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """When a volume came in (perf_counter seconds) and what receiving and journaling it took."""

    at_s: float
    receive_ms: float
    journal_ms: float


@dataclass
class TrialJob:
    """One trial to decode and publish."""

    session: str
    subject: str
    run: int
    trial: int
    image_id: int | None
    volume_index: int  # the volume that completed the trial's response window
    betas_v: np.ndarray | None  # (V,) percent signal change; None when unestimable
    note: str | None  # why it is unestimable, or another remark for the results log
    arrival: Arrival | None  # of volume_index; None when rebuilt from the journal after a restart
    glm_ms: float
    ready_s: float = field(default_factory=time.perf_counter)
    skipped: bool = False

    @property
    def key(self) -> tuple[str, int, int]:
        return self.session, self.run, self.trial


Sink = Callable[[Result, float, int], None]  # (result, published_unix_s, batch_size)


class DecodeWorker:
    """The decode thread: a bounded set of pending trials, batched decoding, one result per trial."""

    def __init__(self, backend: DecodeBackend, publisher: zmq.Socket, *, sinks: list[Sink], max_pending: int = 64,
                 max_batch: int = 8, late_after_ms: float | None = None, hold_for_subscriber_s: float = 0.0):
        if max_pending < 1 or max_batch < 1:
            raise ValueError(f"max_pending and max_batch must be >= 1, got {max_pending} and {max_batch}")
        self.backend, self.publisher, self.sinks = backend, publisher, sinks
        self.max_pending, self.max_batch, self.late_after_ms = max_pending, max_batch, late_after_ms
        self.stamper = Stamper()
        # The bank's image ids tell viewers whether a trial's seen image could be retrieved at all
        # (realtime.hits); a backend without a bank, or a test double, has none.
        bank = getattr(backend, "bank", None)
        self.candidates = None if bank is None else frozenset(int(i) for i in bank.image_ids)
        self.counters = {"decoded": 0, "skipped": 0, "unestimable": 0, "batches": 0, "published": 0}
        self._hold_until_s = time.monotonic() + hold_for_subscriber_s if hold_for_subscriber_s > 0 else None
        self._held: list[tuple[Result, int]] = []  # results waiting for a subscriber, in order
        self._jobs: deque[TrialJob] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: TrialJob) -> None:
        """Queue a trial; never blocks. Beyond `max_pending` live trials to decode, the oldest is skipped."""
        with self._condition:
            self._jobs.append(job)
            waiting = [j for j in self._jobs if j.betas_v is not None and not j.skipped and j.arrival is not None]
            for overflow in waiting[: max(0, len(waiting) - self.max_pending)]:
                overflow.skipped, overflow.betas_v = True, None
                overflow.note = "decoding fell behind: skipped to keep the queue bounded"
            self._condition.notify()

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._jobs)

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Finish what is queued (for at most `drain_timeout_s`), then end the thread."""
        deadline = time.monotonic() + drain_timeout_s
        with self._condition:
            while self._jobs and time.monotonic() < deadline:
                self._condition.wait(timeout=0.05)
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._jobs and not self._stopping:
                    self._condition.wait(timeout=None if self._hold_until_s is None else 0.05)
                    self._release_if_subscribed()
                if self._stopping:
                    self._release_held()  # into the logs at least: nobody came
                    return
                batch = self._take_batch()
            try:
                self._process(batch)
            except Exception:  # a failing trial must not end live decoding for the rest of the visit
                log.exception("decoding trials %s failed; publishing them as skipped", [job.key for job in batch])
                for job in batch:
                    job.skipped, job.betas_v, job.note = True, None, "decoding failed (see the service log)"
                    self._publish(job, None, 0, {}, len(batch))
            with self._condition:
                self._condition.notify_all()  # stop() waits for the queue to empty

    def _take_batch(self) -> list[TrialJob]:
        """The first job, and with a decodable one, the next decodable jobs of the same subject."""
        first = self._jobs.popleft()
        if first.betas_v is None:
            return [first]
        batch = [first]
        for job in list(self._jobs):
            if len(batch) == self.max_batch:
                break
            if job.betas_v is not None and job.subject == first.subject:
                self._jobs.remove(job)
                batch.append(job)
        return batch

    def _process(self, batch: list[TrialJob]) -> None:
        if batch[0].betas_v is None:  # skipped or unestimable: nothing to decode
            self._publish(batch[0], None, 0, {}, 1)
            return
        started_s = time.perf_counter()
        decoded = self.backend.decode(batch[0].subject, np.stack([job.betas_v for job in batch]))
        self.counters["batches"] += 1
        png_started_s = time.perf_counter()
        pngs = [tuple(None if images is None else encode_png(images[b])
                      for images in (decoded.reconstruction_bhw3, decoded.lowlevel_bhw3)) for b in range(len(batch))]
        png_ms_each = (time.perf_counter() - png_started_s) * 1000 / len(batch)
        for b, job in enumerate(batch):
            timings = {"queue": (started_s - job.ready_s) * 1000, "decode": decoded.decode_ms,
                       "generate": decoded.generate_ms + png_ms_each}
            outputs = (float(decoded.embedding_norm_b[b]), decoded.top_k[b], *pngs[b])
            self._publish(job, outputs, b, timings, len(batch))

    def _publish(self, job: TrialJob, outputs, row: int, timings_ms: dict[str, float], batch_size: int) -> None:
        """Send one trial's result; then the viewer and the logs (not counted in its latency)."""
        assembly_started_s = time.perf_counter()
        flags = []
        if job.note:
            log.warning("session %s run %d trial %d: %s", *job.key, job.note)
        if outputs is None:
            flags.append("skipped")
            self.counters["skipped" if job.skipped else "unestimable"] += 1
            embedding_norm, top_k, image_png, lowlevel_png = None, (), None, None
        else:
            self.counters["decoded"] += 1
            embedding_norm, top, image_png, lowlevel_png = outputs
            top_k = tuple(Retrieval(int(image_id), float(score)) for image_id, score in top)
        timings = {"glm": job.glm_ms, **timings_ms}
        if job.arrival is None:
            flags.append("recovered")
        else:
            timings.update(receive=job.arrival.receive_ms, journal=job.arrival.journal_ms)
            now_s = time.perf_counter()
            timings["publish"] = (now_s - assembly_started_s) * 1000
            timings["end_to_end"] = (now_s - job.arrival.at_s) * 1000
            if self.late_after_ms is not None and timings["end_to_end"] > self.late_after_ms:
                flags.append("late")
        is_candidate = (None if outputs is None or job.image_id is None or self.candidates is None
                        else job.image_id in self.candidates)
        result = Result(job.session, job.run, job.trial, job.image_id, job.volume_index, embedding_norm, top_k,
                        {stage: round(ms, 4) for stage, ms in timings.items()}, tuple(flags), self.stamper.envelope(),
                        image_png=image_png, lowlevel_png=lowlevel_png, image_is_candidate=is_candidate)
        self._held.append((result, batch_size))
        self._release_if_subscribed()

    def _release_if_subscribed(self) -> None:
        """Send the held results once a subscriber has joined or the hold is over."""
        if self._hold_until_s is not None:
            if not new_subscriptions(self.publisher) and time.monotonic() < self._hold_until_s:
                return
            if self._held:
                log.info("publishing %d results held for a subscriber", len(self._held))
        self._release_held()

    def _release_held(self) -> None:
        self._hold_until_s = None
        for result, batch_size in self._held:
            send(self.publisher, result)
            published_unix_s = time.time()
            self.counters["published"] += 1
            for sink in self.sinks:
                try:
                    sink(result, published_unix_s, batch_size)
                except Exception:
                    log.exception("a result sink failed on trial %s", (result.session, result.run, result.trial))
        self._held.clear()


def encode_png(image_hw3: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) image, lightly compressed: speed over size on a LAN."""
    buffer = io.BytesIO()
    Image.fromarray(image_hw3).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ResultsLog:
    """results.jsonl: one line per published result, flushed: its header exactly as sent (docs/protocol.md,
    `result`: envelope, fields, `frames` naming the images), plus `published_unix_s` and `batch_size`. A
    restarted service reads it to publish each trial once."""

    def __init__(self, path: Path):
        self.path = path
        self.published = self.read(path)
        self._file = open(path, "a")

    @staticmethod
    def read(path: Path) -> set[tuple[str, int, int]]:
        published = set()
        if not path.is_file():
            return published
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                published.add((record["session"], record["run"], record["trial"]))
            except (ValueError, KeyError):  # a line torn by a crash: that trial is published again
                log.warning("%s: skipping an unreadable line (%.60s)", path, line)
        return published

    def __call__(self, result: Result, published_unix_s: float, batch_size: int) -> None:
        header = header_of(result)  # what encode put in frame 0 when it was sent, not encoded again
        self._file.write(json.dumps({**header, "published_unix_s": published_unix_s, "batch_size": batch_size}) + "\n")
        self._file.flush()
        self.published.add((result.session, result.run, result.trial))

    def close(self) -> None:
        self._file.close()
