"""mindeye-bridge: the export folder watched, files grouped and ordered into volumes, series into runs,
every fault of issue 13 (half-written, corrupt, missing, duplicate and late files, a series restart, the
bridge killed mid-run), and the messages that reach a receiver judging them with the service's own
rules (realtime.admission). Volumes here are already in the model grid (motion correction off), so
these tests need neither SimpleITK nor a model; tests/test_bridge_end_to_end.py runs the whole chain."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zmq

from mindeye.errors import MissingFileError
from mindeye.protocol import Ack, Events, RunEnd, RunStart, Stamper, Volume, bound_endpoint, recv_with_peer, send
from mindeye.protocol import volume_receiver
from realtime.admission import Admission
from realtime.bridge import scanner_files
from mindeye.protocol import read_bids_events
from realtime.bridge.bridge import Bridge, BridgeSettings, ModelSpace
from realtime.bridge.watcher import ExportWatcher

SHAPE = (10, 12, 8)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0]) + np.array([[0, 0, 0, -10.0], [0, 0, 0, -12.0], [0, 0, 0, -8.0], [0, 0, 0, 0]])
TR_S = 1.5


def write_volume(folder: Path, series: int, index: int, name: str | None = None) -> Path:
    """Volume `index` of `series` as the scanner's NIfTI export names it (series number, 1-based volume)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"series-{series:03d}_vol-{index + 1:06d}.nii")
    volume_xyz = np.full(SHAPE, 1000.0 + index, dtype=np.float32)
    image = nib.Nifti1Image(volume_xyz[..., None], AFFINE)
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = TR_S
    nib.save(image, path)
    return path


