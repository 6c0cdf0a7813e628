"""The live calibration: the realtime GLM's betas over a calibration session, saved in the live units."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from mindeye.errors import ConfigValueError
from mindeye.models import calibration_units, load_calibration, save_calibration
from mindeye.nsd import NSDLayout, read_design, read_roi, read_timeseries
from realtime.backends import TorchBackend
from realtime.calibrate import live_betas
from realtime.glm import IncrementalGLM, OnlineGLMSettings


def test_the_live_calibration_is_the_statistics_of_the_services_betas_and_the_backend_takes_it(
        tiny_world, checkpoint, tmp_path):
    root = tiny_world[0]
    betas_nv = live_betas(root, 1, 2, {})
    # run 1 fed directly to the GLM, as tests/test_realtime_service.py's reference does: the same betas
    layout = NSDLayout(root)
    series = read_timeseries(layout.timeseries(1, 2, 1))
    roi = read_roi(layout.roi(1))
    glm = IncrementalGLM(roi.n_voxels, OnlineGLMSettings(series.tr))
    for trial, volume in enumerate(np.flatnonzero(read_design(layout.design(1, 2, 1), series.n_volumes) >= 0)):
        glm.add_trial(trial, volume * series.tr)
    reports = [r for t in range(series.n_volumes) for r in glm.add_volume(t, roi.apply(series.data_xyzt[..., t]))]
    reports += glm.finish()
    np.testing.assert_array_equal(betas_nv[:len(reports)], np.stack([r.beta_pct_v for r in reports]))
    assert len(betas_nv) == 5 * 18  # every stimulus trial of the session's 5 runs

    ckpt = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, ckpt)
    save_calibration(ckpt, load_calibration(ckpt), units="zscored_per_session", estimator="glmsingle")
    with pytest.raises(ConfigValueError, match="mindeye-calibrate"):
        TorchBackend.from_checkpoint(ckpt, prior_steps=0)
    done = subprocess.run([sys.executable, "-m", "realtime.calibrate", f"checkpoint={ckpt}", "session=2",
                           f"data.root={root}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert calibration_units(ckpt) == ("percent_signal_change", "realtime_glm")
    mean_v, std_v = load_calibration(ckpt)["subj01"]
    np.testing.assert_allclose(mean_v, betas_nv.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std_v, betas_nv.std(0) + 1e-6, rtol=1e-5)
    assert TorchBackend.from_checkpoint(ckpt, prior_steps=0).subjects() == ["subj01"]
