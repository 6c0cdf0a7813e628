"""Soak: a whole NSD session through the realtime service at 50x speed with a fault mix; does its memory
stay put and its per-trial latency stay flat from the first run to the last?

Issue 9's target: 12 runs x 226 volumes at NSD size, 50x speed, faults: RSS growth under 5 % and
per-trial latency flat from first run to last.

The source (`NSDSizeSource`) synthesizes the volumes as it goes, nothing is written but the service's
own files: 81 x 104 x 83 volumes (1.8 mm; int16, or float32 with --dtype), TR 4/3 s, NSD's design
(a 3-s image every 4 s from 12 s on, 62 or 63 image trials and a few blank ones per run of 226
volumes): a fixed brain image around 1000 plus 1 % noise per volume, and inside a ball-shaped ROI
of 15,724 voxels (subj01 nsdgeneral's count) each image trial's own random pattern (s.d. 2 % at the peak)
times its canonical response. The model is the tiny config, randomly initialised, its aligner
sized to the ROI, with random calibration statistics and a random retrieval bank of 1,000 images
(decode cost is not the point here; the service's bookkeeping is).

The service runs in a child process (`--serve`, the same RealtimeService as `mindeye-realtime`,
built on this ROI), so that its RSS is its own: read from /proc/<pid>/status (VmRSS, and VmHWM,
the peak) at the end of each run, i.e. once every image trial of the run is in results.jsonl and
its betas file is written. Each run is replayed by its own `replay()` call (a new sender, as a
scanner-side bridge restarted between runs) with the fault mix below; the run with the sender restart
is the middle one. Per run: acks by verdict, the results' flags, end_to_end median/p95 (decoded
trials; not skipped ones). The service's gap wait is one TR divided by the speed (--gap-wait-s), so
that a missing volume holds the run as long, in volumes, as it would live.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/soak.py            # 12 runs x 226 volumes at 50x
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/soak.py --quick    # 2 runs x 60 volumes
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# Heavy imports (torch, the service) happen inside the functions that need them: --help stays fast.

REPO = Path(__file__).resolve().parents[1]
GRID = (81, 104, 83)  # NSD func1pt8mm
VOXEL_MM = 1.8
TR_S = 4.0 / 3.0
NSD_VOLUMES = 226
NSD_ROI_VOXELS = 15724  # subj01 nsdgeneral
SUBJECT = "subj01"
SLOT_S, IMAGE_S, FIRST_SLOT = 4.0, 3.0, 3  # NSD: a 3-s image every 4 s, the first ~12 s into the run
IMAGE_FRACTION = 62 / 69  # NSD: 62-63 image trials in the 69 slots whose response fits in a 226-volume run
SIGNAL_PCT = 2.0
STAGES = ("journal", "glm", "queue", "decode")  # the end_to_end's parts worth a column (receive, publish: ~0.1 ms)
N_CANDIDATES = 1000  # NSD's shared images
FAULT_MIX = {  # per run; times are scan time (divided by the speed like everything else)
    "drop": {"probability": 0.01},
    "duplicate": {"probability": 0.02, "after_s": 0.1},
    "reorder": {"probability": 0.02, "window": 1},
    "delay": {"probability": 0.01, "delay_s": 2.0},  # > one TR: mostly refused too_late
    "jitter": {"max_s": 0.2},
    "corrupt": {"probability": 0.005},  # not_json
    "truncate": {"probability": 0.005},  # frame_size
}


# ---- the NSD-size world -------------------------------------------------------------------------------

def nsd_affine() -> np.ndarray:
    """(4, 4) voxel -> mm, 1.8-mm voxels centred on the grid."""
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -VOXEL_MM * (np.array(GRID) - 1) / 2
    return affine


def brain_mask() -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(n) for n in GRID), indexing="ij")
    return ((x - 40) / 36) ** 2 + ((y - 52) / 48) ** 2 + ((z - 40) / 36) ** 2 <= 1


def make_roi(directory: Path, n_voxels: int = NSD_ROI_VOXELS):
    """A ball: the `n_voxels` brain voxels nearest a point in the back of the brain (where nsdgeneral
    lies), written as NSD writes an ROI (roi.nii.gz) and read back as the service reads one."""
    from mindeye.nsd import read_roi
    from mindeye.nsd.files import write_roi

    brain_xyz = brain_mask()
    x, y, z = np.meshgrid(*(np.arange(n) for n in GRID), indexing="ij")
    distance_xyz = ((x - 40.0) ** 2 + (y - 25.0) ** 2 + (z - 38.0) ** 2).astype(float)
    distance_xyz[~brain_xyz] = np.inf
    mask_xyz = np.zeros(GRID, dtype=bool)
    mask_xyz.flat[np.argsort(distance_xyz, axis=None, kind="stable")[:n_voxels]] = True
    directory.mkdir(parents=True, exist_ok=True)
    write_roi(directory / "roi.nii.gz", mask_xyz, nsd_affine(), brain_xyz)
    return read_roi(directory / "roi.nii.gz")


def run_events(run: int, n_volumes: int, seed: int):
    """NSD's timing: slots of 4 s from 12 s on whose response (onset + 16 s) fits in the run; ~90 % of
    them an image (one more in even runs: 62 / 63 at 226 volumes), the rest blank trials."""
    from mindeye.protocol import Event

    slots = np.arange(FIRST_SLOT, int((n_volumes * TR_S - 16.0) // SLOT_S) + 1)
    if slots.size == 0:
        raise ValueError(f"{n_volumes} volumes hold no trial (at least 22 are needed)")
    n_images = min(slots.size, max(1, round(slots.size * IMAGE_FRACTION) + (run % 2 == 0)))
    rng = np.random.default_rng([seed, run, 0])
    is_image = np.zeros(slots.size, dtype=bool)
    is_image[rng.choice(slots.size, n_images, replace=False)] = True
    image_ids = iter(rng.choice(73000, n_images, replace=False).tolist())
    return tuple(Event(trial, float(slot * SLOT_S), IMAGE_S, next(image_ids) if image else None,
                       "image" if image else "blank")
                 for trial, (slot, image) in enumerate(zip(slots, is_image)))


@dataclass(frozen=True)
class NSDSizeSource:
    """A replay source (`runs()`, see simulators.replay.sources) of NSD-size runs synthesized on the fly:
    one run's volumes are in memory at a time (226 x 1.4 MB int16), none on disk. Deterministic from
    (seed, run): a resent run is the same bytes."""

    roi: object  # mindeye.nsd.RoiMask
    run_numbers: tuple[int, ...]
    n_volumes: int = NSD_VOLUMES
    seed: int = 0
    session: str = "subj01-soak"
    dtype: str = "int16"

    def events(self, run: int):
        return run_events(run, self.n_volumes, self.seed)

    def runs(self):
        start_s = 0.0
        for run in self.run_numbers:
            plan = self.run_plan(run, start_s)
            yield plan
            start_s = plan[-1].at_s

    def run_plan(self, run: int, start_s: float = 0.0) -> list:
        from mindeye.protocol import Events, RunEnd, RunStart, Volume
        from realtime.glm import trial_response
        from simulators.replay.sources import UNSENT, Outgoing

        affine, events = self.roi.affine, self.events(run)
        brain_xyz = brain_mask()
        rng = np.random.default_rng([self.seed, run, 1])
        base_b = (1000 + 50 * rng.standard_normal(int(brain_xyz.sum()), dtype=np.float32))
        roi_in_brain = np.flatnonzero(self.roi.mask_xyz[brain_xyz])  # the ROI's voxels among the brain's
        responses = []  # (first volume, response (R,), pattern (V,)) per image trial
        for event in events:
            if event.label != "blank":
                first, response_r = trial_response(event.onset_s, event.duration_s, TR_S)
                pattern_v = (SIGNAL_PCT / 100 * 1000 * rng.standard_normal(roi_in_brain.size)).astype(np.float32)
                responses.append((first, (response_r / response_r.max()).astype(np.float32), pattern_v))
        where = dict(session=self.session, run=run)
        plan = [Outgoing(start_s, RunStart.TYPE, self.session, run, None,
                         RunStart(self.session, SUBJECT, run, TR_S, self.n_volumes, self.dtype, GRID, affine, UNSENT)),
                Outgoing(start_s, Events.TYPE, self.session, run, None,
                         Events(**where, events=events, complete=True, envelope=UNSENT))]
        volume_xyz = np.zeros(GRID, dtype=self.dtype)
        for t in range(self.n_volumes):
            values_b = base_b + 10 * rng.standard_normal(base_b.size, dtype=np.float32)
            for first, response_r, pattern_v in responses:
                if first <= t < first + response_r.size:
                    values_b[roi_in_brain] += response_r[t - first] * pattern_v
            volume_xyz[brain_xyz] = np.rint(values_b) if self.dtype == "int16" else values_b
            plan.append(Outgoing(start_s + (t + 1) * TR_S, Volume.TYPE, self.session, run, t,
                                 Volume.from_array(volume_xyz, **where, subject=SUBJECT, index=t, acq_time_s=t * TR_S,
                                                   tr_s=TR_S, affine=affine, envelope=UNSENT)))
        plan.append(Outgoing(start_s + self.n_volumes * TR_S, RunEnd.TYPE, self.session, run, None,
                             RunEnd(**where, n_volumes=self.n_volumes, envelope=UNSENT)))
        return plan


def make_checkpoint(directory: Path, n_voxels: int) -> Path:
    """The tiny model, randomly initialised, its aligner taking `n_voxels`; random calibration."""
    import torch

    from mindeye.models import build_model, save_calibration, save_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny", voxels_per_subject={SUBJECT: n_voxels})
    path = save_checkpoint(model, directory)
    rng = np.random.default_rng(0)
    save_calibration(path, {SUBJECT: (rng.normal(0, 0.1, n_voxels).astype(np.float32),
                                      rng.uniform(1, 2, n_voxels).astype(np.float32))},
                     units="percent_signal_change", estimator="random")  # stands in for a live one
    return path


# ---- the service, in a process of its own -------------------------------------------------------------

def serve(args) -> None:
    """`--serve`: the RealtimeService on <work-dir>/roi.nii.gz and <work-dir>/checkpoint until SIGINT/SIGTERM."""
    import threading

    import torch

    from mindeye.models import read_checkpoint_config
    from mindeye.nsd import read_roi
    from mindeye.bank import ExactBank
    from realtime.backends import TorchBackend
    from mindeye.cli import log_to
    from realtime.pipeline import SubjectRois
    from realtime.service import RealtimeService, ServiceSettings

    torch.set_num_threads(1)  # as configs/realtime.yaml: ingest keeps a core
    log_to(args.out_dir / "service.log", "INFO")
    checkpoint = args.work_dir / "checkpoint"
    config, _ = read_checkpoint_config(checkpoint)
    rng = np.random.default_rng(0)
    bank = ExactBank(np.sort(rng.choice(73000, N_CANDIDATES, replace=False)),
                         rng.standard_normal((N_CANDIDATES, config.clip_tokens, config.clip_dim), dtype=np.float32))
    backend = TorchBackend.from_checkpoint(checkpoint, bank=bank, prior_steps=args.prior_steps, prior_sampler="dpmpp")
    defaults = ServiceSettings(args.out_dir)
    settings = replace(defaults, volumes_endpoint=f"tcp://127.0.0.1:{args.port}",
                       results_endpoint=f"tcp://127.0.0.1:{args.port + 1}", journal_fsync=args.fsync,
                       gap_wait_s=args.gap_wait_s,
                       max_pending=args.max_pending or defaults.max_pending)
    service = RealtimeService(settings, backend, SubjectRois({SUBJECT: read_roi(args.work_dir / "roi.nii.gz")}))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    service.run(stop)


def service_command(work_dir: Path, out_dir: Path, port: int, *, prior_steps: int, fsync: str,
                    gap_wait_s: float | None, max_pending: int | None = None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--work-dir", str(work_dir),
               "--out-dir", str(out_dir), "--port", str(port), "--prior-steps", str(prior_steps), "--fsync", fsync]
    if gap_wait_s is not None:
        command += ["--gap-wait-s", repr(gap_wait_s)]
    if max_pending is not None:
        command += ["--max-pending", str(max_pending)]
    return command


def start_service(command: list[str], console: Path) -> subprocess.Popen:
    """The service's console output goes to `console` (appended; a pipe nobody reads could fill up)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(console, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def wait_listening(out_dir: Path, process: subprocess.Popen, life: int, console: Path, timeout_s: float = 300.0
                   ) -> float:
    """Seconds until the service's `life`-th start (1, 2, ...) logs that it listens."""
    started = time.monotonic()
    while time.monotonic() < started + timeout_s:
        log = out_dir / "service.log"
        if log.is_file() and log.read_text().count("listening for volumes") >= life:
            return time.monotonic() - started
        if process.poll() is not None:
            raise RuntimeError(f"the service exited ({process.returncode}): {console.read_text()[-3000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"the service did not listen within {timeout_s:.0f} s; see {console}")


def stop_service(process: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """SIGINT (a clean stop: the decode queue drains, the latency report is written); SIGKILL if it hangs."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def free_port_pair() -> int:
    """A port p with p + 1 free too (volumes on p, results on p + 1)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) and open file descriptors of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


def read_results(out_dir: Path) -> list[dict]:
    path = out_dir / "results.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return records


def machine_lines() -> list[str]:
    """The date, the CPU and what else ran on it (load average, this process's niceness)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [time.strftime("%a %b %d %H:%M:%S %Z %Y"),
            f"{os.cpu_count()} cores ({cpu}), shared with other jobs: load average {load} at the start; "
            f"niceness {os.nice(0)}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}"]


def command_line(script: str) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ)
    nice = "nice " if os.nice(0) > 0 else ""
    return f"$ {env + ' ' if env else ''}{nice}python benchmarks/{script} {shlex.join(sys.argv[1:])}".rstrip()


class Report:
    """Lines printed as they come and written to a file at the end."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines) + "\n")
        print(f"written to {path}")


# ---- the soak -----------------------------------------------------------------------------------------

def fault_mix(run: int, n_volumes: int, restart_run: int, dtype: str):
    from simulators.replay import Faults

    mix = dict(FAULT_MIX)
    if dtype != "int16":
        mix["nan"] = {"probability": 0.01, "fraction": 0.05}  # NaN needs float volumes
    if run == restart_run:  # the scanner-side sender restarts mid-run and resends its last 5 volumes
        at = n_volumes // 2
        mix["restart"] = {"at_index": at, "resume_from": max(0, at - 5), "downtime_s": 2.0}
    return Faults.from_config(mix)


def acks_text(acks: Counter) -> str:
    """"accepted 224 (out_of_order 3) duplicate 4 rejected 2 (frame_size 2)": reasons beside their verdict."""
    parts = []
    for verdict in ("accepted", "duplicate", "rejected"):
        n = sum(count for key, count in acks.items() if key.split(":")[0] == verdict)
        reasons = ", ".join(f"{key.split(':', 1)[1]} {count}" for key, count in sorted(acks.items())
                            if key.startswith(verdict + ":"))
        parts.append(f"{verdict} {n}" + (f" ({reasons})" if reasons else ""))
    return " ".join(parts)


class ResultsTail:
    """results.jsonl read as it grows: each poll parses only the new lines (the file grows all session)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.records = path, 0, []

    def poll(self) -> list[dict]:
        if self.path.is_file():
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                chunk = file.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
            self.offset += len(complete)
            self.records += [json.loads(line) for line in complete.splitlines() if line.strip()]
        return self.records


def wait_for_run(results: ResultsTail, betas: Path, session: str, run: int, trials: set[int], timeout_s: float
                 ) -> list[dict]:
    """The run's results once every image trial is published and its betas are saved (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = [r for r in results.poll() if r["session"] == session and r["run"] == run]
        if ({r["trial"] for r in got} >= trials and betas.is_file()) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def soak(args, say: Report) -> None:
    from tqdm import tqdm

    from realtime.service import ServiceSettings
    from simulators.replay import replay

    with tempfile.TemporaryDirectory(prefix="soak-", dir=args.tmp_dir) as tmp:
        work_dir = Path(tmp)
        out_dir = work_dir / "service"
        roi = make_roi(work_dir, args.roi_voxels)
        make_checkpoint(work_dir / "checkpoint", roi.n_voxels)
        gap_wait_s = args.gap_wait_s if args.gap_wait_s is not None else TR_S / args.speed
        port = free_port_pair()
        console = work_dir / "service-console.txt"
        process = start_service(service_command(work_dir, out_dir, port, prior_steps=args.prior_steps,
                                                fsync=args.fsync, gap_wait_s=gap_wait_s,
                                                max_pending=args.max_pending), console)
        restart_run = (args.runs + 1) // 2
        source = NSDSizeSource(roi, tuple(range(1, args.runs + 1)), args.volumes, args.seed, dtype=args.dtype)
        say(f"runs: {args.runs} x {args.volumes} volumes {'x'.join(map(str, GRID))} {args.dtype} "
            f"({np.prod(GRID) * np.dtype(args.dtype).itemsize / 1e6:.2f} MB each), TR {TR_S:.3f} s, "
            f"speed {args.speed:g}x (a volume every {TR_S / args.speed * 1000:.1f} ms), image trials per run "
            f"{[sum(e.label != 'blank' for e in source.events(r)) for r in source.run_numbers]}")
        say(f"service: a child process (RealtimeService, tiny model, random weights, ROI {roi.n_voxels} voxels "
            f"(a ball), prior {args.prior_steps} dpmpp steps, retrieval among {N_CANDIDATES} random candidates, "
            f"no images); journal fsync {args.fsync}, gap wait {gap_wait_s * 1000:.1f} ms, "
            f"max_pending {args.max_pending or ServiceSettings(out_dir).max_pending}")
        say(f"faults per run (scan time): {json.dumps(FAULT_MIX)}"
            + (" + nan {probability 0.01}" if args.dtype != "int16" else "")
            + f"; run {restart_run}: the sender restarts at volume {args.volumes // 2} and resends 5 volumes")
        rows = []
        try:
            life_s = wait_listening(out_dir, process, 1, console)
            idle = proc_status(process.pid)
            say(f"the service listened after {life_s:.1f} s (pid {process.pid}); before the first run: RSS "
                f"{idle['VmRSS'] / 1024:.1f} MB, {idle['Threads']} threads, {idle['fds']} open files")
            endpoint = f"tcp://127.0.0.1:{port}"
            results, cpu_before_s = ResultsTail(out_dir / "results.jsonl"), cpu_s(process.pid)
            progress = tqdm(source.run_numbers, desc="soak", unit="run", file=sys.stderr)
            for run in progress:
                started = time.monotonic()
                plan = source.run_plan(run)

                class OneRun:  # the plan built outside replay()'s clock, so building it does not delay sending
                    def runs(self, plan=plan):
                        yield plan

                summary = replay(OneRun(), endpoint, faults=fault_mix(run, args.volumes, restart_run, args.dtype),
                                 seed=args.seed, speed=args.speed, ack_wait_s=10.0)
                del plan, OneRun
                trials = {e.trial for e in source.events(run) if e.label != "blank"}
                got = wait_for_run(results, out_dir / "betas" / f"{source.session}_run-{run:02d}.npz", source.session,
                                   run, trials, timeout_s=120.0)
                status = proc_status(process.pid)
                used_s, cpu_before_s = cpu_s(process.pid) - cpu_before_s, cpu_s(process.pid)
                rows.append(run_row(run, got, trials, summary, status, time.monotonic() - started, used_s))
                progress.set_postfix(rss_mb=f"{status['VmRSS'] / 1024:.0f}",
                                     e2e_ms=f"{rows[-1]['e2e_median']:.0f}")
            progress.close()
        finally:
            code = stop_service(process)
        say(f"the service stopped with exit code {code}")
        report(rows, args, say)


def run_row(run: int, got: list[dict], trials: set[int], summary, status: dict, wall_s: float, cpu_used_s: float
            ) -> dict:
    flags = Counter(flag for r in got for flag in r["flags"])
    timed = [r["timings_ms"] for r in got if "end_to_end" in r["timings_ms"] and "skipped" not in r["flags"]]
    e2e = np.array([t["end_to_end"] for t in timed], dtype=float)
    published = Counter(r["trial"] for r in got)

    def median(stage: str) -> float:
        values = [t[stage] for t in timed if stage in t]
        return float(np.median(values)) if values else float("nan")

    return {"run": run, "trials": len(trials), "published": len(published),
            "missing": len(trials - set(published)), "twice": sum(n > 1 for n in published.values()),
            "skipped": flags["skipped"], "late": flags["late"], "recovered": flags["recovered"],
            "e2e_median": median("end_to_end"),
            "e2e_p95": float(np.percentile(e2e, 95)) if e2e.size else float("nan"),
            "e2e_max": float(e2e.max()) if e2e.size else float("nan"),
            **{f"{stage}_median": median(stage) for stage in STAGES},
            "rss_mb": status["VmRSS"] / 1024, "hwm_mb": status["VmHWM"] / 1024, "threads": status["Threads"],
            "fds": status["fds"], "wall_s": wall_s, "cpu_s": cpu_used_s, "load": os.getloadavg()[0],
            "sent": sum(summary.sent.values()), "acks": acks_text(summary.acks), "unacked": summary.unacked,
            "faults": dict(summary.faults), "restarts": summary.sender_restarts}


def report(rows: list[dict], args, say: Report) -> None:
    say()
    say("per run: trials published, never published (miss), twice, flagged skipped / late; end_to_end over the "
        "decoded trials (median, p95, max) and the medians of its stages journal, glm, queue, decode; the service "
        "process once the run's trials are all published: RSS, peak RSS (VmHWM), threads, open files, CPU seconds "
        "it used during the run; the machine's 1-min load average then; wall: the run synthesized, sent and its "
        "results waited for")
    say(f"{'run':>3} {'trials':>6} {'publ':>4} {'miss':>4} {'2x':>2} {'skip':>4} {'late':>4} {'e2e med':>7} "
        f"{'p95':>6} {'max':>6} {'journ':>5} {'glm':>5} {'queue':>5} {'decod':>5} {'RSS MB':>7} {'peak':>6} "
        f"{'thr':>3} {'fds':>3} {'cpu s':>5} {'load':>4} {'wall s':>6}")
    for r in rows:
        say(f"{r['run']:>3} {r['trials']:>6} {r['published']:>4} {r['missing']:>4} {r['twice']:>2} {r['skipped']:>4} "
            f"{r['late']:>4} {r['e2e_median']:>7.1f} {r['e2e_p95']:>6.1f} {r['e2e_max']:>6.1f} "
            + " ".join(f"{r[f'{stage}_median']:>5.1f}" for stage in STAGES)
            + f" {r['rss_mb']:>7.1f} {r['hwm_mb']:>6.1f} {r['threads']:>3} {r['fds']:>3} {r['cpu_s']:>5.1f} "
            f"{r['load']:>4.1f} {r['wall_s']:>6.1f}")
    say("acks per run (the replayer's count; a sender restart loses the acks still due on its old connection):")
    for r in rows:
        say(f"  run {r['run']:>2}: {r['sent']} sent; {r['acks']}"
            + (f"; {r['unacked']} unacked" if r["unacked"] else "")
            + ("; the sender restarted mid-run" if r["restarts"] else ""))
    faults = Counter()
    for r in rows:
        faults.update(r["faults"])
    say(f"faults injected over the session: {', '.join(f'{k} {n}' for k, n in sorted(faults.items()))}")
    totals = {k: sum(r[k] for r in rows) for k in ("trials", "published", "missing", "twice", "skipped", "late")}
    say(f"trials: {totals['trials']} image trials, {totals['published']} published, {totals['missing']} never "
        f"published, {totals['twice']} published twice, {totals['skipped']} skipped, {totals['late']} late")
    say()
    first, last = rows[0], rows[-1]
    growth = 100 * (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"]
    say(f"RSS growth first->last run: {growth:.1f} % (target < 5 %): {first['rss_mb']:.1f} MB at the end of run "
        f"{first['run']} -> {last['rss_mb']:.1f} MB at the end of run {last['run']}; peak {last['hwm_mb']:.1f} MB")
    if len(rows) > 2:
        second = rows[1]
        slope = np.polyfit([r["run"] for r in rows[1:]], [r["rss_mb"] for r in rows[1:]], 1)[0]
        say(f"  from the end of run 2: {100 * (last['rss_mb'] - second['rss_mb']) / second['rss_mb']:.1f} %; "
            f"{last['rss_mb'] - first['rss_mb']:+.1f} MB in all, a trend of {slope:+.2f} MB per run from run 2 on; "
            "RSS per run: " + ", ".join(f"{r['rss_mb']:.0f}" for r in rows) + " MB")
    say(f"end_to_end median, first run vs last run: {first['e2e_median']:.1f} ms vs {last['e2e_median']:.1f} ms "
        f"(p95 {first['e2e_p95']:.1f} vs {last['e2e_p95']:.1f} ms)")
    medians = np.array([r["e2e_median"] for r in rows])
    if len(rows) > 2 and np.isfinite(medians).all():
        slope = np.polyfit(np.arange(len(rows)), medians, 1)[0]
        say(f"  trend of the per-run medians: {slope:+.2f} ms per run (least squares over {len(rows)} runs); "
            "the service's CPU per run: " + ", ".join(f"{r['cpu_s']:.1f}" for r in rows) + " s")
        # The decode stage is the same work for every trial: when its wall time moves with end_to_end, the
        # latency follows what the machine's other jobs leave to the service, not the run number.
        decode = np.array([r["decode_median"] for r in rows])
        say("  decode median (the same work every trial) per run: " + ", ".join(f"{d:.0f}" for d in decode)
            + f" ms; correlation of the per-run end_to_end and decode medians {np.corrcoef(medians, decode)[0, 1]:.2f},"
            f" of end_to_end and run number {np.corrcoef(medians, np.arange(len(rows)))[0, 1]:.2f}")
    say(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--runs", type=int, default=12, help="runs in the session (default 12, NSD's)")
    parser.add_argument("--volumes", type=int, default=NSD_VOLUMES, help=f"volumes a run (default {NSD_VOLUMES})")
    parser.add_argument("--speed", type=float, default=50.0, help="times real time (default 50)")
    parser.add_argument("--quick", action="store_true", help="2 runs x 60 volumes (a check that it all works)")
    parser.add_argument("--dtype", choices=("int16", "float32"), default="int16",
                        help="volume samples (float32 adds NaN volumes to the faults; twice the journal)")
    parser.add_argument("--roi-voxels", type=int, default=NSD_ROI_VOXELS, help=f"default {NSD_ROI_VOXELS}")
    parser.add_argument("--prior-steps", type=int, default=15, help="diffusion prior steps (default 15, the config's)")
    parser.add_argument("--fsync", default="always", help="the service's journal_fsync (default always, the config's)")
    parser.add_argument("--gap-wait-s", type=float, default=None,
                        help="the service's gap wait (default one TR / speed, i.e. one volume as live)")
    parser.add_argument("--max-pending", type=int, default=None, help="decode.max_pending (default: the service's)")
    parser.add_argument("--seed", type=int, default=0, help="data and faults")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the journal goes (default: the system's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the report here (default benchmarks/results/soak.txt; none with --quick)")
    parser.add_argument("--serve", action="store_true", help="internal: be the service process (see serve())")
    parser.add_argument("--work-dir", type=Path, help="with --serve: holds roi.nii.gz and checkpoint/")
    parser.add_argument("--out-dir", type=Path, help="with --serve: the service's out_dir")
    parser.add_argument("--port", type=int, help="with --serve: volumes on this port, results on the next")
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.quick:
        args.runs, args.volumes = 2, 60
    if args.runs < 1 or args.volumes < 22 or args.speed <= 0:
        parser.error("--runs must be >= 1, --volumes >= 22, --speed > 0")
    output = args.output or (None if args.quick else REPO / "benchmarks/results/soak.txt")  # a check keeps no file
    say = Report()
    say(command_line("soak.py"))
    for line in machine_lines():
        say(line)
    started = time.monotonic()
    soak(args, say)
    say(f"total {time.monotonic() - started:.0f} s")
    if output is not None:
        say.write(output)


if __name__ == "__main__":
    main()
