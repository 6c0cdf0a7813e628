"""The live GLM under drift that differs between voxels: against nilearn's refit on the volumes so far (what
real-time MindEye runs), on benchmarks/glm_drift.py's simulator, written apart from the world's; and the
world's own option for such drift."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import glm_drift  # noqa: E402

from realtime.glm import OnlineGLMSettings  # noqa: E402
from simulators.world.scanner import run_timeseries  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.mark.parametrize("drift, drift_pct, margin", [("random walk", 0.5, 0.02), ("low-frequency", 2.0, 0.0),
                                                      ("random walk", 2.0, 0.0)])
def test_live_betas_beat_nilearns_refits_on_the_volumes_so_far_under_per_voxel_drift(drift, drift_pct, margin):
    ts_tv, onsets_n, truth_nv = glm_drift.simulate("nsd", drift, drift_pct, seed=11, n_voxels=120)
    settings = OnlineGLMSettings(tr=glm_drift.TR)
    live = glm_drift.median_correlation(glm_drift.live_betas(ts_tv, onsets_n, settings), truth_nv)
    for drift_model in (None, "cosine"):
        refit = glm_drift.median_correlation(glm_drift.lss_so_far(ts_tv, onsets_n, settings, drift_model), truth_nv)
        assert live > refit + margin, (drift_model, live, refit)
    assert live > 0.5  # and far from chance (0)


def test_the_world_can_drift_each_voxel_its_own_way():
    rng_args = dict(onsets_s=np.array([12.0, 40.0]), trial_response_nv=np.zeros((2, 200)),
                    hrf_shift_v=np.zeros(200), baseline_v=np.full(200, 10000.0), n_volumes=226, tr=4 / 3)
    snr = SimpleNamespace(drift_pct=0.0, ar1=0.0, ts_noise_pct=0.0)
    flat = run_timeseries(**rng_args, snr_cfg=snr, rng=np.random.default_rng(0))
    assert (flat == 10000).all()  # without the option: no such drift, and no draw from the generator
    snr.voxel_drift_pct = 2.0
    drifting = run_timeseries(**rng_args, snr_cfg=snr, rng=np.random.default_rng(0)).astype(float)
    pct_tv = 100 * (drifting / 10000 - 1)
    np.testing.assert_allclose(pct_tv.std(axis=0), 2.0, atol=0.02)  # int16 rounding: 0.01 %
    correlation_vv = np.corrcoef(pct_tv.T)[np.triu_indices(200, 1)]
    assert np.median(np.abs(correlation_vv)) < 0.5  # each voxel its own walk (walks correlate by chance)
