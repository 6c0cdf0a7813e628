"""The replayer: NSD runs, NIfTI files and journals streamed to a loopback ROUTER; every fault does
what its log says; the same seed gives the same faults; pacing on a fake clock; the CLI."""
from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zmq

import simulators.replay
from mindeye.config import load_config
from mindeye.errors import FormatError
from mindeye.journal import JournalWriter
from mindeye.nsd import ExpDesign, NSDLayout, read_design, read_timeseries, task_runs
from mindeye.protocol import (Ack, Events, ProtocolError, RunEnd, RunStart, Stamper, Verdict, Volume, bound_endpoint,
                              decode, recv_with_peer, send, volume_receiver)
from simulators.replay import (Faults, JournalSource, NiftiSource, NSDSource, Pacer, apply_faults, parse_speed,
                               replay)
from simulators.world.generate import generate_world

LOOPBACK = "tcp://127.0.0.1:*"
TIMEOUT_MS = 2000  # for messages that must arrive; never waited for when all is well
N_VOLUMES = 73  # volumes a run in the world below
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> NSDLayout:
    """A one-subject world, two sessions (a few seconds to write)."""
    cfg = load_config("world_generate", ["world.n_subjects=1", "world.images.unique_per_subject=50",
                                         "world.images.shared=10", "world.sessions_per_subject=[2]"]).world
    root = tmp_path_factory.mktemp("replay_world")
    generate_world(cfg, root, progress=False)
    return NSDLayout(root)


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _source(world: NSDLayout, runs=(1,), **options) -> NSDSource:
    return NSDSource(world, subject=1, session=1, run_numbers=list(runs), **options)


def _replay_into_router(context, source, **options) -> tuple[list[tuple[bytes, list[bytes]]], object]:
    """Replay `source` into a fresh ROUTER (no acks); returns [(peer, frames)] in arrival order and the summary."""
    router = volume_receiver(context, LOOPBACK)
    summary = replay(source, bound_endpoint(router), context=context, ack_wait_s=0, **options)
    received = []
    for _ in range(sum(summary.sent.values())):
        assert router.poll(TIMEOUT_MS), f"only {len(received)} of {sum(summary.sent.values())} messages arrived"
        peer, *frames = router.recv_multipart()
        received.append((peer, frames))
    assert router.poll(50) == 0, "more messages arrived than the replayer says it sent"
    router.close()
    return received, summary


def _messages(received) -> list:
    return [decode(frames) for _, frames in received]


def _volume_indices(messages) -> list[int]:
    return [m.index for m in messages if isinstance(m, Volume)]


# ---- sources ------------------------------------------------------------------------------------------

def test_an_nsd_run_arrives_whole_with_the_design_trials(world, context):
    received, summary = _replay_into_router(context, _source(world), speed="max")
    messages = _messages(received)
    series = read_timeseries(world.timeseries(1, 1, 1))
    assert [type(m) for m in messages] == [RunStart, Events, *[Volume] * N_VOLUMES, RunEnd]
    assert [m.envelope.seq for m in messages] == list(range(N_VOLUMES + 3))
    assert len({m.envelope.sender_id for m in messages}) == 1 and len({peer for peer, _ in received}) == 1

    start, events, volumes, end = messages[0], messages[1], messages[2:-1], messages[-1]
    assert (start.session, start.subject, start.run) == ("subj01-nsd01", "subj01", 1)
    assert (start.n_volumes, start.dtype, start.shape) == (N_VOLUMES, "int16", series.data_xyzt.shape[:3])
    assert start.tr_s == pytest.approx(4 / 3, abs=1e-6) and np.allclose(start.affine, series.affine)
    for index, volume in enumerate(volumes):
        assert volume.index == index and volume.acq_time_s == pytest.approx(index * series.tr)
        np.testing.assert_array_equal(volume.array(), series.data_xyzt[..., index])
    assert (end.n_volumes, end.run) == (N_VOLUMES, 1)

    # The trials: the design file's onsets, and what the experiment design says the subject saw.
    design_t = read_design(world.design(1, 1, 1), N_VOLUMES)
    onset_volumes = np.flatnonzero(design_t >= 0)
    truth = ExpDesign.read(world.expdesign()).trials(1, [1]).for_run(1, 1)
    assert events.complete and len(events.events) == len(truth) == 18
    assert [e.trial for e in events.events] == list(range(18))
    assert [e.onset_s for e in events.events] == pytest.approx(onset_volumes * series.tr)
    assert [e.onset_s for e in events.events] == pytest.approx(truth.onset_s, abs=1e-4)
    assert [e.image_id for e in events.events] == truth.image_id.tolist()
    assert {(e.duration_s, e.label) for e in events.events} == {(3.0, "image")}
    assert summary.sent == {"run_start": 1, "events": 1, "volume": N_VOLUMES, "run_end": 1}


