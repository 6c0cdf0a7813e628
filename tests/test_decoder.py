"""The decode thread: submit never blocks, the queue stays bounded, every trial gets one result."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq

from mindeye.protocol import bound_endpoint, recv, result_publisher, result_subscriber
from mindeye.bank import ExactBank
from realtime.backends import DecodedBatch
from realtime.decoder import Arrival, DecodeWorker, TrialJob


class GatedBackend:
    """A backend whose first decode waits until the test opens the gate: decoding 'falls behind'."""

    name = "gated"

    def __init__(self):
        self.gate, self.entered, self.batches = threading.Event(), threading.Event(), []

    def subjects(self) -> list[str]:
        return ["subj01"]

    def n_voxels(self, subject: str) -> int:
        return 3

    def decode(self, subject: str, betas_bv: np.ndarray) -> DecodedBatch:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append(betas_bv[:, 0].astype(int).tolist())  # the trials, by their first beta
        n = len(betas_bv)
        return DecodedBatch(np.ones(n), [[(7, 0.5)]] * n, None, np.zeros((n, 4, 4, 3), np.uint8), 1.0, 2.0)


def job(trial: int, betas: bool = True) -> TrialJob:
    return TrialJob("s1", "subj01", 1, trial, 7, 10 + trial, np.full(3, float(trial)) if betas else None,
                    None if betas else "announced too late", Arrival(0.0, 0.1, 0.2), glm_ms=0.5)


@pytest.fixture
def sockets():
    context = zmq.Context()
    publisher = result_publisher(context, "tcp://127.0.0.1:*")
    subscriber = result_subscriber(context, bound_endpoint(publisher))
    time.sleep(0.3)  # a SUB gets only what is published after its subscription reached the PUB
    yield publisher, subscriber
    publisher.close()
    subscriber.close()
    context.term()


def test_a_slow_decoder_skips_the_oldest_trials_and_publishes_every_one(sockets):
    publisher, subscriber = sockets
    backend, published = GatedBackend(), []
    worker = DecodeWorker(backend, publisher, sinks=[lambda result, t, b: published.append((result, b))],
                          max_pending=3, max_batch=2)
    worker.start()
    worker.submit(job(0))
    assert backend.entered.wait(10)  # trial 0 is being decoded; the backend is stuck
    for trial in range(1, 10):
        worker.submit(job(trial))  # returns at once although nothing moves
    worker.submit(job(10, betas=False))  # an unestimable trial: published without decoding
    with worker._condition:
        decodable = [j.trial for j in worker._jobs if j.betas_v is not None]
    assert decodable == [7, 8, 9]  # bounded: only the newest max_pending wait to be decoded
    backend.gate.set()
    worker.stop()

    by_trial = {result.trial: (result, batch) for result, batch in published}
    assert sorted(by_trial) == list(range(11))
    skipped = sorted(t for t, (r, _) in by_trial.items() if "skipped" in r.flags)
    assert skipped == [1, 2, 3, 4, 5, 6, 10]
    assert backend.batches == [[0], [7, 8], [9]]  # batches of at most max_batch, oldest first
    decoded = by_trial[8][0]
    assert decoded.top_k[0].image_id == 7 and decoded.lowlevel_png is not None and decoded.embedding_norm == 1.0
    assert {"receive", "journal", "glm", "queue", "decode", "generate", "publish", "end_to_end"} <= set(
        decoded.timings_ms)
    assert worker.counters == {"decoded": 4, "skipped": 6, "unestimable": 1, "batches": 3, "published": 11}
    received = [recv(subscriber, 1000) for _ in range(11)]  # the same results went out on the PUB socket
    assert sorted(r.trial for r in received) == list(range(11))


class PictureBackend(GatedBackend):
    """Decodes at once; each trial's reconstruction is a flat image whose grey level is the trial number."""

    def decode(self, subject: str, betas_bv: np.ndarray) -> DecodedBatch:
        n = len(betas_bv)
        pictures = np.broadcast_to(betas_bv[:, :1, None, None].astype(np.uint8), (n, 6, 6, 3)).copy()
        return DecodedBatch(np.ones(n), [[(7, 0.5)]] * n, None, np.zeros((n, 4, 4, 3), np.uint8), 1.0, 2.0,
                            reconstruction_bhw3=pictures)


def test_each_trial_goes_out_with_its_own_reconstruction_as_png(sockets, tmp_path):
    import io

    from PIL import Image

    from realtime.decoder import ResultsLog

    publisher, subscriber = sockets
    log = ResultsLog(tmp_path / "results.jsonl")
    worker = DecodeWorker(PictureBackend(), publisher, sinks=[log], max_pending=8, max_batch=4)
    worker.start()
    for trial in (3, 5, 9):
        worker.submit(job(trial))
    worker.stop()
    log.close()
    received = {r.trial: r for r in (recv(subscriber, 1000) for _ in range(3))}
    for trial, result in received.items():
        picture = np.asarray(Image.open(io.BytesIO(bytes(result.image_png))))
        assert picture.shape == (6, 6, 3) and (picture == trial).all()
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in records] == [["image_png", "lowlevel_png"]] * 3


def test_a_result_says_whether_its_seen_image_was_a_candidate(sockets):
    publisher, _ = sockets
    backend, published = PictureBackend(), []
    backend.bank = ExactBank(np.array([7, 8]), np.ones((2, 1, 2)))  # the worker reads the bank's ids
    worker = DecodeWorker(backend, publisher, sinks=[lambda result, t, b: published.append(result)])
    worker.start()
    for trial, image_id in ((0, 7), (1, 9), (2, None)):
        worker.submit(TrialJob("s1", "subj01", 1, trial, image_id, 10 + trial, np.full(3, 1.0), None,
                               Arrival(0.0, 0.1, 0.2), glm_ms=0.5))
    worker.submit(job(3, betas=False))  # not decoded
    worker.stop()
    assert [r.image_is_candidate for r in sorted(published, key=lambda r: r.trial)] == [True, False, None, None]
