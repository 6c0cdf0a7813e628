"""Live top-1 retrieval on the world with each calibration the service could z-score live betas with.

Live betas: realtime.calibrate.live_betas, the service's GLM fed every run of subject 1's sessions volume
by volume (the betas the service computes on a clean replay; tests/test_live_calibration.py). Offline
betas: the world's betas files (its offline GLM, what training read). Single-trial top-1 among the
shared images for the shared-image trials of all sessions, with binomial standard errors, for:
offline betas with the training calibration; live betas with the training calibration (offline-GLM
statistics, percent signal change); live betas with the live calibration (realtime.calibrate) from
one or all training sessions; live betas with mean 0 / std 1, what the calibration of MindEye2's
per-session z-scored hdf5 betas amounts to (the bug the units check now refuses).

    .venv/bin/python benchmarks/live_calibration_units.py   # trains the model first (~1 min), as
                                                            # live_vs_offline_decoding.py does
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from live_vs_offline_decoding import SUBJECT, SUBJECT_NAME, offline_betas, train_checkpoint  # noqa: E402

from mindeye.config import CONFIG_DIR, load_config  # noqa: E402
from mindeye.models import load_calibration, load_checkpoint  # noqa: E402
from mindeye.nsd import ExpDesign, NSDLayout  # noqa: E402
from mindeye.targets import build_target_cache  # noqa: E402
from mindeye.bank import ExactBank  # noqa: E402
from realtime.backends import TorchBackend  # noqa: E402
from realtime.calibrate import live_betas, live_calibration  # noqa: E402

GLM = dict(OmegaConf.load(CONFIG_DIR / "glm" / "live.yaml"))  # the service's GLM settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: train one into <out>/train")
    parser.add_argument("--data-root", type=Path, default=Path("data/world/tiny"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/live_calibration_units"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("command:", " ".join([os.path.relpath(sys.executable), *sys.argv]))
    root = args.data_root.resolve()
    layout = NSDLayout(root)
    design = ExpDesign.read(layout.expdesign())
    sessions = list(range(1, design.stim_pattern.shape[0] + 1))
    trials = design.trials(SUBJECT, sessions)
    checkpoint = args.checkpoint or train_checkpoint(root, args.out.resolve() / "train")
    live_nv = np.concatenate([live_betas(root, SUBJECT, s, GLM) for s in sessions])
    offline_nv = offline_betas(layout, trials, design.trials_per_session)
    r = np.median([np.corrcoef(a, b)[0, 1] for a, b in zip(live_nv, offline_nv)])  # also checks the trial order
    test, shared = trials.is_test, np.asarray(design.shared_images)
    print(f"checkpoint {checkpoint}\ndata {root}, {SUBJECT_NAME}, sessions {sessions}: {int(test.sum())} "
          f"shared-image trials, top-1 among {len(shared)} (chance {1 / len(shared):.3f}); median per-trial "
          f"correlation of live with offline betas {r:.3f}\n")
    bank = ExactBank.from_targets(build_target_cache(load_config("realtime", [f"data.root={root}"]).data), shared)
    model = load_checkpoint(checkpoint)

    def top1(name: str, calibration, betas_nv: np.ndarray) -> None:
        backend = TorchBackend(model, calibration, bank=bank, prior_steps=0)
        top1_n = np.array([top[0][0] for top in backend.decode(SUBJECT_NAME, betas_nv[test]).top_k])
        hits = top1_n == trials.image_id[test]
        p = hits.mean()
        print(f"  {name:<62} {p:.3f} +- {np.sqrt(p * (1 - p) / len(hits)):.3f}  ({hits.sum()}/{len(hits)})")

    trained = load_calibration(checkpoint)
    top1("offline betas, training calibration", trained, offline_nv)
    top1("live betas, training calibration (offline-GLM statistics)", trained, live_nv)
    for calibration_sessions in ([1], [4], [1, 2, 3, 4]):
        per = [live_calibration(root, [SUBJECT], s, GLM)[SUBJECT_NAME] for s in calibration_sessions]
        live = {SUBJECT_NAME: (np.mean([m for m, _ in per], 0), np.mean([s for _, s in per], 0))}
        top1(f"live betas, live calibration of session(s) {calibration_sessions}", live, live_nv)
    n = len(trained[SUBJECT_NAME][0])
    top1("live betas, mean 0 / std 1 (an hdf5-betas calibration)", {SUBJECT_NAME: (np.zeros(n), np.ones(n))}, live_nv)


if __name__ == "__main__":
    main()