def test_the_schedule_follows_the_scanner_and_trials_can_go_at_their_onsets(world):
    first, second = list(_source(world, runs=(1, 2), run_gap_s=10.0, events_mode="at_onset").runs())
    tr = read_timeseries(world.timeseries(1, 1, 1)).tr
    volume_times = [item.at_s for item in first if item.type == "volume"]
    assert volume_times == pytest.approx((np.arange(N_VOLUMES) + 1) * tr)  # each once its acquisition is over
    assert first[0].type == "run_start" and first[0].at_s == 0.0
    assert first[-1].type == "run_end" and first[-1].at_s == pytest.approx(N_VOLUMES * tr)
    trials = [item for item in first if item.type == "events"]
    assert len(trials) == 18 and [t.message.complete for t in trials] == [False] * 17 + [True]
    assert [t.at_s for t in trials] == pytest.approx([t.message.events[0].onset_s for t in trials])
    assert second[0].at_s == pytest.approx(N_VOLUMES * tr + 10.0) and second[0].run == 2


def test_a_nifti_from_nibabel_streams_with_its_header_tr_or_an_override(tmp_path, context):
    example = NIBABEL_DATA / "example4d.nii.gz"  # 128 x 96 x 24 x 2; its header says 2000 s (ms labelled s)
    with pytest.raises(FormatError, match="2000 s .*pass tr_s"):
        next(NiftiSource(example, subject_id="subj01").runs())
    received, _ = _replay_into_router(context, NiftiSource(example, subject_id="subj01", tr_s=2.0), speed="max")
    messages = _messages(received)
    image = nib.load(example)
    assert [type(m) for m in messages] == [RunStart, Events, Volume, Volume, RunEnd]
    assert (messages[0].session, messages[0].shape, messages[0].dtype, messages[0].tr_s) == \
        ("example4d", (128, 96, 24), "int16", 2.0)
    assert np.allclose(messages[0].affine, image.affine) and messages[1].events == ()
    for index, volume in enumerate(messages[2:4]):
        np.testing.assert_array_equal(volume.array(), np.asanyarray(image.dataobj)[..., index])

    events_tsv = tmp_path / "events.tsv"
    events_tsv.write_text("onset\tduration\ttrial_type\timage_id\n4.0\t3.0\tface\t17\n10.5\t3.0\tblank\tn/a\n")
    functional = NIBABEL_DATA / "functional.nii"  # 17 x 21 x 3 x 20, TR 2 s, scaled int16 -> float64
    (plan,) = NiftiSource(functional, subject_id="sub-01", events_tsv=events_tsv, run=3).runs()
    assert plan[0].message.tr_s == 2.0 and plan[0].message.n_volumes == 20 and plan[0].run == 3
    assert [(e.onset_s, e.duration_s, e.image_id, e.label) for e in plan[1].message.events] == \
        [(4.0, 3.0, 17, "face"), (10.5, 3.0, None, "blank")]
    (as_float32,) = NiftiSource(functional, subject_id="sub-01", dtype="float32").runs()
    np.testing.assert_allclose(as_float32[5].message.array(), nib.load(functional).get_fdata()[..., 3], rtol=1e-6)


