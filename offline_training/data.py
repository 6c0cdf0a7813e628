"""Each subject's single-trial betas and the images they saw, read through the NSD data layer.

Real NSD and the synthetic world are the same to this module: `data.root` points at an NSD
tree. Training trials are those of non-shared images in the chosen sessions; test trials are
every trial of a shared image in all of the subject's sessions (the paper's test set; outputs
are averaged over an image's repeats at evaluation). Betas are z-scored per voxel with the
statistics of each session's training trials; those of the training sessions are kept as the
checkpoint's calibration, with their units (`betas_units`): the realtime service applies them only to
betas in the same units (mindeye-calibrate makes a live one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mindeye.errors import MissingFileError
from mindeye.nsd import ExpDesign, NSDLayout, TrialTable, read_betas, read_mindeye_betas, read_roi, subject_name


@dataclass(frozen=True)
class SubjectData:
    subject: int
    train_voxels: np.ndarray  # float32 (n_train, V), z-scored
    train_image_ids: np.ndarray  # int64 (n_train,)
    test_voxels: np.ndarray  # float32 (n_test, V): single trials of shared images
    test_image_ids: np.ndarray  # int64 (n_test,)
    zscore_mean: np.ndarray  # float32 (V,): calibration statistics of the training sessions
    zscore_std: np.ndarray  # float32 (V,)

    @property
    def name(self) -> str:
        return subject_name(self.subject)

    @property
    def n_voxels(self) -> int:
        return self.train_voxels.shape[1]


def available_sessions(layout: NSDLayout, subject: int, betas: str, trials_per_session: int) -> int:
    """How many sessions of `subject` the dataset holds (NSD: 30-40; the world: its config)."""
    if betas == "nifti":
        n = 0
        while layout.betas(subject, n + 1).is_file():
            n += 1
        if n == 0:
            raise MissingFileError(layout.betas(subject, 1), f"single-trial betas of {subject_name(subject)}")
        return n
    import h5py

    path = layout.require(layout.mindeye_betas(subject), f"MindEye2 betas of {subject_name(subject)}")
    with h5py.File(path, "r") as f:
        return f["betas"].shape[0] // trials_per_session


def load_subject(data_cfg, subject: int, train_sessions: list[int] | None = None) -> SubjectData:
    """`train_sessions` (1-based) default to all; `data_cfg.max_test_sessions` may bound the test read."""
    layout = NSDLayout(Path(data_cfg.root))
    design = ExpDesign.read(layout.expdesign())
    n_sessions = available_sessions(layout, subject, data_cfg.betas, design.trials_per_session)
    train_sessions = list(train_sessions or range(1, n_sessions + 1))
    if max(train_sessions) > n_sessions:
        raise ValueError(f"{subject_name(subject)} has {n_sessions} sessions; asked to train on {train_sessions}")
    roi = read_roi(layout.roi(subject))
    trials = design.trials(subject, range(1, n_sessions + 1))

    train_parts, test_parts, stats = [], [], []
    for session in range(1, n_sessions + 1):
        in_session = trials.select(trials.session == session)
        betas_nv = _session_betas(layout, data_cfg.betas, subject, session, in_session, roi)
        train_rows = ~in_session.is_test
        mean, std = betas_nv[train_rows].mean(0), betas_nv[train_rows].std(0) + 1e-6
        z_nv = ((betas_nv - mean) / std).astype(np.float32)
        if session in train_sessions:
            train_parts.append((z_nv[train_rows], in_session.image_id[train_rows]))
            stats.append((mean, std))
        test_parts.append((z_nv[~train_rows], in_session.image_id[~train_rows]))

    mean = np.mean([m for m, _ in stats], axis=0).astype(np.float32)
    std = np.mean([s for _, s in stats], axis=0).astype(np.float32)
    return SubjectData(subject=subject,
                       train_voxels=np.concatenate([v for v, _ in train_parts]),
                       train_image_ids=np.concatenate([i for _, i in train_parts]),
                       test_voxels=np.concatenate([v for v, _ in test_parts]),
                       test_image_ids=np.concatenate([i for _, i in test_parts]),
                       zscore_mean=mean, zscore_std=std)


def hold_out_fold(data: SubjectData, folds: int, fold: int, seed: int = 0) -> SubjectData:
    """`data` with fold `fold` (1-based) of `folds` of its training images as the evaluation set instead of the
    test images: every trial of a held-out image leaves training, so recipes are chosen without the test set."""
    if not (isinstance(folds, int) and isinstance(fold, int) and folds >= 2 and 1 <= fold <= folds):
        raise ValueError(f"a validation fold is 1..folds with folds >= 2, got fold {fold!r} of {folds!r}")
    images = np.random.default_rng(seed).permutation(np.unique(data.train_image_ids))
    held_out = np.isin(data.train_image_ids, np.array_split(images, folds)[fold - 1])
    return dataclasses.replace(data, train_voxels=data.train_voxels[~held_out],
                               train_image_ids=data.train_image_ids[~held_out],
                               test_voxels=data.train_voxels[held_out], test_image_ids=data.train_image_ids[held_out])


def betas_units(data_cfg) -> tuple[str, str]:
    """(units, estimator) of the betas `data_cfg.betas` reads, as the checkpoint's calibration records them.

    NSD's nifti betas are GLMsingle's percent signal change; the world writes its own offline GLM's
    (mindeye.glm) in the same units; MindEye2's hdf5 release is GLMsingle's, z-scored per session.
    """
    world = (Path(data_cfg.root) / "ground_truth" / "world.json").is_file()
    estimator = "offline_glm" if world and data_cfg.betas == "nifti" else "glmsingle"
    if data_cfg.betas == "nifti":
        return "percent_signal_change", estimator
    if data_cfg.betas == "mindeye_hdf5":
        return "zscored_per_session", estimator
    raise ValueError(f"unknown betas source '{data_cfg.betas}' (known: nifti, mindeye_hdf5)")


def _session_betas(layout: NSDLayout, source: str, subject: int, session: int, trials: TrialTable,
                   roi) -> np.ndarray:
    if source == "nifti":
        return read_betas(layout.betas(subject, session), roi)
    if source == "mindeye_hdf5":
        return read_mindeye_betas(layout.mindeye_betas(subject), trials=trials.global_trial, n_voxels=roi.n_voxels)
    raise ValueError(f"unknown betas source '{source}' (known: nifti, mindeye_hdf5)")


def average_by_image(values_n: np.ndarray, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values_n` (n, ...) over each image's repeats -> (unique image ids, (n_images, ...))."""
    unique, inverse = np.unique(image_ids, return_inverse=True)
    sums = np.zeros((len(unique),) + values_n.shape[1:], dtype=np.float64)
    np.add.at(sums, inverse, values_n)
    return unique, (sums / np.bincount(inverse)[:, None].reshape((-1,) + (1,) * (values_n.ndim - 1))).astype(
        values_n.dtype)

