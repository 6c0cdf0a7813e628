"""The realtime service's ingest-loop overhead per volume, at NSD size, on one CPU core.

NSD-size runs: 81 x 104 x 83 int16 volumes (values around 1000, 1 % noise), TR 4/3 s, 226
volumes, 62-63 trials a run (3-s images in 4-s slots from 12 s after the start, ~10 % of the slots
blank), a synthetic ROI of 15,724 voxels (NSD subj01 nsdgeneral's count) written with `write_roi`
and read back with `read_roi`. The process is pinned to one core (every thread, the zmq I/O and
decode threads included) and BLAS and torch run one thread each.

(1) The service's per-message path called directly, stage by stage: protocol `decode` of the
encoded frames, `JournalWriter.append` (fsync "never", then "always", to a temp dir on the local
disk), `Admission.judge` (with `SubjectRois.read_volume`: ROI masking, NaN check), encoding
the ack, and `RunPipeline.use_volume` (the incremental GLM). (2) A `RealtimeService` in a thread
of this process, with the real `TorchBackend` on the tiny model sized to the ROI (no prior, no
images, no retrieval bank), fed from a child process on another core: (a) `replay()` at max speed,
for the ingest rate, (b) a paced DEALER, one message every --pace-ms, for the time from send to
ack with nothing queued. Both report the service's own per-trial timings from results.jsonl.
(3) The overhead as a fraction of the 1333-ms TR.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/realtime_loop_overhead.py [--runs 2] [--core 1]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import zmq
from threadpoolctl import threadpool_info, threadpool_limits

from mindeye.journal import JournalWriter, read_journal
from mindeye.models import build_model
from mindeye.nsd import RoiMask, read_roi
from mindeye.nsd.design import IMAGE_SECONDS, TRIAL_SECONDS
from mindeye.nsd.files import write_roi
from mindeye.protocol import Ack, Event, Stamper, Verdict, Volume, decode, encode, recv, volume_sender
from realtime.admission import AddEvents, Admission, FinishRun, RunKey, StartRun, UseVolume
from realtime.backends import TorchBackend
from realtime.decoder import Arrival
from realtime.glm import OnlineGLMSettings
from realtime.pipeline import RunPipeline, SubjectRois
from realtime.service import JOURNAL_FILE, RESULTS_FILE, RealtimeService, ServiceSettings
from simulators.replay.sender import replay
from simulators.replay.sources import Outgoing, run_messages

GRID = (81, 104, 83)  # NSD func1pt8mm
VOXEL_MM = 1.8
TR_S = 4.0 / 3.0
NSD_VOLUMES = 226
NSD_ROI_VOXELS = 15724  # subj01 nsdgeneral
FIRST_SLOT = 3  # the first image comes 12 s after the start
IMAGES_PER_SLOT = 62 / 68  # NSD: 62-63 images in the 68 slots a run can use
SUBJECT = "subj01"
SERVICE_DEFAULTS = ServiceSettings(Path("."))
STAGES = ("decode", "journal", "judge", "inspect", "ack", "glm", "total")
RESULT_STAGES = ("receive", "journal", "glm", "queue", "decode", "end_to_end")


# ---- one core ---------------------------------------------------------------------------------------

def pin_to_core(core: int) -> None:
    """Every thread of this process on `core`; threads started later inherit it from their creator."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {core})


def threads_off_core(core: int) -> tuple[int, list[int]]:
    """(threads of this process, the ids of those allowed on another core)."""
    tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    return len(tids), [tid for tid in tids if os.sched_getaffinity(tid) != {core}]


def filesystem_of(path: Path) -> str:
    """'fstype on device' of the mount holding `path`, from /proc/mounts."""
    path_str, best = os.path.realpath(path), ("", "?", "?")
    with open("/proc/mounts") as mounts:
        for device, mount_point, fstype, *_ in (line.split() for line in mounts):
            inside = path_str == mount_point or path_str.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best[0]):
                best = (mount_point, device, fstype)
    return f"{best[2]} on {best[1]}"


# ---- synthetic NSD-size data --------------------------------------------------------------------------

def nsd_affine() -> np.ndarray:
    """(4, 4) voxel -> mm, 1.8-mm voxels centred on the grid."""
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -VOXEL_MM * (np.array(GRID) - 1) / 2
    return affine


