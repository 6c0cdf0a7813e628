"""How well the realtime service decodes from its live betas against the offline betas training used,
on the synthetic world.

Live betas: the service's incremental GLM, estimated volume by volume while the run streams in
(realtime/glm.py). Offline betas: the dataset's betas files, a least-squares-all fit of each whole
run (what training read). Both are percent signal change and go through the same TorchBackend,
which z-scores them with the checkpoint's calibration statistics, as live.

1. The real service (realtime.cli.build_service on configs/realtime.yaml; free loopback ports, no
   viewer, retrieval among the shared images) runs in a thread; every run of subject 1's sessions
   is replayed to it (`--speed`, default max). What it published (results.jsonl) is counted as is: at max
   speed decoding falls behind and skips trials, so the live accuracy proper comes from the saved
   live betas (out/service/betas/*.npz) decoded afterwards in one batch by the service's backend.
   `--speed 8` paces the replay so that the service keeps up (no skips; 8x real time is ~5 min
   for all 25 runs of the tiny world).
2. The same trials' offline betas are read from the NSD layout (mindeye.nsd.read_betas, ROI).
3. For the shared-image (test) trials: (a) single-trial top-1 retrieval (a trial is a hit when its
   top-1 candidate among the shared images is the image seen; chance 1/n_shared), live against
   offline, with binomial standard errors and the paired counts; (b) the paper's figure: retrieval
   tokens averaged over each image's repeats, then mindeye.metrics.retrieval_top1 (image and brain
   direction); (c) the median per-trial correlation over ROI voxels of live with offline betas, for
   test trials and for all trials, and of each with the world's true trial responses. A reference
   row decodes the offline betas z-scored per session, as training's own evaluation does.

    .venv/bin/python benchmarks/live_vs_offline_decoding.py --speed 8     # trains the model first (~2 min)
    .venv/bin/python benchmarks/live_vs_offline_decoding.py --speed 8 --checkpoint runs/demo/tiny-subj1-e100-lr0.001/checkpoint

Without --checkpoint the model is trained first (skipped when <out>/train holds one), with
    .venv/bin/mindeye-train mode=scratch subjects=[1] train_sessions=[1,2,3,4] \\
        out_dir=<out>/train progress=false cpu=true train.epochs=100 train.lr=1e-3
(the model mindeye-demo trains).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch

from mindeye.cli import log_to
from mindeye.config import load_config
from mindeye.metrics import retrieval_top1
from mindeye.models import load_calibration
from mindeye.nsd import ExpDesign, NSDLayout, TrialTable, read_betas, read_roi, subject_name
from mindeye.targets import build_target_cache
from offline_training.data import average_by_image
from realtime.backends import TorchBackend
from realtime.cli import build_service
from simulators.replay import NSDSource, replay
from simulators.replay.sources import Outgoing
from simulators.world.stats import rowwise_corr

SUBJECT = 1
SUBJECT_NAME = subject_name(SUBJECT)
TRAIN_OVERRIDES = ["mode=scratch", f"subjects=[{SUBJECT}]", "train_sessions=[1,2,3,4]", "progress=false", "cpu=true",
                   "train.epochs=100", "train.lr=1e-3"]


def train_checkpoint(data_root: Path, train_dir: Path) -> Path:
    """The checkpoint of the training command above, run unless `train_dir` already holds one."""
    checkpoint = train_dir / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        command = [sys.executable, "-m", "offline_training.train", *TRAIN_OVERRIDES, f"out_dir={train_dir}",
                   f"data.root={data_root}"]
        print("training:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return checkpoint


class Sessions:
    """A replay source: every run of the given sessions of the subject, session after session."""

    def __init__(self, layout: NSDLayout, sessions: list[int], runs_per_session: int):
        self.sources = [NSDSource(layout, SUBJECT, s, list(range(1, runs_per_session + 1))) for s in sessions]

    def runs(self) -> Iterator[list[Outgoing]]:
        """Each session's send times continue after the previous session's, as a visit would."""
        offset_s = 0.0
        for source in self.sources:
            for plan in source.runs():
                plan = [replace(item, at_s=item.at_s + offset_s) for item in plan]
                yield plan
            offset_s = plan[-1].at_s


def run_live(cfg, sessions: list[int], design: ExpDesign, n_trials: int, speed: str) -> tuple[TorchBackend, float]:
    """Serve the replayed sessions until every trial is published; the service's backend and wall seconds."""
    service = build_service(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    started_s = time.monotonic()
    thread.start()
    if not service.ready.wait(60):
        raise RuntimeError("the service did not start listening within 60 s (see its service.log)")
    try:
        summary = replay(Sessions(NSDLayout(Path(cfg.data.root)), sessions, design.runs_per_session),
                         service.volumes_endpoint, speed=speed)
        if summary.acks != {"accepted": sum(summary.sent.values())}:
            raise RuntimeError(f"the service did not accept every message: {summary.format()}")
        results_path = Path(cfg.out_dir) / "results.jsonl"
        deadline_s = time.monotonic() + 300
        while time.monotonic() < deadline_s and _count_lines(results_path) < n_trials:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
    if _count_lines(results_path) < n_trials:
        raise RuntimeError(f"{results_path}: {_count_lines(results_path)} results of {n_trials} trials after 300 s")
    return service.backend, time.monotonic() - started_s


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def live_betas(out_dir: Path, trials: TrialTable) -> np.ndarray:
    """(n, V) the service's saved betas of `trials`, in their order (image ids checked against the design)."""
    rows = []
    for session, run, trial, image_id in zip(trials.session, trials.run, trials.trial_in_run, trials.image_id):
        path = out_dir / "betas" / f"{SUBJECT_NAME}-nsd{session:02d}_run-{run:02d}.npz"
        saved = np.load(path)
        row = int(np.flatnonzero(saved["trial"] == trial)[0])
        if saved["image_id"][row] != image_id:
            raise ValueError(f"{path}: trial {trial} saw image {saved['image_id'][row]}, the design says {image_id}")
        rows.append(saved["betas_nv"][row])
    betas_nv = np.stack(rows)
    if not np.isfinite(betas_nv).all():
        raise ValueError(f"{out_dir / 'betas'}: {int((~np.isfinite(betas_nv).any(1)).sum())} trials unestimable")
    return betas_nv


def offline_betas(layout: NSDLayout, trials: TrialTable, trials_per_session: int) -> np.ndarray:
    """(n, V) percent signal change from the sessions' betas files (a row per trial of the session), in
    the order of `trials`."""
    roi = read_roi(layout.roi(SUBJECT))
    parts = []
    for session in np.unique(trials.session):
        row_in_file = trials.global_trial[trials.session == session] - (session - 1) * trials_per_session
        parts.append(read_betas(layout.betas(SUBJECT, int(session)), roi)[row_in_file])
    return np.concatenate(parts)


def retrieval_tokens(backend: TorchBackend, voxels_nv: np.ndarray) -> np.ndarray:
    """(n, L, D) the model's retrieval tokens for already z-scored voxels."""
    with torch.inference_mode():
        return backend.model(torch.from_numpy(voxels_nv.astype(np.float32)), SUBJECT_NAME).retrieval_tokens.numpy()


def single_trial_hits(backend: TorchBackend, calibration, betas_nv: np.ndarray, image_ids: np.ndarray):
    """(hit (n,) bool from the backend's own top-1, retrieval tokens (n, L, D)); checks both paths agree."""
    top1_n = np.array([top[0][0] for top in backend.decode(SUBJECT_NAME, betas_nv).top_k])
    mean_v, std_v = calibration[SUBJECT_NAME]
    tokens_nld = retrieval_tokens(backend, (betas_nv - mean_v) / std_v)
    again_n = np.array([top[0][0] for top in backend.bank.top_k(tokens_nld, 1)])
    if not np.array_equal(top1_n, again_n):
        raise RuntimeError(f"the backend's top-1 and the model's tokens disagree on {int((top1_n != again_n).sum())} "
                           "trials: the z-scoring here is not the backend's")
    return top1_n == image_ids, tokens_nld


def live_published(out_dir: Path, shared: set[int]) -> dict[str, int]:
    """What the service itself published for shared-image trials: decoded, hits, skipped, late."""
    counts = {"trials": 0, "decoded": 0, "hits": 0, "skipped": 0, "late": 0}
    for line in (out_dir / "results.jsonl").read_text().splitlines():
        result = json.loads(line)
        if result["image_id"] not in shared:
            continue
        counts["trials"] += 1
        counts["skipped"] += "skipped" in result["flags"]
        counts["late"] += "late" in result["flags"]
        if result["top_k"]:
            counts["decoded"] += 1
            counts["hits"] += result["top_k"][0]["image_id"] == result["image_id"]
    return counts


def per_session_zscore(betas_nv: np.ndarray, trials: TrialTable) -> np.ndarray:
    """Each session z-scored with its training (non-shared) trials' statistics, as offline_training.data does."""
    out_nv = np.empty_like(betas_nv)
    for session in np.unique(trials.session):
        rows = trials.session == session
        train = betas_nv[rows & ~trials.is_test]
        out_nv[rows] = (betas_nv[rows] - train.mean(0)) / (train.std(0) + 1e-6)
    return out_nv


def true_responses(root: Path, trials: TrialTable) -> np.ndarray | None:
    """(n, V) the world's true trial responses (percent), or None outside the synthetic world."""
    path = root / "ground_truth" / f"{SUBJECT_NAME}.hdf5"
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        row_of = {int(g): i for i, g in enumerate(f["global_trial"][:])}
        return f["trial_response_pct"][:][[row_of[int(g)] for g in trials.global_trial]]


def rate(hits_n: np.ndarray) -> str:
    """Hit rate +- its binomial standard error (hits/n)."""
    p, n = float(np.mean(hits_n)), len(hits_n)
    return f"{p:.3f} +- {np.sqrt(p * (1 - p) / n):.3f}  ({int(np.sum(hits_n))}/{n})"


def print_retrieval(backend: TorchBackend, checkpoint: Path, targets, trials: TrialTable, live_nv: np.ndarray,
                    offline_nv: np.ndarray, published: dict[str, int]) -> None:
    """Tables (a) and (b): single-trial and repeat-averaged top-1 retrieval of the test trials."""
    test, test_ids = trials.is_test, trials.image_id[trials.is_test]
    calibration = load_calibration(checkpoint)
    live_hits, live_tokens = single_trial_hits(backend, calibration, live_nv[test], test_ids)
    offline_hits, offline_tokens = single_trial_hits(backend, calibration, offline_nv[test], test_ids)
    session_tokens = retrieval_tokens(backend, per_session_zscore(offline_nv, trials)[test])
    session_hits = np.array([top[0][0] for top in backend.bank.top_k(session_tokens, 1)]) == test_ids
    rows = {"live betas, decoded afterwards in one batch": (live_hits, live_tokens),
            "offline betas (full-run GLM)": (offline_hits, offline_tokens),
            "offline, z-scored per session (as training)": (session_hits, session_tokens)}

    n_bank = len(backend.bank)
    print(f"\n(a) single-trial top-1 retrieval among the {n_bank} shared images (chance {1 / n_bank:.3f}; "
          "+- binomial s.e.)")
    for name, (hits_n, _) in rows.items():
        print(f"  {name:46s}{rate(hits_n)}")
    print(f"  {'paired, live / offline betas':46s}both hit {int(np.sum(live_hits & offline_hits))}, live only "
          f"{int(np.sum(live_hits & ~offline_hits))}, offline only {int(np.sum(~live_hits & offline_hits))}")
    per_session = [f"{s}: {int(live_hits[in_s].sum())}/{int(offline_hits[in_s].sum())} of {int(in_s.sum())}"
                   for s in np.unique(trials.session) for in_s in [trials.session[test] == s]]
    print(f"  {'per session, live/offline hits of n':46s}{', '.join(per_session)}")
    print(f"  {'published live by the service':46s}{published['hits'] / max(published['decoded'], 1):.3f}"
          f"  ({published['hits']}/{published['decoded']} decoded; {published['skipped']} of {published['trials']} "
          f"skipped as decoding fell behind, {published['late']} late)")

    print("\n(b) top-1 retrieval of the retrieval tokens averaged over each image's repeats "
          "(mindeye.metrics.retrieval_top1; +- binomial s.e.)")
    for name, (_, tokens_nld) in rows.items():
        image_ids, mean_tokens = average_by_image(tokens_nld, test_ids)
        score = retrieval_top1(mean_tokens, targets.get(image_ids)[0])
        image_se, brain_se = (np.sqrt(p * (1 - p) / score.pool_size) for p in (score.image_top1, score.brain_top1))
        print(f"  {name:46s}image {score.image_top1:.3f} +- {image_se:.3f}, brain {score.brain_top1:.3f} +- "
              f"{brain_se:.3f} ({score.pool_size}-way)")


def print_correlations(trials: TrialTable, live_nv: np.ndarray, offline_nv: np.ndarray,
                       truth_nv: np.ndarray | None) -> None:
    """Table (c): per-trial correlations over ROI voxels, and the units check."""
    print("\n(c) median over trials of the per-trial correlation over ROI voxels [5th, 95th percentile]")
    pairs = [("live vs offline", live_nv, offline_nv)]
    if truth_nv is not None:
        pairs += [("live vs true trial response", live_nv, truth_nv),
                  ("offline vs true trial response", offline_nv, truth_nv)]
    for name, a_nv, b_nv in pairs:
        cells = []
        for rows, label in ((trials.is_test, "test trials"), (slice(None), "all trials")):
            r_n = rowwise_corr(a_nv[rows].astype(float), b_nv[rows].astype(float))
            cells.append(f"{label} {np.median(r_n):.3f} [{np.percentile(r_n, 5):.3f}, {np.percentile(r_n, 95):.3f}]")
        print(f"  {name:32s}{';  '.join(cells)}")
    slope = float(np.sum(live_nv * offline_nv) / np.sum(offline_nv * offline_nv))
    print(f"  units: std of all live / offline betas {live_nv.std() / offline_nv.std():.3f}, least-squares slope of "
          f"live on offline {slope:.3f} (both percent signal change)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: train one into <out>/train")
    parser.add_argument("--data-root", type=Path, default=Path("data/world/tiny"))
    parser.add_argument("--sessions", type=int, nargs="+", default=None, help="default: all of the subject's")
    parser.add_argument("--speed", default="max", help="replay speed: max, real or a factor (e.g. 8)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/live_vs_offline_decoding"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started_s = time.monotonic()
    print("command:", " ".join([os.path.relpath(sys.executable), *sys.argv]))
    root = args.data_root.resolve()
    layout = NSDLayout(root)
    design = ExpDesign.read(layout.expdesign())
    sessions = sorted(set(args.sessions or range(1, design.stim_pattern.shape[0] + 1)))
    trials = design.trials(SUBJECT, sessions)
    checkpoint = args.checkpoint or train_checkpoint(root, args.out.resolve() / "train")
    out_dir = args.out.resolve() / "service"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # an existing out_dir would be resumed from its journal
    log_to(out_dir / "service.log", "INFO")
    cfg = load_config("realtime", [f"checkpoint={checkpoint}", f"data.root={root}", f"out_dir={out_dir}",
                                   "endpoints.volumes='tcp://127.0.0.1:*'", "endpoints.results='tcp://127.0.0.1:*'",
                                   "viewer.enabled=false", "decode.candidates=shared", "journal_fsync=never"])
    print(f"checkpoint {checkpoint}\ndata {root}, {SUBJECT_NAME}, sessions {sessions}: {len(trials)} trials, "
          f"{int(trials.is_test.sum())} of shared images ({len(design.shared_images)} shared images)")

    backend, live_s = run_live(cfg, sessions, design, len(trials), args.speed)
    print(f"live: {design.runs_per_session * len(sessions)} runs replayed at speed={args.speed}, served in "
          f"{live_s:.0f} s")
    live_nv, offline_nv = live_betas(out_dir, trials), offline_betas(layout, trials, design.trials_per_session)
    published = live_published(out_dir, set(design.shared_images.tolist()))
    print_retrieval(backend, checkpoint, build_target_cache(cfg.data), trials, live_nv, offline_nv, published)
    print_correlations(trials, live_nv, offline_nv, true_responses(root, trials))
    print(f"\ntotal {time.monotonic() - started_s:.0f} s; service output in {out_dir}")


if __name__ == "__main__":
    main()
