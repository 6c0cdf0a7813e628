"""mindeye-calibrate: a checkpoint's live calibration, in the units the service feeds its model.

The service z-scores each live beta with per-voxel statistics saved beside the model. Those must describe
betas from the same estimator in the same units: the realtime GLM's percent signal change, not the
training betas (MindEye2's release is z-scored per session; GLMsingle's betas differ in scale from a
live GLM's). This runs the service's GLM over every task run of a calibration session, volume by
volume as the service would, and saves the mean and std of all its trials' betas as the calibration
(units percent_signal_change, estimator realtime_glm), replacing the one training wrote.

    mindeye-calibrate checkpoint=runs/x/checkpoint session=1   # subjects: the checkpoint's
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from mindeye.cli import command, require_checkpoint, require_data_root


def live_betas(root: Path, subject: int, session: int, glm_settings: Mapping[str, float]) -> np.ndarray:
    """(n_trials, V) betas of `subject`'s `session` from the realtime GLM (`glm_settings`: OnlineGLMSettings'
    fields but tr), run by run (no beta across runs)."""
    from mindeye.nsd import NSDLayout, read_design, read_roi, read_timeseries
    from realtime.glm import IncrementalGLM, OnlineGLMSettings

    layout = NSDLayout(root)
    roi = read_roi(layout.roi(subject))
    betas, run = [], 1
    while layout.timeseries(subject, session, run).is_file():
        series = read_timeseries(layout.timeseries(subject, session, run))
        design_t = read_design(layout.design(subject, session, run), series.n_volumes)
        glm = IncrementalGLM(roi.n_voxels, OnlineGLMSettings(series.tr, **glm_settings))
        for trial, volume in enumerate(np.flatnonzero(design_t >= 0)):  # a rest run has none
            glm.add_trial(trial, float(volume * series.tr))
        reports = []
        for t in range(series.n_volumes):
            reports += glm.add_volume(t, roi.apply(series.data_xyzt[..., t]))
        reports += glm.finish()
        betas += [r.beta_pct_v for r in reports if r.beta_pct_v is not None]
        run += 1
    if len(betas) < 2:
        raise ValueError(f"session {session} of subject {subject} gave {len(betas)} live betas "
                         f"(runs found: {run - 1}); a calibration needs a session with trials")
    return np.stack(betas)


def live_calibration(root: Path, subjects: list[int], session: int,
                     glm_settings: Mapping[str, float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """subject name -> per-voxel (mean, std) of its live betas in `session`, as training's z-scoring does."""
    from mindeye.nsd import subject_name

    stats = {}
    for subject in subjects:
        betas_nv = live_betas(root, subject, session, glm_settings)
        stats[subject_name(subject)] = (betas_nv.mean(0).astype(np.float32),
                                        (betas_nv.std(0) + 1e-6).astype(np.float32))  # training's epsilon
    return stats


@command("calibrate", "mindeye-calibrate")
def main(cfg: DictConfig) -> None:
    from mindeye.errors import ConfigValueError
    from mindeye.models import read_checkpoint_config, save_calibration

    checkpoint = require_checkpoint(cfg.checkpoint)
    root = require_data_root(cfg.data.root)
    model_subjects = read_checkpoint_config(checkpoint)[0].subjects
    names = list(cfg.subjects or model_subjects)
    unknown = sorted(set(names) - set(model_subjects))
    if unknown:
        raise ConfigValueError(f"subjects {unknown} are not in the checkpoint; it has {list(model_subjects)}")
    subjects = [int(name.removeprefix("subj")) for name in names]
    stats = live_calibration(root, subjects, int(cfg.session), dict(cfg.glm))
    path = save_calibration(checkpoint, stats, units="percent_signal_change", estimator="realtime_glm")
    print(f"live calibration of {names} from session {cfg.session}: {path}")


if __name__ == "__main__":
    main()
