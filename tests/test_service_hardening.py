"""No single message may kill, stall or poison the realtime service (issue 9), over real sockets.

Each hostile message here crashed or hung the service before the limits existed: huge integers,
out-of-range `seq`, 70 frames, a volume index of 10^18, a run_end of 10^18 volumes, a frame over
the size limit, and the same poison already inside a journal. The service must answer each with a
reason, keep a bounded record of it, and then decode a clean run exactly as if nothing had happened.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import zmq

from mindeye.journal import JournalWriter, read_journal
from mindeye.nsd import NSDLayout, read_roi
from mindeye.protocol import (Envelope, InsecureEndpointError, RunStart, Volume, bound_endpoint, decode, encode,
                              recv_frames, result_publisher, result_subscriber, volume_receiver)
from mindeye.protocol.messages import MAX_FRAME_BYTES
from mindeye.protocol.transport import is_loopback
from simulators.replay.sender import replay
from simulators.replay.sources import NSDSource
from test_realtime_service import (SESSION, SUBJECT, RunningService, betas_of_run, expected_betas, n_trials, results,
                                   wait_for_results)


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.0.9:*", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("tcp://lo:5555", True), ("ipc:///tmp/x", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.2:5555", False),
    ("tcp://eth0:5555", False)])
def test_loopback_endpoints_are_told_from_network_ones(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_a_network_endpoint_is_not_bound_without_curve_unless_allowed():
    context = zmq.Context()
    try:
        for bind in (volume_receiver, result_publisher):
            with pytest.raises(InsecureEndpointError, match="CURVE is off.*allow_insecure=true"):
                bind(context, "tcp://0.0.0.0:*")
            bind(context, "tcp://0.0.0.0:*", allow_insecure=True).close()
    finally:
        context.term()


def test_a_message_of_many_frames_is_read_keeping_only_a_bounded_prefix():
    context = zmq.Context()
    router = volume_receiver(context, "tcp://127.0.0.1:*")
    dealer = context.socket(zmq.DEALER)
    dealer.connect(bound_endpoint(router))
    try:
        dealer.send_multipart([b"%d" % i for i in range(5000)])
        assert router.poll(5000)
        frames, n_frames = recv_frames(router, 4)
        assert n_frames == 5001 and len(frames) == 4  # peer id + 5000 frames seen, 4 kept
        assert [f.bytes for f in frames[1:]] == [b"0", b"1", b"2"]
        assert router.maxmsgsize == MAX_FRAME_BYTES
    finally:
        dealer.close(0)
        router.close(0)
        context.term()


class RawSender:
    """A DEALER that sends hand-made frames and waits for the one ack each must get."""

    def __init__(self, context: zmq.Context, endpoint: str):
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(endpoint)

    def send(self, frames: list[bytes], timeout_s: float = 10.0) -> dict | None:
        self.socket.send_multipart(frames)
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        return json.loads(self.socket.recv_multipart()[0])

    def close(self) -> None:
        self.socket.close(0)


def header(message) -> dict:
    return json.loads(encode(message)[0])


def raw(head: dict, *payload: bytes) -> list[bytes]:
    return [json.dumps(head).encode(), *payload]


def test_hostile_messages_get_a_reason_each_and_leave_a_clean_run_exact(tiny_world, checkpoint, tmp_path):
    root = tiny_world[0]
    roi = read_roi(NSDLayout(root).roi(SUBJECT))
    session = f"subj01-nsd{SESSION:02d}"

    def envelope(seq: int) -> Envelope:
        return Envelope("fuzz", seq, 0.0)

    start = header(RunStart(session, "subj01", 7, 1.0, 20, "float32", roi.shape, tuple(map(tuple, roi.affine)),
                            envelope(0)))
    volume = Volume.from_array(np.zeros(roi.shape, np.float32), session=session, subject="subj01", run=7, index=0,
                               acq_time_s=0.0, tr_s=1.0, affine=roi.affine, envelope=envelope(1))
    volume_head, volume_bytes = header(volume), bytes(volume.data)
    big = 10 ** 400
    hostile = {  # name -> (frames, expected rejection reason)
        "seq below zero": (raw({"protocol_version": "1.2", "type": "nonsense", "seq": -5}), "unknown_type"),
        "seq beyond 2^63": (raw({"protocol_version": "1.2", "seq": 2 ** 70}), "missing_field"),
        "huge tr_s": (raw({**start, "seq": 2, "tr_s": big}), "bad_value"),
        "huge affine entry": (raw({**start, "seq": 3, "affine": [[big, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                                 [0, 0, 0, 1]]}), "bad_affine"),
        "huge sent_unix_s": (raw({**start, "seq": 4, "sent_unix_s": -big}), "bad_value"),
        "70 frames": (raw({**volume_head, "seq": 5}, *[b"x"] * 69), "frame_count"),
        "index 10^18": (raw({**volume_head, "seq": 6, "index": 10 ** 18}, volume_bytes), "bad_value"),
        "index 10^6": (raw({**volume_head, "seq": 7, "index": 10 ** 6}, volume_bytes), "bad_value"),
        "run_end of 10^18": (raw({"protocol_version": "1.2", "type": "run_end", "sender_id": "fuzz", "seq": 8,
                                  "sent_unix_s": 0.0, "session": session, "run": 7, "n_volumes": 10 ** 18}),
                             "bad_value"),
        "fullwidth version digits": (raw({**start, "seq": 9, "protocol_version": "\uff11.\uff11"}),
                                     "unsupported_version"),
    }
    service = RunningService(root, checkpoint, tmp_path)
    context = zmq.Context()
    fuzzer, oversized = (RawSender(context, service.service.volumes_endpoint) for _ in range(2))
    try:
        acks = {name: fuzzer.send(frames) for name, (frames, _) in hostile.items()}
        assert oversized.send([json.dumps(volume_head).encode(), bytes(MAX_FRAME_BYTES + 1)], timeout_s=2) is None
        assert service.thread.is_alive()
        summary = replay(NSDSource(NSDLayout(root), SUBJECT, SESSION, [1]), service.service.volumes_endpoint)
        got = wait_for_results(tmp_path, n_trials(root, 1))
        status = service.service.status()
    finally:
        fuzzer.close()
        oversized.close()
        context.term()
        service.close()
    for name, (_, reason) in hostile.items():
        ack = acks[name]
        assert ack is not None, f"{name}: no ack"
        assert (ack["verdict"], ack["reason"]) == ("rejected", reason), f"{name}: {ack}"
    assert acks["seq below zero"]["acked_seq"] is None and acks["seq beyond 2^63"]["acked_seq"] is None
    assert acks["huge tr_s"]["acked_seq"] == 2
    assert "message has 70 frames" in acks["70 frames"]["detail"]  # the count sent, though only 4 were kept
    assert summary.acks == {"accepted": sum(summary.sent.values())}
    assert sorted(r["trial"] for r in got) == list(range(n_trials(root, 1)))
    assert not any("skipped" in r["flags"] for r in got)  # an unpaced replay: every trial decoded
    live, reference = betas_of_run(tmp_path, 1), expected_betas(root, 1)
    for trial, beta in reference.items():
        np.testing.assert_allclose(live[trial], beta, rtol=1e-5, atol=1e-5)
    assert status["open_runs"] == 0 and status["malformed"] == len(hostile)  # all refused by decoding
    records = list(read_journal(tmp_path / "journal.mej"))
    notes = [r for r in records if r.refusal is not None]
    assert len(notes) == len(hostile)
    assert max(sum(len(f) for f in r.frames) for r in notes) < 2048  # bounded notes, not the messages in full


def test_a_journal_holding_poison_is_skipped_on_restart_and_the_service_goes_on(tiny_world, checkpoint, tmp_path,
                                                                                 caplog):
    """A volume of index 10^18 journaled by an older, laxer service: today's limits refuse it on replay
    (before, the replay accepted it and hung); the service comes up and decodes a clean run."""
    root = tiny_world[0]
    roi = read_roi(NSDLayout(root).roi(SUBJECT))
    volume = Volume.from_array(np.zeros(roi.shape, np.float32), session="old", subject="subj01", run=1, index=0,
                               acq_time_s=0.0, tr_s=1.0, affine=roi.affine, envelope=Envelope("old", 0, 0.0))
    with JournalWriter(tmp_path / "journal.mej", fsync="never") as journal:
        journal.append(encode(volume), time.time())
        journal.append(raw({**header(volume), "seq": 1, "index": 10 ** 18}, bytes(volume.data)), time.time())
    caplog.set_level(logging.WARNING, logger="realtime.service")
    service = RunningService(root, checkpoint, tmp_path)
    try:
        summary = replay(NSDSource(NSDLayout(root), SUBJECT, SESSION, [1]), service.service.volumes_endpoint)
        got = wait_for_results(tmp_path, n_trials(root, 1))
    finally:
        service.close()
    assert "journal record 1 skipped: [bad_value]" in caplog.text
    assert summary.acks == {"accepted": sum(summary.sent.values())}
    assert sorted(r["trial"] for r in got) == list(range(n_trials(root, 1)))


def test_recovered_results_are_all_decoded_and_wait_for_a_viewer_to_come_back(tiny_world, checkpoint, tmp_path):
    """A restart whose journal holds a whole run not yet published (results.jsonl lost with the crash):
    every trial is decoded (none skipped by the burst) and held until a subscriber is back, so the
    viewer that reconnects a second after the restart sees every one; results.jsonl holds exactly the
    headers it received."""
    root = tiny_world[0]
    first = RunningService(root, checkpoint, tmp_path)
    try:
        replay(NSDSource(NSDLayout(root), SUBJECT, SESSION, [1]), first.service.volumes_endpoint)
        wait_for_results(tmp_path, n_trials(root, 1))
    finally:
        first.close()
    (tmp_path / "results.jsonl").unlink()

    second = RunningService(root, checkpoint, tmp_path, resume_hold_s=30.0)
    context = zmq.Context()
    try:
        time.sleep(1.0)  # the viewer reconnects a while after the restart
        assert results(tmp_path) == []  # held: nobody was listening yet
        subscriber = result_subscriber(context, second.service.results_endpoint)
        received = []
        deadline = time.monotonic() + 60
        while len(received) < n_trials(root, 1) and time.monotonic() < deadline:
            if subscriber.poll(200):
                frames = subscriber.recv_multipart()
                received.append((json.loads(frames[0]), decode(frames)))
        subscriber.close(0)
    finally:
        context.term()
        second.close()
    trials = sorted(message.trial for _, message in received)
    assert trials == list(range(n_trials(root, 1)))
    assert all(message.flags == ("recovered",) for _, message in received)  # decoded, not skipped
    logged = {(r["run"], r["trial"]): r for r in results(tmp_path)}
    for head, message in received:
        record = dict(logged[(message.run, message.trial)])
        assert record.pop("published_unix_s") > 0 and record.pop("batch_size") >= 1
        assert record == head


def test_samples_too_large_for_the_glm_are_refused_like_nans():
    """Finite but huge samples (1e300) made the GLM's solve fail and killed the ingest thread."""
    from mindeye.nsd import RoiMask
    from mindeye.protocol import Reason
    from realtime.admission import Refusal
    from realtime.pipeline import SubjectRois

    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, :] = True
    rois = SubjectRois({"subj01": RoiMask(mask, np.eye(4))})

    def volume(value: float) -> Volume:
        data = np.ones((3, 3, 3))
        data[1, 1, 2] = value
        return Volume.from_array(data, session="s", subject="subj01", run=1, index=4, acq_time_s=0.0, tr_s=1.0,
                                 affine=np.eye(4), envelope=Envelope("x", 0, 0.0))

    np.testing.assert_array_equal(rois.read_volume(volume(-1e9)), [1.0, 1.0, -1e9])
    for value in (1e300, -2e9, np.inf, np.nan):
        with pytest.raises(Refusal, match="volume 4: 1 of 3 ROI voxels are NaN, inf or beyond") as refused:
            rois.read_volume(volume(value))
        assert refused.value.reason == Reason.BAD_DATA
