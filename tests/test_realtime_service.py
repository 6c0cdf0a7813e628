"""The realtime service end to end on the tiny world: replayed runs in over ZeroMQ, betas and results out.

The model is the tiny config, untrained (decoding quality is the benchmarks' business); what is
tested is the path: every trial published once, betas equal to the GLM fed the clean run, faults
that leave untouched trials exactly as they were, the journal, and a kill -9 mid-run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from mindeye.config import load_config
from mindeye.journal import read_journal
from mindeye.nsd import NSDLayout, read_design, read_roi, read_timeseries
from mindeye.protocol import CurveClient, CurveServer, ProtocolError, Volume, create_keypair
from realtime.backends import TorchBackend
from realtime.cli import build_service
from realtime.glm import IncrementalGLM, OnlineGLMSettings
from realtime.pipeline import SubjectRois
from realtime.service import RealtimeService, ServiceSettings
from simulators.replay.faults import Faults
from simulators.replay.sender import replay
from simulators.replay.sources import NSDSource, design_events

SUBJECT, SESSION = 1, 5


@pytest.fixture(scope="module")
def bundle(tiny_world, checkpoint, tmp_path_factory) -> Path:
    """The untrained checkpoint as a plain eager bundle (mindeye-export backend=eager), what the service loads."""
    from export.cli import export_bundle
    from mindeye.clip import clip_identity
    from mindeye.targets import target_clip_config

    data = load_config("realtime", ["bundle=x", f"data.root={tiny_world[0]}"]).data
    return export_bundle(checkpoint, tmp_path_factory.mktemp("bundle") / "eager", backend="eager",
                         clip_id=clip_identity(target_clip_config(data))).root


def expected_betas(root: Path, run: int) -> dict[int, np.ndarray]:
    """Trial -> beta of the GLM fed the clean run directly, volume by volume (the service's reference)."""
    layout = NSDLayout(root)
    series = read_timeseries(layout.timeseries(SUBJECT, SESSION, run))
    roi = read_roi(layout.roi(SUBJECT))
    glm = IncrementalGLM(roi.n_voxels, OnlineGLMSettings(series.tr, grace_volumes=1))
    for event in design_events(read_design(layout.design(SUBJECT, SESSION, run), series.n_volumes), series.tr):
        glm.add_trial(event.trial, event.onset_s, event.duration_s)
    reports = []
    for t in range(series.n_volumes):
        reports += glm.add_volume(t, roi.apply(series.data_xyzt[..., t]))
    reports += glm.finish()
    return {r.trial_id: r.beta_pct_v for r in reports}


class RunningService:
    """A service on free loopback ports, in a thread of this process."""

    def __init__(self, root: Path, checkpoint: Path, out_dir: Path, curve_keys: tuple[Path, Path] | None = None,
                 **settings):
        """`curve_keys`: (the service's secret key file, the folder of allowed client public keys)."""
        backend = TorchBackend.from_checkpoint(checkpoint, bank=None, prior_steps=2)
        context = zmq.Context()
        self.curve = None if curve_keys is None else CurveServer(context, *curve_keys)
        self.service = RealtimeService(
            ServiceSettings(out_dir, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", journal_fsync="never", **settings),
            backend, SubjectRois.from_layout(root, ["subj01"]), context=context, curve=self.curve)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.service.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.service.ready.wait(30), "service did not start"

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.curve is not None:
            self.curve.stop()


def results(out_dir: Path) -> list[dict]:
    path = out_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_results(out_dir: Path, n: int, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(results(out_dir)) < n:
        time.sleep(0.1)
    return results(out_dir)


def betas_of_run(out_dir: Path, run: int) -> dict[int, np.ndarray]:
    saved = np.load(out_dir / "betas" / f"subj01-nsd{SESSION:02d}_run-{run:02d}.npz")
    return dict(zip(saved["trial"].tolist(), saved["betas_nv"]))


def n_trials(root: Path, run: int) -> int:
    series_tr = read_timeseries(NSDLayout(root).timeseries(SUBJECT, SESSION, run)).tr
    return len(design_events(read_design(NSDLayout(root).design(SUBJECT, SESSION, run)), series_tr))


def test_an_unknown_prior_sampler_is_refused_before_anything_loads(tmp_path):
    cfg = load_config("realtime", [f"bundle={tmp_path / 'absent'}", "decode.prior_sampler=euler"])
    with pytest.raises(ValueError, match=r"unknown prior sampler 'euler'; choose one of ddim, dpmpp"):
        build_service(cfg)
    assert load_config("realtime", ["bundle=x"]).decode.prior_sampler in ("ddim", "dpmpp")


def test_a_clean_run_gives_every_trial_once_with_the_reference_betas(tiny_world, checkpoint, tmp_path):
    root = tiny_world[0]
    service = RunningService(root, checkpoint, tmp_path)
    try:
        summary = replay(NSDSource(NSDLayout(root), SUBJECT, SESSION, [1, 2]), service.service.volumes_endpoint)
        got = wait_for_results(tmp_path, n_trials(root, 1) + n_trials(root, 2))
    finally:
        service.close()
    assert summary.acks == {"accepted": sum(summary.sent.values())}
    for run in (1, 2):
        published = sorted(r["trial"] for r in got if r["run"] == run)
        assert published == list(range(n_trials(root, run)))
        live, reference = betas_of_run(tmp_path, run), expected_betas(root, run)
        assert live.keys() == reference.keys()
        for trial, beta in reference.items():
            np.testing.assert_allclose(live[trial], beta, rtol=1e-5, atol=1e-5)
    first = got[0]
    assert first["flags"] in ([], ["late"]) and len(first["top_k"]) == 0  # no retrieval bank in this test
    assert {"receive", "journal", "glm", "queue", "decode", "generate", "publish", "end_to_end"} <= first[
        "timings_ms"].keys()
    assert (tmp_path / "latency.json").is_file() and (tmp_path / "latency.png").is_file()


def test_network_faults_leave_untouched_trials_exactly_as_in_a_clean_run(tiny_world, checkpoint, tmp_path):
    """Duplicates and reordering change nothing; a dropped volume changes only trials fitted after it;
    malformed and NaN volumes are refused with a reason and the service goes on."""
    root = tiny_world[0]
    dropped = 60
    faults = Faults.from_config({"drop": {"indices": [dropped]}, "duplicate": {"indices": [5, 30, 40]},
                                 "reorder": {"indices": [10, 20, 65], "window": 1},
                                 "corrupt": {"indices": [45]}, "truncate": {"indices": [50]},
                                 "nan": {"indices": [55], "fraction": 0.5}})
    service = RunningService(root, checkpoint, tmp_path, gap_wait_s=0.5)
    try:
        summary = replay(NSDSource(NSDLayout(root), SUBJECT, SESSION, [1], dtype="float32"),
                         service.service.volumes_endpoint, faults=faults)
        got = wait_for_results(tmp_path, n_trials(root, 1))
        status = service.service.status()
    finally:
        service.close()
    assert sorted(r["trial"] for r in got) == list(range(n_trials(root, 1)))  # every trial, once
    assert summary.acks["duplicate"] == 3
    assert summary.acks["rejected:not_json"] == 1 and summary.acks["rejected:frame_size"] == 1
    assert summary.acks["rejected:bad_data"] == 1
    assert status["volumes_missing"] == 4  # dropped, corrupt, truncated and NaN volumes: never accepted
    lost = {45, 50, 55, dropped}

    live, reference = betas_of_run(tmp_path, 1), expected_betas(root, 1)
    tr = read_timeseries(NSDLayout(root).timeseries(SUBJECT, SESSION, 1)).tr
    events = design_events(read_design(NSDLayout(root).design(SUBJECT, SESSION, 1)), tr)
    settings = OnlineGLMSettings(tr)
    untouched = [e.trial for e in events if settings.horizon_volume(e.onset_s) < min(lost)]
    touched = [e.trial for e in events if e.trial not in untouched]
    assert len(untouched) >= 3 and touched
    for trial in untouched:  # bit for bit (the service stores float32)
        np.testing.assert_array_equal(live[trial], reference[trial].astype(np.float32))
    for trial in touched:  # estimated without the lost volumes: finite, close to the clean estimate
        assert np.isfinite(live[trial]).all()
        assert np.corrcoef(live[trial], reference[trial])[0, 1] > 0.9


def test_wrong_geometry_delays_and_a_sender_restart_are_survived(tiny_world, checkpoint, tmp_path):
    """A volume claiming another shape, one on another grid, one in another dtype, a late one, and a
    sender that restarts mid-run and resends 5 volumes: refused with reasons, reordered, acked as
    duplicates; every trial still gets one result, and trials before the first lost volume are exact."""
    root = tiny_world[0]
    faults = Faults.from_config({"wrong_shape": {"indices": [44], "mode": "header"},
                                 "wrong_dtype": {"indices": [48], "mode": "data", "dtype": "float64"},
                                 "delay": {"indices": [20], "delay_s": 2.5},
                                 "restart": {"at_index": 30, "resume_from": 25}})
    service = RunningService(root, checkpoint, tmp_path, gap_wait_s=2.0)
    try:
        summary = replay(NSDSource(NSDLayout(root), SUBJECT, SESSION, [1], dtype="float32"),
                         service.service.volumes_endpoint, faults=faults, speed=20)
        got = wait_for_results(tmp_path, n_trials(root, 1))
    finally:
        service.close()
    assert sorted(r["trial"] for r in got) == list(range(n_trials(root, 1)))
    assert summary.sender_restarts == 1
    assert summary.acks["duplicate"] == 5 + 2  # volumes 25-29, run_start and events resent after the restart
    assert summary.acks["rejected:frame_size"] == 1 and summary.acks["rejected:conflict"] == 1
    assert summary.acks["accepted:out_of_order"] >= 1  # the delayed volume filled its gap in time
    live, reference = betas_of_run(tmp_path, 1), expected_betas(root, 1)
    tr = read_timeseries(NSDLayout(root).timeseries(SUBJECT, SESSION, 1)).tr
    events = design_events(read_design(NSDLayout(root).design(SUBJECT, SESSION, 1)), tr)
    settings = OnlineGLMSettings(tr)
    untouched = [e.trial for e in events if settings.horizon_volume(e.onset_s) < 44]
    assert len(untouched) >= 3
    for trial in untouched:
        np.testing.assert_array_equal(live[trial], reference[trial].astype(np.float32))


def test_with_curve_only_an_allowed_scanner_is_heard(tiny_world, checkpoint, tmp_path):
    """Scanner and GPU host on different machines: the service admits only listed client keys."""
    root = tiny_world[0]
    keys = tmp_path / "keys"
    _, service_secret = create_keypair(keys, "service")
    scanner_public, scanner_secret = create_keypair(keys / "scanner", "scanner")
    _, intruder_secret = create_keypair(keys / "intruder", "intruder")
    allowed = keys / "allowed"
    allowed.mkdir()
    shutil.copy(scanner_public, allowed)
    service = RunningService(root, checkpoint, tmp_path / "out", curve_keys=(service_secret, allowed))
    try:
        source = NSDSource(NSDLayout(root), SUBJECT, SESSION, [1])
        endpoint = service.service.volumes_endpoint
        with pytest.raises(RuntimeError, match="not taking messages"):  # the handshake fails: nothing gets through
            replay(source, endpoint, curve=CurveClient(intruder_secret, keys / "service.key"))
        heard = replay(source, endpoint, curve=CurveClient(scanner_secret, keys / "service.key"))
        got = wait_for_results(tmp_path / "out", n_trials(root, 1))
    finally:
        service.close()
    assert service.service.counters["messages"] == sum(heard.sent.values())  # none of the intruder's
    assert heard.acks == {"accepted": sum(heard.sent.values())}
    assert sorted(r["trial"] for r in got) == list(range(n_trials(root, 1)))


def test_the_journal_holds_every_accepted_volume_and_replays_to_the_same_betas(tiny_world, checkpoint, tmp_path):
    root = tiny_world[0]
    first_dir, second_dir = tmp_path / "live", tmp_path / "from-journal"
    service = RunningService(root, checkpoint, first_dir)
    try:
        replay(NSDSource(NSDLayout(root), SUBJECT, SESSION, [1]), service.service.volumes_endpoint,
               faults=Faults.from_config({"duplicate": {"indices": [3, 4]}}))
        wait_for_results(first_dir, n_trials(root, 1))
        accepted = service.service.admission.runs[("subj01-nsd05", 1)].accepted
    finally:
        service.close()
    journaled = []
    for record in read_journal(first_dir / "journal.mej"):
        try:
            message = record.message()
        except ProtocolError:
            continue
        if isinstance(message, Volume):
            journaled.append(message.index)
    assert set(journaled) == accepted == set(range(len(accepted)))
    assert len(journaled) == len(accepted) + 2  # the duplicates were journaled too, as received

    from simulators.replay.sources import JournalSource

    service = RunningService(root, checkpoint, second_dir)
    try:
        replay(JournalSource(first_dir / "journal.mej"), service.service.volumes_endpoint)
        wait_for_results(second_dir, n_trials(root, 1))
    finally:
        service.close()
    for trial, beta in betas_of_run(first_dir, 1).items():
        np.testing.assert_array_equal(betas_of_run(second_dir, 1)[trial], beta)


def service_process(root: Path, bundle: Path, out_dir: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "realtime.cli", f"bundle={bundle}", f"data.root={root}",
               f"out_dir={out_dir}", f"endpoints.volumes=tcp://127.0.0.1:{port}",
               f"endpoints.results=tcp://127.0.0.1:{port + 1}", "viewer.enabled=false", "decode.prior_steps=2",
               "journal_fsync=never"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_listening(out_dir: Path, process: subprocess.Popen, life: int, timeout_s: float = 120.0) -> None:
    """Until the service's `life`-th start (1, 2, ...) says it listens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = out_dir / "service.log"
        if log.is_file() and log.read_text().count("listening for volumes") >= life:
            return
        if process.poll() is not None:
            raise AssertionError(f"service exited: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError("service did not start listening")


def test_kill_9_mid_run_and_restart_loses_nothing_and_counts_nothing_twice(tiny_world, bundle, tmp_path):
    """SIGKILL after ~half the run; the restarted service resumes from its journal; the restarted
    sender resends the whole run. Betas equal the clean reference; every trial is published once."""
    root = tiny_world[0]
    with zmq.Context() as context:
        probe = context.socket(zmq.ROUTER)
        port = probe.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=40000, max_tries=200)
        probe.close()
    source = NSDSource(NSDLayout(root), SUBJECT, SESSION, [1])
    plan = next(source.runs())
    half = [item for item in plan if item.type != "volume" or item.index < 45]
    half = [item for item in half if item.type != "run_end"]

    class Partial:
        def runs(self):
            yield half

    process = service_process(root, bundle, tmp_path, port)
    try:
        wait_listening(tmp_path, process, life=1)
        replay(Partial(), f"tcp://127.0.0.1:{port}")
        wait_for_results(tmp_path, 1, timeout_s=30)  # some results out before the kill (the rest after it)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    before = {r["trial"] for r in results(tmp_path)}
    assert before, "nothing was published before the kill"

    process = service_process(root, bundle, tmp_path, port)
    try:
        wait_listening(tmp_path, process, life=2)
        summary = replay(source, f"tcp://127.0.0.1:{port}")
        got = wait_for_results(tmp_path, n_trials(root, 1))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert summary.acks["duplicate"] >= 45  # run_start, events and the first 45 volumes came back from the journal
    trials = [r["trial"] for r in got]
    assert sorted(trials) == list(range(n_trials(root, 1)))  # once each, across both lives
    live, reference = betas_of_run(tmp_path, 1), expected_betas(root, 1)
    for trial, beta in reference.items():
        np.testing.assert_allclose(live[trial], beta, rtol=1e-5, atol=1e-5)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_a_busy_viewer_port_ends_the_service_with_one_line_naming_viewer_port(tiny_world, bundle, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "realtime.cli", f"bundle={bundle}",
                               f"data.root={tiny_world[0]}", f"out_dir={tmp_path / 'session'}", f"viewer.port={port}",
                               "decode.prior_steps=2", "generate.enabled=false"],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 5, done.stderr[-3000:]  # mindeye.cli.EXIT_CODES["busy port"]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"mindeye-realtime: the viewer's port 127.0.0.1:{port} is already in use (another program, perhaps another "
        f"mindeye command, listens there): stop it or choose another port, e.g. viewer.port={port + 1}")


def demo_command(root: Path, checkpoint: Path, tmp_path: Path, *overrides: str) -> tuple[list[str], int]:
    """mindeye-demo reusing `checkpoint`, on free ports; and its viewer's port."""
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir / "checkpoint")
    volumes, results_port, viewer = free_ports(3)
    return [sys.executable, "-m", "simulators.demo", f"out_dir={root}", f"train.out_dir={model_dir}", "runs=[1]",
            "speed=max", "progress=false", f"service.out_dir={tmp_path / 'live'}",
            f"service.volumes=tcp://127.0.0.1:{volumes}", f"service.results=tcp://127.0.0.1:{results_port}",
            f"service.viewer_port={viewer}", f"hydra.run.dir={tmp_path / 'hydra'}", *overrides], viewer


def add_token_readout(checkpoint: Path, n_trials: int = 30) -> None:
    """A readout for the checkpoint's subject as mindeye-train saves one, fitted on random betas and tokens."""
    from mindeye.models import load_checkpoint
    from mindeye.models.readout import fit_token_readout, save_readouts

    model = load_checkpoint(checkpoint).eval()
    (subject, n_voxels), = model.config.voxels_per_subject.items()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        backbone = model(torch.randn(n_trials, n_voxels, generator=generator), subject).backbone_tokens
    targets = torch.randn(n_trials, *backbone.shape[1:], generator=generator)
    save_readouts(checkpoint, {subject: fit_token_readout(backbone, targets)[0]})


def test_the_demo_runs_a_live_session_end_to_end(tiny_world, checkpoint, tmp_path):
    """mindeye-demo with a model already trained (it reuses one): service, viewer, replay, report; its pictures
    drawn from the model's token readout, as from a model mindeye-train fitted one for."""
    root = tiny_world[0]
    command, viewer = demo_command(root, checkpoint, tmp_path, "stay_up=false")
    add_token_readout(tmp_path / "model" / "checkpoint")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "synthetic NSD world 'tiny'" in done.stdout and "ridge decoding, subj01" in done.stdout
    assert f"live: {n_trials(root, 1)} trials published" in done.stdout
    decoded = re.search(r"reconstructions: (\d+) of the (\d+) decoded trials", done.stdout)  # the committed student
    assert decoded and int(decoded[2]) >= 1 and decoded[1] == decoded[2], done.stdout[-2000:]
    assert "acks    accepted 76" in done.stdout and "latency, last volume" in done.stdout
    assert (tmp_path / "live" / "latency.png").is_file()
    # The candidates are the subject's images: every decoded trial's seen image is one, so every one counts.
    top1 = re.search(r"top-1 retrieval among (\d+) candidate images: [\d.]+ % \((\d+) of (\d+) trials whose seen "
                     r"image was a candidate\)", done.stdout)
    assert top1 and top1[3] == decoded[2], done.stdout[-2000:]
    for stage in ("world", "training", "export", "live"):
        assert re.search(rf"^stage {stage}: \d+\.\d s", done.stdout, re.MULTILINE), done.stdout[-2000:]
    assert done.stdout.count(f"http://127.0.0.1:{viewer}/") >= 2  # announced, then up
    assert "image tokens from the readouts" in (tmp_path / "live" / "service.log").read_text()


def test_the_demo_keeps_its_viewer_up_until_ctrl_c(tiny_world, checkpoint, tmp_path):
    import urllib.request

    root = tiny_world[0]
    command, viewer = demo_command(root, checkpoint, tmp_path)  # stay_up: the default
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        lines = []
        while not any("Ctrl-C stops" in line for line in lines):
            line = demo.stdout.readline()
            assert line, f"the demo ended without waiting: {''.join(lines)[-2000:]}{demo.stderr.read()[-2000:]}"
            lines.append(line)
        assert any(line.startswith("live: ") for line in lines)  # the final figures come before the wait
        time.sleep(1.0)
        assert demo.poll() is None  # still up after the replay
        with urllib.request.urlopen(f"http://127.0.0.1:{viewer}/results.json", timeout=10) as response:
            listing = json.loads(response.read())
        assert len(listing["results"]) == n_trials(root, 1)
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, err[-3000:]
    assert "files: " in out and (tmp_path / "live" / "latency.png").is_file()  # the service stopped cleanly