class Receiver:
    """A service's volume socket without the model: the service's admission rules judge every message,
    and the ack says so. Records what was accepted, in order."""

    def __init__(self, context: zmq.Context):
        self.socket = volume_receiver(context, "tcp://127.0.0.1:*")
        self.endpoint = bound_endpoint(self.socket)
        self.admission = Admission(lambda message: None, lambda volume: volume.array(), gap_wait_s=TR_S)
        self.stamper = Stamper()
        self.accepted: list[tuple[str, int, int | None]] = []  # (type, run, index)
        self.verdicts: list[tuple[str, int | None, str]] = []  # (type, index, verdict)
        self.volumes: dict[tuple[int, int], Volume] = {}
        self.trials: dict[int, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.admission.tick(time.time())
            received = recv_with_peer(self.socket, timeout_ms=20)
            if received is None:
                continue
            peer, message = received
            judgement, _ = self.admission.judge(message, time.time(), None)
            index = getattr(message, "index", None) if isinstance(message, Volume) else None
            self.verdicts.append((message.TYPE, index, str(judgement.verdict)))
            if judgement.verdict == "accepted":
                self.accepted.append((message.TYPE, message.run, index))
                if isinstance(message, Volume):
                    self.volumes[message.run, index] = message
                if isinstance(message, Events):
                    self.trials.setdefault(message.run, []).extend(e.trial for e in message.events)
            send(self.socket, Ack(message.envelope.seq, judgement.verdict, judgement.reason, judgement.detail,
                                  self.stamper.envelope()), peer=peer)

    def volume_indices(self, run: int) -> list[int]:
        return [index for type_, r, index in self.accepted if type_ == Volume.TYPE and r == run]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close(linger=0)


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def receiver(context):
    receiver = Receiver(context)
    yield receiver
    receiver.close()


def make_bridge(export: Path, out_dir: Path, endpoint: str, context: zmq.Context, **settings) -> Bridge:
    export.mkdir(parents=True, exist_ok=True)
    watcher = ExportWatcher(export, probe=scanner_files.probe, incomplete=scanner_files.IncompleteFile,
                            corrupt=scanner_files.CorruptFile, settle_s=0.01)
    options = dict(gap_wait_s=0.5, run_idle_s=60.0, resend_after_s=60.0) | settings
    bridge_settings = BridgeSettings(out_dir=out_dir, session="subj01-bridge", subject="subj01", endpoint=endpoint,
                                     **options)
    return Bridge(bridge_settings, watcher, scanner_files.read_volume, ModelSpace(SHAPE, AFFINE, out_dir),
                  context=context)


class Running:
    """A bridge's loop on a thread, stepped until told to stop."""

    def __init__(self, bridge: Bridge):
        self.bridge, self.stop = bridge, threading.Event()
        self.thread = threading.Thread(target=bridge.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


# ---- the watcher --------------------------------------------------------------------------------------

def test_watcher_waits_for_a_half_written_file_and_skips_corrupt_and_duplicate_ones(tmp_path, caplog):
    export = tmp_path / "export"
    complete = write_volume(tmp_path / "source", 5, 0)
    export.mkdir()
    watcher = ExportWatcher(export, probe=scanner_files.probe,
                            incomplete=scanner_files.IncompleteFile, corrupt=scanner_files.CorruptFile, settle_s=0.01)
    watcher.start()
    try:
        half = export / complete.name
        half.write_bytes(complete.read_bytes()[:2000])  # the exporter is still writing it
        got = [v for _ in range(20) for v in watcher.poll(0.02)]
        assert got == [] and watcher.counters["files"] == 0
        half.write_bytes(complete.read_bytes())  # done
        got = [v for _ in range(50) if not watcher.counters["files"] for v in watcher.poll(0.02)]
        assert [(v.series_number, v.index, v.paths) for v in got] == [(5, 0, (half,))]
        assert got[0].seen_unix_s <= time.time()
        with caplog.at_level(logging.WARNING):
            (export / "series-005_vol-000002.nii").write_bytes(b"\x00garbage" * 100)
            write_volume(export, 5, 0, name="series-005_vol-000001.nii.gz")  # volume 0 again, gzipped
            got = [v for _ in range(50) for v in watcher.poll(0.02)]
        assert got == []
        assert watcher.counters["corrupt"] == 1 and watcher.counters["duplicates"] == 1
        assert "skipped a corrupt file" in caplog.text and "series-005_vol-000002.nii" in caplog.text
        assert "duplicate file" in caplog.text and "volume 0 of series 5" in caplog.text
    finally:
        watcher.stop()


def test_a_missing_export_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match="scanner export folder.*point export_dir at"):
        ExportWatcher(tmp_path / "nowhere", probe=scanner_files.probe, incomplete=scanner_files.IncompleteFile,
                      corrupt=scanner_files.CorruptFile)


# ---- the bridge ---------------------------------------------------------------------------------------

def test_volumes_go_out_in_index_order_gaps_declared_missing_late_files_still_sent(tmp_path, context, receiver,
                                                                                caplog):
    export = tmp_path / "export"
    series = export / "run1"
    (series / "events.tsv").parent.mkdir(parents=True)
    (series / "events.tsv").write_text("onset\tduration\timage_id\ttrial_type\n3.0\t3.0\t46002\timage\n"
                                       "7.5\t3.0\tn/a\tblank\n")
    bridge = make_bridge(export, tmp_path / "bridge", receiver.endpoint, context, events_file="events.tsv")
    running = Running(bridge)
    try:
        with caplog.at_level(logging.WARNING):
            for index in (2, 0, 1, 3):  # written out of order: sent by index, not file time
                write_volume(series, 7, index)
            wait_for(lambda: len(receiver.volume_indices(1)) == 4)
            write_volume(series, 7, 5)  # 4 never comes
            wait_for(lambda: len(receiver.volume_indices(1)) == 5)
            write_volume(series, 7, 4)  # ... until after the gap was given up: late
            wait_for(lambda: bridge.counters["late"] == 1)
        running.close()
    finally:
        running.close()
    assert receiver.volume_indices(1)[:5] == [0, 1, 2, 3, 5]
    assert receiver.accepted[0] == (RunStart.TYPE, 1, None) and receiver.trials == {1: [0, 1]}
    assert "missing volume: 4 of series 7 (run 1) never came" in caplog.text
    assert "late file: volume 4 of series 7 (run 1) came after it was declared missing" in caplog.text
    assert (Volume.TYPE, 4, "rejected") in receiver.verdicts or (Volume.TYPE, 1, 4) in receiver.accepted
    volume = receiver.volumes[1, 3]
    assert volume.shape == SHAPE and volume.dtype == "float32" and volume.tr_s == TR_S
    assert np.all(volume.array() == 1003.0) and volume.acq_time_s == pytest.approx(3 * TR_S)
    assert volume.motion is None  # motion correction is off here
    times = volume.bridge
    assert times.seen_unix_s <= times.read_unix_s <= times.registered_unix_s <= volume.envelope.sent_unix_s


def test_each_series_is_a_run_and_a_series_cut_short_then_reacquired_is_a_restart(tmp_path, context, receiver,
                                                                                 caplog):
    export = tmp_path / "export"
    bridge = make_bridge(export, tmp_path / "bridge", receiver.endpoint, context, run_volumes=4)
    running = Running(bridge)
    try:
        with caplog.at_level(logging.INFO):
            for index in range(4):
                write_volume(export / "a", 3, index)
            wait_for(lambda: (RunEnd.TYPE, 1, None) in receiver.accepted)  # complete: ends by itself
            for index in range(2):  # the operator stops this one after 2 volumes ...
                write_volume(export / "b", 4, index)
            wait_for(lambda: len(receiver.volume_indices(2)) == 2)
            for index in range(4):  # ... and acquires it again: the series number shifts
                write_volume(export / "c", 5, index)
            wait_for(lambda: (RunEnd.TYPE, 3, None) in receiver.accepted)
    finally:
        running.close()
    assert [receiver.volume_indices(run) for run in (1, 2, 3)] == [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]
    assert "series restart: series 4 stopped after 2 of 4 volumes; series 5 re-acquires it and goes out as run 3" \
           in caplog.text
    assert bridge.counters["restarts"] == 1
    assert {s.number: s.run for s in bridge.series.values()} == {3: 1, 4: 2, 5: 3}


def test_a_bridge_killed_mid_run_resumes_from_what_was_acked(tmp_path, context, receiver, caplog):
    export, out_dir = tmp_path / "export", tmp_path / "bridge"
    for index in range(3):
        write_volume(export, 9, index)
    first = make_bridge(export, out_dir, receiver.endpoint, context)
    first.open()
    series = lambda bridge: next(iter(bridge.series.values()))  # noqa: E731
    while len(first.series) == 0 or len(series(first).acked) < 3:
        first.step()  # volumes 0-2 sent, acked, and the acks written to the state
    first._read_acks = lambda timeout_ms=0: None  # from now on the acks are still in flight when it dies
    for index in range(3, 6):
        write_volume(export, 9, index)
    while len(receiver.volume_indices(1)) < 6:
        first.step()  # volumes 3-5 reach the service ...
    first._socket.close(linger=0)  # ... and the bridge is killed: no goodbye
    first.watcher.stop()
    assert set(next(iter(_state(out_dir)["series"].values()))["acked"]) == {0, 1, 2}

    for index in range(6, 8):
        write_volume(export, 9, index)
    with caplog.at_level(logging.INFO):
        second = make_bridge(export, out_dir, receiver.endpoint, context)
    sent: list[int] = []
    send_volume = second._send_volume
    second._send_volume = lambda series_, files: (sent.append(files.index), send_volume(series_, files))
    running = Running(second)
    try:
        wait_for(lambda: len(series(second).acked) == 8)
    finally:
        running.close()
    assert "resuming session subj01-bridge" in caplog.text and "3 volumes acked" in caplog.text
    assert receiver.volume_indices(1) == list(range(8))  # every volume accepted once, in order: nothing lost
    assert sent == [3, 4, 5, 6, 7]  # nothing acked was sent again
    duplicates = [index for type_, index, verdict in receiver.verdicts
                  if type_ == Volume.TYPE and verdict == "duplicate"]
    assert duplicates == [3, 4, 5]  # sent before the kill, ack never booked: answered duplicate, not taken as new


def test_events_tsv_is_read_with_its_columns(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\timage_id\ttrial_type\ttrial\n12.0\t3.0\t46002\timage\t4\n16\t3\tn/a\tblank\t5\n")
    events = read_bids_events(path)
    assert [(e.trial, e.onset_s, e.duration_s, e.image_id, e.label) for e in events] == [
        (4, 12.0, 3.0, 46002, "image"), (5, 16.0, 3.0, None, "blank")]
    path.write_text("start\tlength\n1\t2\n")
    with pytest.raises(Exception, match="'onset' and 'duration' columns"):
        read_bids_events(path)


def _state(out_dir: Path) -> dict:
    return json.loads((out_dir / "bridge_state.json").read_text())
