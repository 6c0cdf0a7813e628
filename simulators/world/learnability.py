"""Is the world learnable, and not trivially so? A closed-form ridge regression from one
subject's single-trial betas to the CLIP image tokens, scored by test-image retrieval.

Everything is read back through the NSD data layer, as a decoder would read real NSD. The
ceiling is the same regression fitted on the ground truth: the subject's noiseless responses
to each image, so it is limited only by how linearly the tokens follow from the shared code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mindeye.metrics import retrieval_top1
from mindeye.nsd import ExpDesign, NSDLayout, read_betas, read_roi
from simulators.world.stats import rowwise_corr, standardise

ALPHAS = np.logspace(-2, 4, 13)  # ridge penalties, relative to the mean eigenvalue of X'X


@dataclass(frozen=True)
class LearnabilityReport:
    subject: int
    n_train_trials: int
    n_test_images: int
    chance: float
    image_top1: float  # ridge on single-trial betas (test betas averaged over repeats)
    brain_top1: float
    ceiling_image_top1: float  # ridge on the noiseless ground-truth responses
    ceiling_brain_top1: float
    alpha: float

    def __str__(self) -> str:
        return (f"ridge decoding, subj{self.subject:02d}: {self.n_train_trials} training trials, "
                f"{self.n_test_images}-way test retrieval (chance {self.chance:.1%}): image top-1 "
                f"{self.image_top1:.1%}, brain top-1 {self.brain_top1:.1%}; ground-truth ceiling "
                f"{self.ceiling_image_top1:.1%} / {self.ceiling_brain_top1:.1%}")


def ridge_fit(x_nv: np.ndarray, y_nf: np.ndarray, alphas: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
              ) -> tuple[np.ndarray, float]:
    """Weights (V, F) for the penalty that best predicts the validation rows (correlation of
    flattened rows, the quantity retrieval ranks by), from one eigendecomposition of X'X."""
    gram_vv = x_nv.T @ x_nv
    eigval, eigvec = np.linalg.eigh(gram_vv)
    xty_vf = eigvec.T @ (x_nv.T @ y_nf)
    scale = eigval.mean()
    best = (-np.inf, None, None)
    for alpha in alphas:
        w_vf = eigvec @ (xty_vf / (eigval + alpha * scale)[:, None])
        score = float(np.mean(rowwise_corr(x_val @ w_vf, y_val, eps=1e-12)))
        if score > best[0]:
            best = (score, w_vf, float(alpha))
    return best[1], best[2]


def check_learnability(root: Path, subject: int = 1, seed: int = 0) -> LearnabilityReport:
    root = Path(root)
    layout = NSDLayout(root)
    n_sessions = {s["subject"]: s["sessions"] for s in json.loads((root / "ground_truth/world.json").read_text())[
        "subjects"]}[subject]
    design = ExpDesign.read(layout.expdesign())
    roi = read_roi(layout.roi(subject))
    trials = design.trials(subject, range(1, n_sessions + 1))
    # Per-session z-scoring, as MindEye2 normalises NSD betas.
    betas_nv = np.concatenate([standardise(read_betas(layout.betas(subject, s), roi), eps=1e-6)
                               for s in range(1, n_sessions + 1)])
    with h5py.File(root / "ground_truth/image_tokens.hdf5", "r") as f:
        tokens_nf = f["tokens"][:].reshape(len(f["tokens"]), -1).astype(np.float64)
    with h5py.File(root / f"ground_truth/subj{subject:02d}.hdf5", "r") as f:
        truth_ids, truth_response = f["image_ids"][:], f["image_response_pct"][:].astype(np.float64)

    test_ids = np.unique(trials.image_id[trials.is_test])
    train_ids = np.unique(trials.image_id[~trials.is_test])
    val_ids = np.random.default_rng(seed).choice(train_ids, size=max(2, len(train_ids) // 8), replace=False)
    fit_trials = ~trials.is_test & ~np.isin(trials.image_id, val_ids)

    def averaged(ids: np.ndarray) -> np.ndarray:  # (len(ids), V): betas averaged over each image's repeats
        return np.stack([betas_nv[trials.image_id == i].mean(0) for i in ids])

    w_vf, alpha = ridge_fit(betas_nv[fit_trials], tokens_nf[trials.image_id[fit_trials]], ALPHAS,
                            averaged(val_ids), tokens_nf[val_ids])
    score = retrieval_top1(averaged(test_ids) @ w_vf, tokens_nf[test_ids], seed=seed)

    truth_of = dict(zip(truth_ids.tolist(), range(len(truth_ids))))
    truth = standardise(truth_response, eps=1e-6)
    fit_ids = np.setdiff1d(train_ids, val_ids)
    rows = lambda ids: truth[[truth_of[i] for i in ids]]  # noqa: E731
    w_true, _ = ridge_fit(rows(fit_ids), tokens_nf[fit_ids], ALPHAS, rows(val_ids), tokens_nf[val_ids])
    ceiling = retrieval_top1(rows(test_ids) @ w_true, tokens_nf[test_ids], seed=seed)
    return LearnabilityReport(subject=subject, n_train_trials=int((~trials.is_test).sum()),
                              n_test_images=len(test_ids), chance=score.chance, image_top1=score.image_top1,
                              brain_top1=score.brain_top1, ceiling_image_top1=ceiling.image_top1,
                              ceiling_brain_top1=ceiling.brain_top1, alpha=alpha)