def make_roi(n_voxels: int, directory: Path) -> RoiMask:
    """The `n_voxels` voxels nearest the centre of an ellipsoid in the back of the grid (where
    nsdgeneral lies), inside a brain ellipsoid; written as NSD writes an ROI and read back."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in GRID), indexing="ij")
    brain_xyz = ((x - 40) / 36) ** 2 + ((y - 52) / 48) ** 2 + ((z - 40) / 36) ** 2 <= 1
    if not 1 <= n_voxels <= brain_xyz.sum() // 2:
        raise ValueError(f"--roi-voxels must be in [1, {brain_xyz.sum() // 2}], got {n_voxels}")
    distance_xyz = ((x - 40) / 30) ** 2 + ((y - 25) / 18) ** 2 + ((z - 38) / 22) ** 2
    distance_xyz[~brain_xyz] = np.inf
    mask_xyz = np.zeros(GRID, dtype=bool)
    mask_xyz.flat[np.argsort(distance_xyz, axis=None, kind="stable")[:n_voxels]] = True
    path = directory / "roi.nii.gz"
    write_roi(path, mask_xyz, nsd_affine(), brain_xyz)
    roi = read_roi(path)
    assert roi.n_voxels == n_voxels
    return roi


def run_schedule(run: int, n_volumes: int, seed: int) -> tuple[Event, ...]:
    """NSD timing: 3-s images in 4-s slots from 12 s on, ~92 % of the slots whose response (onset
    + 20 s) fits in the run; 62 trials in odd runs and 63 in even ones of 226 volumes."""
    last_slot = int((n_volumes * TR_S - 20.0) // TRIAL_SECONDS)
    slots = np.arange(FIRST_SLOT, last_slot + 1)
    if slots.size == 0:
        raise ValueError(f"--volumes {n_volumes} is too short for one trial (at least 24 volumes)")
    n_trials = min(slots.size, max(1, round(slots.size * IMAGES_PER_SLOT) + (run % 2 == 0)))
    rng = np.random.default_rng([seed, run])
    chosen = np.sort(rng.choice(slots, n_trials, replace=False))
    image_ids = rng.choice(73000, n_trials, replace=False)
    return tuple(Event(trial, float(slot * TRIAL_SECONDS), IMAGE_SECONDS, int(image_id), "image")
                 for trial, (slot, image_id) in enumerate(zip(chosen, image_ids)))


def run_volumes(run: int, n_volumes: int, seed: int) -> np.ndarray:
    """int16 (X, Y, Z, T): a fixed image around 1000 (sd 50) plus 1 % noise per volume."""
    rng = np.random.default_rng([seed, run, 1])
    base_xyz = 1000 + 50 * rng.standard_normal(GRID, dtype=np.float32)
    volumes_txyz = np.empty((n_volumes, *GRID), dtype=np.int16)
    for t in range(n_volumes):
        np.rint(base_xyz + 10 * rng.standard_normal(GRID, dtype=np.float32), out=volumes_txyz[t], casting="unsafe")
    return volumes_txyz.transpose(1, 2, 3, 0)  # a view: run_messages copies each volume out in C order


def run_plan(run: int, n_volumes: int, seed: int, session: str, affine: np.ndarray, start_s: float = 0.0
             ) -> list[Outgoing]:
    """One run as the scanner side sends it: run_start, the schedule, the volumes, run_end."""
    return run_messages(run_volumes(run, n_volumes, seed), tr_s=TR_S, affine=affine,
                        events=run_schedule(run, n_volumes, seed), session=session, subject=SUBJECT, run=run,
                        start_s=start_s)


# ---- (1) the per-message path, stage by stage ----------------------------------------------------------

class IngestPath:
    """What `RealtimeService._receive` and `_process` do with a message, each stage timed (ms per volume)."""

    def __init__(self, rois: SubjectRois, journal_path: Path, fsync: str, betas_dir: Path):
        self.rois, self.betas_dir = rois, betas_dir
        self.admission = Admission(rois.check_run, rois.read_volume, SERVICE_DEFAULTS.gap_wait_s)
        self.journal = JournalWriter(journal_path, fsync=fsync)
        self.pipelines: dict[RunKey, RunPipeline] = {}
        self.stamper = Stamper()
        self.ms = {stage: [] for stage in STAGES}
        self.run_end_ms: list[float] = []

    def feed(self, frames: list[bytes]) -> None:
        started_s, arrived_unix_s = time.perf_counter(), time.time()
        message = decode(frames)
        decoded_s = time.perf_counter()
        self.journal.append(frames, arrived_unix_s)
        journaled_s = time.perf_counter()
        arrival = Arrival(started_s, (decoded_s - started_s) * 1000, (journaled_s - decoded_s) * 1000)
        judgement, steps = self.admission.judge(message, arrived_unix_s, arrival)
        judged_s = time.perf_counter()
        encode(Ack(message.envelope.seq, judgement.verdict, judgement.reason, judgement.detail,
                   self.stamper.envelope()))  # what `send` does before the socket
        acked_s = time.perf_counter()
        glm_ms = self._process(steps)
        done_s = time.perf_counter()
        if judgement.verdict != Verdict.ACCEPTED:
            raise RuntimeError(f"{message.TYPE} seq {message.envelope.seq} was {judgement.verdict}: "
                               f"{judgement.detail}")
        if isinstance(message, Volume):
            for stage, ms in zip(STAGES, ((decoded_s - started_s) * 1000, (journaled_s - decoded_s) * 1000,
                                          (judged_s - journaled_s) * 1000, self._inspect_ms(message),
                                          (acked_s - judged_s) * 1000, glm_ms, (done_s - started_s) * 1000)):
                self.ms[stage].append(ms)
        elif any(isinstance(step, FinishRun) for step in steps):
            self.run_end_ms.append((done_s - started_s) * 1000)

    def _inspect_ms(self, message: Volume) -> float:
        """The ROI masking and NaN check alone (a second call, outside the stages' clocks)."""
        started_s = time.perf_counter()
        self.rois.read_volume(message)
        return (time.perf_counter() - started_s) * 1000

    def _process(self, steps) -> float:
        """The service's `_process` without the decode thread; returns the GLM's ms."""
        glm_ms = 0.0
        for step in steps:
            if isinstance(step, StartRun):
                settings = OnlineGLMSettings(step.run.tr_s, **SERVICE_DEFAULTS.glm, grace_volumes=1)
                self.pipelines[step.run.key] = RunPipeline(step.run, self.rois.n_voxels(step.run.subject), settings)
            elif isinstance(step, AddEvents):
                self.pipelines[step.run.key].add_events(step.events)
            elif isinstance(step, UseVolume):
                started_s = time.perf_counter()
                self.pipelines[step.run.key].use_volume(step.index, step.payload)
                glm_ms += (time.perf_counter() - started_s) * 1000
            elif isinstance(step, FinishRun):
                pipeline = self.pipelines.pop(step.run.key)
                pipeline.finish()
                pipeline.save(self.betas_dir / f"{step.run.session}_run-{step.run.run:02d}.npz")
        return glm_ms

    def close(self) -> None:
        self.journal.close()


def measure_stages(args, rois: RoiMask, work_dir: Path) -> dict[str, IngestPath]:
    """Each run through both journal policies, each with its own journal and state."""
    subject_rois = SubjectRois({SUBJECT: rois})
    paths = {fsync: IngestPath(subject_rois, work_dir / f"stages-{fsync}.mej", fsync, work_dir / f"betas-{fsync}")
             for fsync in ("never", "always")}
    stamper = Stamper()
    for run in range(1, args.runs + 1):
        plan = run_plan(run, args.volumes, args.seed, "bench-stages", rois.affine)
        encoded = [encode(replace(item.message, envelope=stamper.envelope())) for item in plan]
        for path in paths.values():
            for frames in encoded:
                path.feed(frames)
            os.sync()  # the next pass's fsyncs should not wait for this pass's dirty pages
    for path in paths.values():
        path.close()
    return paths


# ---- (2) the service end to end -----------------------------------------------------------------------

@dataclass
class PlannedRuns:
    """A replay Source over runs built beforehand, so building them is not timed as sending."""

    plans: list[list[Outgoing]]

    def runs(self):
        yield from self.plans


def sender_process(connection, core: int, n_volumes: int, n_runs: int, seed: int, affine: list) -> None:
    """The scanner side, in a child process on its own core: answers ("max", endpoint) with replay()'s
    summary and ("paced", endpoint, pace_ms) with the send -> ack ms of each message."""
    pin_to_core(core)
    affine = np.array(affine)
    plans, start_s = [], 0.0
    for run in range(1, n_runs + 1):
        plans.append(run_plan(run, n_volumes, seed, "bench-max", affine, start_s))
        start_s = plans[-1][-1].at_s
    paced_plan = run_plan(1, n_volumes, seed, "bench-paced", affine)
    connection.send("ready")
    while (request := connection.recv())[0] != "done":
        if request[0] == "max":
            summary = replay(PlannedRuns(plans), request[1], speed="max", ack_wait_s=120.0)
            connection.send({"elapsed_s": summary.elapsed_s, "sent": dict(summary.sent), "acks": dict(summary.acks),
                             "unacked": summary.unacked})
        else:
            connection.send(paced_send(paced_plan, request[1], request[2] / 1000))


def paced_send(plan: list[Outgoing], endpoint: str, pace_s: float) -> list[tuple[str, float]]:
    """One message every `pace_s` over a DEALER, each timed from its send to its ack: [(type, ms)]."""
    context = zmq.Context()
    socket = volume_sender(context, endpoint)
    stamper, timed = Stamper(), []
    started_s = time.perf_counter()
    try:
        for i, item in enumerate(plan):
            time.sleep(max(0.0, started_s + i * pace_s - time.perf_counter()))
            envelope = stamper.envelope()
            frames = encode(replace(item.message, envelope=envelope))
            sent_s = time.perf_counter()
            socket.send_multipart(frames, copy=False)
            ack = recv(socket, 10_000)
            acked_s = time.perf_counter()
            if not isinstance(ack, Ack) or ack.acked_seq != envelope.seq or ack.verdict != Verdict.ACCEPTED:
                raise RuntimeError(f"{item.type} {item.index}: expected an accepting ack, got {ack}")
            timed.append((item.type, (acked_s - sent_s) * 1000))
    finally:
        socket.close()
        context.term()
    return timed


class ServiceThread:
    """A RealtimeService on free loopback ports, in a thread of this (pinned) process."""

    def __init__(self, out_dir: Path, backend: TorchBackend, rois: RoiMask, fsync: str):
        self.out_dir = out_dir
        settings = ServiceSettings(out_dir, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", journal_fsync=fsync)
        self.service = RealtimeService(settings, backend, SubjectRois({SUBJECT: rois}), context=zmq.Context())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.service.run, args=(self.stop,), name="ingest", daemon=True)
        self.thread.start()
        if not self.service.ready.wait(60):
            raise RuntimeError("the realtime service did not start within 60 s")

    def results(self) -> list[dict]:
        path = self.out_dir / RESULTS_FILE
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def wait_for_results(self, n: int, timeout_s: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.results()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.results()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(120)
        self.service.context.term()


def tiny_backend(n_voxels: int) -> TorchBackend:
    """The real torch backend on the tiny model config with an aligner for `n_voxels`; random weights and
    calibration (the decode's cost, not its quality, matters here)."""
    torch.manual_seed(0)
    model = build_model("tiny", voxels_per_subject={SUBJECT: n_voxels})
    rng = np.random.default_rng(0)
    calibration = {SUBJECT: (rng.normal(0, 0.1, n_voxels).astype(np.float32),
                             rng.uniform(1, 2, n_voxels).astype(np.float32))}
    return TorchBackend(model, calibration, bank=None, codec=None, prior_steps=0)


def volume_arrivals(journal_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sent_unix_s, received_unix_s) of every volume record, in arrival order."""
    sent, received = [], []
    for record in read_journal(journal_path):
        message = record.message()
        if isinstance(message, Volume):
            sent.append(message.envelope.sent_unix_s)
            received.append(record.received_unix_s)
    return np.array(sent), np.array(received)


# ---- printing -----------------------------------------------------------------------------------------

def stats(ms) -> tuple[float, float, float]:
    ms = np.asarray(ms, dtype=float)
    return float(np.median(ms)), float(np.percentile(ms, 95)), float(ms.max())


def row(label: str, ms, width: int = 52) -> str:
    median, p95, top = stats(ms)
    return f"  {label:<{width}} {median:8.3f} {p95:8.3f} {top:8.3f}"


def header(width: int = 52, unit: str = "ms") -> str:
    return f"  {'':<{width}} {'median':>8} {'p95':>8} {'max':>8}   ({unit})"


def budget(label: str, ms) -> str:
    median, p95, top = stats(ms)
    tr_ms = TR_S * 1000
    return (f"  {label}: median {median:.2f} ms = {100 * median / tr_ms:.2f} % of the TR, p95 {p95:.2f} ms = "
            f"{100 * p95 / tr_ms:.2f} %, max {top:.2f} ms = {100 * top / tr_ms:.2f} %")


def print_results_timings(results: list[dict]) -> None:
    timed = [r for r in results if "end_to_end" in r["timings_ms"] and "skipped" not in r["flags"]]
    flags = {flag: sum(flag in r["flags"] for r in results) for flag in ("skipped", "late")}
    print(f"  results.jsonl: {len(results)} trials published, {len(timed)} decoded and timed, "
          f"{flags['skipped']} skipped, {flags['late']} late; per trial:")
    print(header(24))
    for stage in RESULT_STAGES:
        values = [r["timings_ms"][stage] for r in timed if stage in r["timings_ms"]]
        if values:
            print(row(stage, values, 24))


# ---- main ---------------------------------------------------------------------------------------------

def part_stages(args, rois: RoiMask, work_dir: Path) -> dict[str, list[float]]:
    started = time.perf_counter()
    paths = measure_stages(args, rois, work_dir)
    n = len(paths["never"].ms["total"])
    print(f"\n(1) the service's per-message path called directly: {args.runs} run(s) x {args.volumes} volumes, "
          f"each run once per journal policy ({time.perf_counter() - started:.0f} s)")
    print(f"    ms per volume message ({n} per policy); journal in {work_dir} ({filesystem_of(work_dir)})")
    print(header())
    pooled = {stage: paths["never"].ms[stage] + paths["always"].ms[stage] for stage in STAGES}
    print(row("protocol decode", pooled["decode"]))
    print(row("journal append, fsync never", paths["never"].ms["journal"]))
    print(row("journal append, fsync always", paths["always"].ms["journal"]))
    print(row("admission judge (incl. SubjectRois.read_volume)", pooled["judge"]))
    print(row("  of which read_volume: ROI mask, NaN check", pooled["inspect"]))
    print(row("ack encode", pooled["ack"]))
    print(row("GLM update (RunPipeline.use_volume)", pooled["glm"]))
    print(row("total, fsync never (arrival to GLM done)", paths["never"].ms["total"]))
    print(row("total, fsync always", paths["always"].ms["total"]))
    print(row("arrival to ack encoded, fsync always", np.add.reduce(
        [paths["always"].ms[s] for s in ("decode", "journal", "judge", "ack")])))
    print("    per run, the run_end message (GLM finish + betas .npz saved): "
          + ", ".join(f"{np.median(p.run_end_ms):.1f} ms ({fsync})" for fsync, p in paths.items()))
    return {fsync: p.ms["total"] for fsync, p in paths.items()}


def part_service(args, rois: RoiMask, work_dir: Path, sender_core: int) -> tuple[list[float], list[float]]:
    n_trials_max = sum(len(run_schedule(run, args.volumes, args.seed)) for run in range(1, args.runs + 1))
    n_trials_paced = len(run_schedule(1, args.volumes, args.seed))
    backend = tiny_backend(rois.n_voxels)
    spawn = multiprocessing.get_context("spawn")
    parent_end, child_end = spawn.Pipe()
    sender = spawn.Process(target=sender_process, name="sender", daemon=True,
                           args=(child_end, sender_core, args.volumes, args.runs, args.seed, rois.affine.tolist()))
    sender.start()
    try:
        if not parent_end.poll(300) or parent_end.recv() != "ready":
            raise RuntimeError("the sender process did not build its runs within 300 s")
        same_core = "the same core as the service" if sender_core == args.core else f"core {sender_core}"
        print(f"\n(2) RealtimeService in a thread of this process, TorchBackend on the tiny model ({rois.n_voxels} "
              f"voxels, prior_steps 0, no bank, no images), journal fsync {args.fsync}; its ingest, decode and zmq I/O "
              f"threads share core {args.core}; the sender is a child process on {same_core}")

        os.sync()
        service = ServiceThread(work_dir / "service-max", backend, rois, args.fsync)
        try:
            parent_end.send(("max", service.service.volumes_endpoint))
            summary = parent_end.recv()
            results = service.wait_for_results(n_trials_max)
            n_threads, off_core = threads_off_core(args.core)
        finally:
            service.close()
        sent_s, received_s = volume_arrivals(service.out_dir / JOURNAL_FILE)
        period_ms = np.diff(received_s) * 1000
        print(f"(2a) replay() at max speed: {args.runs} run(s), {summary['sent']} sent in "
              f"{summary['elapsed_s']:.2f} s; acks {summary['acks']}, {summary['unacked']} unacked")
        print(f"  ingest rate: {(len(received_s) - 1) / (received_s[-1] - received_s[0]):.0f} volumes/s (first to "
              f"last volume arrival at the ROUTER); the sender was up to {np.max(received_s - sent_s):.2f} s ahead, "
              f"so the loop set the pace")
        print(f"  this process had {n_threads} threads during the run, "
              + (f"all pinned to core {args.core}" if not off_core else f"{len(off_core)} NOT on core {args.core}"))
        print(header(44))
        print(row("time between volume arrivals (loop period)", period_ms, 44))
        print_results_timings(results)

        os.sync()
        service = ServiceThread(work_dir / "service-paced", backend, rois, args.fsync)
        try:
            parent_end.send(("paced", service.service.volumes_endpoint, args.pace_ms))
            timed = parent_end.recv()
            results = service.wait_for_results(n_trials_paced)
        finally:
            service.close()
        send_to_ack_ms = [ms for kind, ms in timed if kind == Volume.TYPE]
        print(f"(2b) a paced DEALER, one message every {args.pace_ms:g} ms (nothing queued), 1 run of "
              f"{args.volumes} volumes:")
        print(header(44))
        print(row("volume send -> ack (loopback, both ways)", send_to_ack_ms, 44))
        print_results_timings(results)
        parent_end.send(("done",))
        sender.join(30)
    finally:
        if sender.is_alive():
            sender.terminate()
    return period_ms.tolist(), send_to_ack_ms


def main() -> None:
    available = sorted(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--volumes", type=int, default=NSD_VOLUMES, help=f"volumes per run (default {NSD_VOLUMES})")
    parser.add_argument("--runs", type=int, default=2, help="runs in (1) and in (2a) (default 2)")
    parser.add_argument("--roi-voxels", type=int, default=NSD_ROI_VOXELS,
                        help=f"ROI voxels (default {NSD_ROI_VOXELS}, NSD subj01 nsdgeneral)")
    parser.add_argument("--core", type=int, default=available[-1],
                        help=f"the core this process runs on (default {available[-1]}; available {available})")
    parser.add_argument("--fsync", choices=("always", "never"), default=SERVICE_DEFAULTS.journal_fsync,
                        help="the service's journal policy in (2) (default: the service's, "
                             f"{SERVICE_DEFAULTS.journal_fsync}); (1) times both")
    parser.add_argument("--pace-ms", type=float, default=25.0, help="send interval of the paced sender in (2b)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic runs")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the journals go (default: the system's)")
    args = parser.parse_args()
    if args.core not in available:
        parser.error(f"--core {args.core} is not available to this process (available {available})")
    if args.volumes < 24 or args.runs < 1 or args.pace_ms <= 0:
        parser.error("--volumes must be >= 24, --runs >= 1, --pace-ms > 0")
    sender_core = next((core for core in available if core != args.core), args.core)

    pin_to_core(args.core)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with threadpool_limits(limits=1), tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        work_dir = Path(tmp)
        blas = ", ".join(f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info())
        print(f"$ OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')} python "
              f"benchmarks/realtime_loop_overhead.py {' '.join(sys.argv[1:])}".rstrip())
        print(time.strftime("%a %b %d %H:%M:%S %Z %Y"))
        print(f"one core: the process pinned to core {args.core} with os.sched_setaffinity (every thread), "
              f"thread pools limited to 1 with threadpoolctl ({blas}), torch {torch.get_num_threads()} thread; "
              f"{os.cpu_count()} cores on this machine, load average {os.getloadavg()[0]:.2f}")
        rois = make_roi(args.roi_voxels, work_dir)
        print(f"volumes {'x'.join(map(str, GRID))} int16 ({np.prod(GRID) * 2 / 1e6:.2f} MB), TR {TR_S:.3f} s, "
              f"ROI {rois.n_voxels} voxels, {args.volumes} volumes a run, trials a run: "
              f"{[len(run_schedule(run, args.volumes, args.seed)) for run in range(1, args.runs + 1)]}")
        totals = part_stages(args, rois, work_dir)
        period_ms, send_to_ack_ms = part_service(args, rois, work_dir, sender_core)

    print(f"\n(3) the budget: a TR is {TR_S * 1000:.0f} ms")
    print(budget("(1) per volume, fsync never ", totals["never"]))
    print(budget("(1) per volume, fsync always", totals["always"]))
    print(budget(f"(2a) loop period, fsync {args.fsync}", period_ms))
    print(budget(f"(2b) send -> ack, fsync {args.fsync}", send_to_ack_ms))


if __name__ == "__main__":
    main()