def test_a_recorded_journal_replays_byte_for_byte_at_the_recorded_pace(world, context, tmp_path):
    # Record what a service would receive, malformed frames included.
    received, _ = _replay_into_router(context, _source(world), speed="max",
                                      faults=Faults.from_config({"corrupt": {"indices": [4]}}))
    journal = tmp_path / "visit.mej"
    arrivals = 1.7e9 + np.cumsum(np.random.default_rng(0).uniform(0.0, 2.0, len(received)))
    with JournalWriter(journal) as writer:
        for (_, frames), arrival in zip(received, arrivals):
            writer.append(frames, float(arrival))

    (plan,) = list(JournalSource(journal).runs())
    assert [item.at_s for item in plan] == pytest.approx(arrivals - arrivals[0])
    assert [item.type for item in plan].count("record") == 1  # the corrupt frame, kept as it was

    clock = FakeClock()
    replayed, _ = _replay_into_router(context, JournalSource(journal), speed="real", clock=clock, sleep=clock.sleep)
    assert [frames for _, frames in replayed] == [frames for _, frames in received]
    assert sum(clock.sleeps) == pytest.approx(arrivals[-1] - arrivals[0])


# ---- pacing -------------------------------------------------------------------------------------------

class FakeClock:
    """A clock that moves only when slept on (or when told a step took time)."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("speed, factor", [("real", 1.0), (10, 0.1), ("max", None)])
def test_pacing_sleeps_one_tr_per_volume_scaled_by_speed(world, context, speed, factor):
    tr = read_timeseries(world.timeseries(1, 1, 1)).tr
    clock = FakeClock()
    _replay_into_router(context, _source(world), speed=speed, clock=clock, sleep=clock.sleep)
    if factor is None:
        assert clock.sleeps == []
    else:  # run_start and events at 0, then one volume a TR; run_end with the last volume
        assert clock.sleeps == pytest.approx([tr * factor] * N_VOLUMES)


def test_the_pacer_keeps_to_the_schedule_when_sending_takes_time():
    clock = FakeClock()
    pacer = Pacer(parse_speed("real"), clock, clock.sleep)
    pacer.start()
    for at_s in (1.5, 3.0, 4.5, 4.6):
        pacer.wait_until(at_s)
        clock.now += 0.4  # sending took 0.4 s
    assert clock.sleeps == pytest.approx([1.5, 1.1, 1.1])  # 4.6 is already past: no sleep
    assert parse_speed("2.5") == 2.5
    for bad in ("fast", 0, -1, None):
        with pytest.raises(ValueError, match="speed must be"):
            parse_speed(bad)


# ---- faults -------------------------------------------------------------------------------------------

def _faulted(context, world, faults: dict, **options):
    received, summary = _replay_into_router(context, _source(world, **options), speed="max",
                                            faults=Faults.from_config(faults))
    return received, summary, summary.fault_records


def test_drop_removes_exactly_the_logged_volumes_and_messages(world, context):
    received, _, log = _faulted(context, world, {"drop": {"indices": [10, 20], "messages": ["events"]}})
    messages = _messages(received)
    assert _volume_indices(messages) == [i for i in range(N_VOLUMES) if i not in (10, 20)]
    assert not any(isinstance(m, Events) for m in messages)
    assert [(r["fault"], r["type"], r["index"]) for r in log] == \
        [("drop", "events", None), ("drop", "volume", 10), ("drop", "volume", 20)]


def test_duplicate_sends_the_logged_volumes_twice_under_new_seqs(world, context):
    received, _, log = _faulted(context, world, {"duplicate": {"indices": [5, 6], "after_s": 0.0}})
    messages = _messages(received)
    indices = _volume_indices(messages)
    assert [r["index"] for r in log] == [5, 6]
    assert indices == [*range(6), 5, 6, 6, *range(7, N_VOLUMES)]
    copies = [m for m in messages if isinstance(m, Volume) and m.index == 5]
    assert copies[0].envelope.seq + 1 == copies[1].envelope.seq and bytes(copies[0].data) == bytes(copies[1].data)


def test_reorder_swaps_the_logged_pair_and_delay_moves_a_volume_later(world, context):
    received, _, log = _faulted(context, world, {"reorder": {"indices": [7], "window": 1},
                                                 "delay": {"indices": [30], "delay_s": 2.5 * 4 / 3}})
    assert [(r["fault"], r["index"], r.get("swapped_with")) for r in log] == [("reorder", 7, 8), ("delay", 30, None)]
    indices = _volume_indices(_messages(received))
    assert indices[:10] == [0, 1, 2, 3, 4, 5, 6, 8, 7, 9]
    assert indices[29:34] == [29, 31, 32, 30, 33]  # 2.5 TR late: after 32, before 33


@pytest.mark.parametrize("fault, options, decode_error", [
    ("truncate", {"keep_fraction": 0.5}, "frame_size"),
    ("corrupt", {"mode": "flip", "n_bytes": 3}, "not_json"),
    ("corrupt", {"mode": "cut"}, "not_json"),
    ("wrong_shape", {"mode": "header"}, "frame_size"),
    ("wrong_dtype", {"mode": "header", "dtype": "float32"}, "frame_size"),
    ("wrong_dtype", {"mode": "header", "dtype": "uint16"}, None),  # same item size: decodes, wrong values
    ("wrong_shape", {"mode": "grid"}, None),  # consistent but another grid: a receiver's `conflict`
    ("wrong_dtype", {"mode": "data", "dtype": "float32"}, None),
])
def test_malformed_volumes_fail_to_decode_with_the_logged_reason(world, context, fault, options, decode_error):
    received, _, log = _faulted(context, world, {fault: {"indices": [4, 9], **options}})
    assert [(r["fault"], r["index"], r["decode_error"]) for r in log] == [(fault, 4, decode_error),
                                                                          (fault, 9, decode_error)]
    series = read_timeseries(world.timeseries(1, 1, 1)).data_xyzt
    faulted = [frames for _, frames in received[2:-1]][4]  # arrival order is unchanged: volume 4's slot
    if decode_error is not None:
        with pytest.raises(ProtocolError) as error:
            decode(faulted)
        assert error.value.code == decode_error
        if fault == "truncate":
            assert len(faulted[1]) == series[..., 4].nbytes // 2
        return
    volume = decode(faulted)
    assert volume.index == 4
    if fault == "wrong_shape":
        np.testing.assert_array_equal(volume.array(), series[:, :, :-1, 4])
    elif options["mode"] == "data":
        assert volume.dtype == "float32"
        np.testing.assert_array_equal(volume.array(), series[..., 4].astype(np.float32))
    else:
        assert volume.dtype == "uint16" and bytes(volume.data) == series[..., 4].astype("<i2").tobytes()


def test_nan_volumes_hold_exactly_the_logged_nans_and_need_float_volumes(world, context):
    received, _, log = _faulted(context, world, {"nan": {"indices": [3], "fraction": 0.1}}, dtype="float32")
    volumes = [m for m in _messages(received) if isinstance(m, Volume)]
    n_voxels = volumes[3].array().size
    assert log == [{"fault": "nan", "type": "volume", "session": "subj01-nsd01", "run": 1, "index": 3,
                    "n_voxels": round(0.1 * n_voxels), "decode_error": None}]
    assert int(np.isnan(volumes[3].array()).sum()) == round(0.1 * n_voxels)
    assert sum(int(np.isnan(v.array()).sum()) for v in volumes) == round(0.1 * n_voxels)

    (plan,) = list(_source(world, dtype="float32").runs())
    whole, _ = apply_faults(plan, Faults.from_config({"nan": {"indices": [0], "fraction": 1.0}}), seed=0)
    assert np.isnan(whole[2].message.array()).all()
    (int_plan,) = list(_source(world).runs())
    with pytest.raises(ValueError, match="int16 volumes, which cannot hold NaN; replay it with dtype=float32"):
        apply_faults(int_plan, Faults.from_config({"nan": {"indices": [0]}}), seed=0)


@pytest.mark.parametrize("resume_from, resent, skipped", [(25, [25, 26, 27, 28, 29], []), (33, [], [30, 31, 32])])
def test_a_sender_restart_is_a_new_sender_with_seq_from_zero_resuming_where_told(world, context, resume_from,
                                                                                  resent, skipped):
    received, summary, log = _faulted(context, world, {"restart": {"at_index": 30, "resume_from": resume_from}})
    assert [(r["fault"], r["at_index"], r["resume_from"], r["resent"], r["skipped"]) for r in log] == \
        [("restart", 30, resume_from, resent, skipped)]
    assert summary.sender_restarts == 1
    peers = list(dict.fromkeys(peer for peer, _ in received))
    assert len(peers) == 2  # a new connection
    before = [decode(frames) for peer, frames in received if peer == peers[0]]
    after = [decode(frames) for peer, frames in received if peer == peers[1]]
    assert _volume_indices(before) == list(range(30))
    assert [type(m) for m in after[:2]] == [RunStart, Events]
    assert _volume_indices(after) == resent + list(range(max(30, resume_from), N_VOLUMES))
    assert isinstance(after[-1], RunEnd)
    assert {m.envelope.sender_id for m in before} != {m.envelope.sender_id for m in after}
    assert len({m.envelope.sender_id for m in after}) == 1
    assert [m.envelope.seq for m in after] == list(range(len(after)))


def test_the_same_seed_gives_the_same_fault_log_and_faults_draw_independently(world):
    (plan,) = list(_source(world).runs())
    lossy = Faults.from_config(load_config("replay", ["faults=lossy"]).faults)
    first, log = apply_faults(plan, lossy, seed=7)
    again, log_again = apply_faults(plan, lossy, seed=7)
    _, other_log = apply_faults(plan, lossy, seed=8)
    assert log == log_again and len(log) > N_VOLUMES  # jitter logs every message, the rest some volumes
    assert [(i.at_s, i.type, i.index) for i in first] == [(i.at_s, i.type, i.index) for i in again]
    assert log != other_log
    drops = [r for r in log if r["fault"] == "drop"]
    _, drop_only_log = apply_faults(plan, Faults(drop=lossy.drop), seed=7)
    assert drop_only_log == drops  # enabling other faults does not move the drops
    jitter = {(r["type"], r["index"]): r["delay_s"] for r in log if r["fault"] == "jitter"}
    assert all(0.0 <= d <= 0.2 for d in jitter.values())


def test_fault_configuration_errors_name_the_fault_and_option():
    with pytest.raises(ValueError, match="unknown fault 'dorp'"):
        Faults.from_config({"dorp": {}})
    with pytest.raises(ValueError, match=r"faults.drop: unknown option\(s\) \['indexes'\]"):
        Faults.from_config({"drop": {"indexes": [1]}})
    with pytest.raises(ValueError, match="probability must be in"):
        Faults.from_config({"duplicate": {"probability": 1.5}})
    with pytest.raises(ValueError, match="corrupt.mode"):
        Faults.from_config({"corrupt": {"mode": "scramble"}})


# ---- the command line ---------------------------------------------------------------------------------

def _run_cli(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "simulators.replay.cli", *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_help_explains_sources_speed_and_faults():
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    for phrase in ("mindeye-replay", "source=journal", "speed", "faults: none | lossy | hostile", "fault log",
                   "faults.drop.indices"):
        assert phrase in result.stdout, phrase


def test_cli_replays_into_a_service_and_counts_acks_by_verdict(world, context, tmp_path):
    """An acking ROUTER stands in for the service: it accepts what decodes and rejects the rest."""
    router = volume_receiver(context, LOOPBACK)
    stop = threading.Event()

    def serve():
        service = Stamper()
        while not stop.is_set():
            try:
                got = recv_with_peer(router, 50)
            except ProtocolError as error:
                send(router, Ack.rejecting(error, service.envelope()), peer=error.peer)
                continue
            if got is not None:
                send(router, Ack(got[1].envelope.seq, Verdict.ACCEPTED, None, "", service.envelope()), peer=got[0])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        fault_log = tmp_path / "faults.jsonl"
        result = _run_cli(f"data_root={world.root}", "runs=[2]", "speed=max", f"endpoint={bound_endpoint(router)}",
                          "faults.drop.indices=[10]", "faults.truncate.indices=[3,4]", f"fault_log={fault_log}",
                          f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        stop.set()
        thread.join()
        router.close()
    assert result.returncode == 0, result.stderr
    sent = f"sent    {N_VOLUMES + 2} messages: events 1, run_end 1, run_start 1, volume {N_VOLUMES - 1}"
    assert sent in result.stdout
    assert "faults  drop 1, truncate 2" in result.stdout
    assert f"acks    accepted {N_VOLUMES}, rejected:frame_size 2; 0 unreadable, 0 unacked" in result.stdout
    assert len(fault_log.read_text().splitlines()) == 3


def test_cli_replaying_into_nothing_fails_with_one_line_saying_so(world, tmp_path):
    """No service at the endpoint: a clear error after `first_ack_wait_s`, a non-zero exit, no traceback."""
    with socket.socket() as probe:  # a free port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run_cli(f"data_root={world.root}", "runs=[2]", "speed=max", f"endpoint=tcp://127.0.0.1:{port}",
                      "first_ack_wait_s=0.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 6  # EXIT_CODES["no service"]
    assert result.stderr.strip() == (f"mindeye-replay: no service answered at tcp://127.0.0.1:{port} within 0.5 s: "
                                     f"it is not taking messages. Is mindeye-realtime running there (with CURVE "
                                     f"keys that admit this sender)?")
    assert not (tmp_path / "run").exists()  # a failed command leaves no empty run folder behind


def test_cli_a_misspelt_key_gets_a_suggestion_not_hydras_advice(tmp_path):
    result = _run_cli("sped=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == "mindeye-replay: unknown key 'sped'; did you mean 'speed'? (see mindeye-replay --help)"
    result = _run_cli("faults=lossless")
    assert result.returncode == 2 and result.stderr.strip().startswith("mindeye-replay: unknown faults 'lossless'; "
                                                                        "choose one of")
    assert not (tmp_path / "run").exists()


def test_no_pickle_in_the_replayer():
    package = Path(simulators.replay.__file__).parent
    sources = sorted(package.glob("*.py"))
    assert {p.name for p in sources} >= {"sources.py", "faults.py", "sender.py", "cli.py"}
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = {alias.name.split(".")[0] for alias in node.names}
                names |= {node.module.split(".")[0]} if isinstance(node, ast.ImportFrom) and node.module else set()
                assert not names & {"pickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}, source.name


def test_task_runs_skip_rest_runs(irregular_world):
    """runs=task replays the design's runs in order: files 2.. of a session with a rest run first and last."""
    from simulators.replay.cli import build_source

    root = irregular_world[0]
    layout = NSDLayout(root)
    design = ExpDesign.read(layout.expdesign())
    source = build_source(load_config("replay", [f"data_root={root}", "session=2", "runs=task"]))
    plans = list(source.runs())
    assert [plan[0].run for plan in plans] == task_runs(layout, 1, 2) == list(range(2, design.runs_per_session + 2))
    trials = design.trials(1, [2])
    for k, plan in enumerate(plans, start=1):
        events = next(item.message.events for item in plan if item.type == Events.TYPE)
        assert [e.image_id for e in events] == trials.for_run(2, k).image_id.tolist()
    assert [plan[0].run for plan in NSDSource(layout, 1, 1, "task").runs()] == list(range(1, design.runs_per_session + 1))
    with pytest.raises(ValueError, match="'task'"):
        NSDSource(layout, 1, 2, "rest")
