"""The reference single-trial GLM against known betas, nilearn, and explicit per-trial fits."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import FirstLevelModel, compute_regressor
from scipy import signal

from mindeye.glm import (
    GLMResult,
    drift_basis,
    fit_lsa,
    fit_lss,
    percent_signal_change,
    spm_hrf,
    trial_regressors,
)

TR = 4.0 / 3.0  # NSD 1.8 mm preparation
N_VOLUMES = 226
N_SLOTS, N_TRIALS = 69, 62  # 4-s slots from 12 s; 7 are blank
N_VOXELS = 40
BASELINE = 1000.0


def _onsets_s(rng: np.random.Generator) -> np.ndarray:
    slots = np.sort(rng.choice(N_SLOTS, N_TRIALS, replace=False))
    return 12.0 + 4.0 * slots


def _ar1_noise(rng: np.random.Generator, shape: tuple[int, int], sd: float, phi: float = 0.5) -> np.ndarray:
    """(n_volumes, n_voxels) AR(1) noise with stationary standard deviation `sd`."""
    innovations_tv = rng.standard_normal(shape) * sd * np.sqrt(1 - phi**2)
    return signal.lfilter([1.0], [1.0, -phi], innovations_tv, axis=0)


@pytest.fixture(scope="module")
def run():
    """A noiseless NSD-like run: betas ~ 1 +- 1 % of a ~1000 baseline, plus a slow drift."""
    rng = np.random.default_rng(7)
    trials_tn = trial_regressors(_onsets_s(rng), 3.0, N_VOLUMES, TR)
    nuisance_tk = drift_basis(N_VOLUMES, TR)
    betas_nv = 10.0 + 10.0 * rng.standard_normal((N_TRIALS, N_VOXELS))
    drift_kv = np.vstack([BASELINE + 50 * rng.standard_normal((1, N_VOXELS)), 10 * rng.standard_normal((3, N_VOXELS))])
    nuisance_signal_tv = nuisance_tk @ drift_kv
    return {
        "trials_tn": trials_tn,
        "nuisance_tk": nuisance_tk,
        "betas_nv": betas_nv,
        "nuisance_signal_tv": nuisance_signal_tv,
        "clean_tv": trials_tn @ betas_nv + nuisance_signal_tv,
    }


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_spm_hrf_peaks_near_5s_then_undershoots():
    dt = 0.05
    hrf = spm_hrf(dt)
    t_s = np.arange(hrf.size) * dt
    assert hrf.size == 641 and hrf.sum() == pytest.approx(1.0)
    assert 4.8 <= t_s[hrf.argmax()] <= 5.2
    assert hrf.min() < -0.05 * hrf.max() and 14.0 <= t_s[hrf.argmin()] <= 17.0
    plateau = np.convolve(np.ones(3000), hrf)[2000]  # a 150 s boxcar, well after its onset
    assert plateau == pytest.approx(1.0, abs=1e-6)


def test_trial_regressors_match_nilearn_spm():
    onsets_n = 12.0 + 4.0 * np.array([0, 1, 5, 30, 60, 68])
    ours_tn = trial_regressors(onsets_n, 3.0, N_VOLUMES, TR)
    frame_times_t = np.arange(N_VOLUMES) * TR
    assert ours_tn.shape == (N_VOLUMES, onsets_n.size)
    for i, onset in enumerate(onsets_n):
        theirs_t = compute_regressor(np.array([[onset], [3.0], [1.0]]), "spm", frame_times_t)[0][:, 0]
        theirs_t = theirs_t / theirs_t.max()
        assert ours_tn[:, i].max() == 1.0
        assert _corr(ours_tn[:, i], theirs_t) > 0.999
        assert np.abs(ours_tn[:, i] - theirs_t).max() < 0.05
    # A trial's column does not depend on the other trials; per-trial durations work.
    np.testing.assert_allclose(trial_regressors(onsets_n[2:3], 3.0, N_VOLUMES, TR)[:, 0], ours_tn[:, 2], atol=1e-12)
    np.testing.assert_allclose(trial_regressors(onsets_n, np.full(6, 3.0), N_VOLUMES, TR), ours_tn, atol=1e-12)
    longer_tn = trial_regressors(onsets_n, np.array([3.0] * 5 + [6.0]), N_VOLUMES, TR)
    assert longer_tn[:, 5].argmax() > ours_tn[:, 5].argmax()


def test_trial_regressors_are_continuous_in_onset():
    on_grid_t = trial_regressors([20.0], 3.0, N_VOLUMES, TR)[:, 0]
    off_grid_t = trial_regressors([20.0 + 1e-4], 3.0, N_VOLUMES, TR)[:, 0]
    assert 0 < np.abs(on_grid_t - off_grid_t).max() < 1e-3


def test_drift_basis_is_legendre_with_the_glmdenoise_degree():
    nuisance_tk = drift_basis(N_VOLUMES, TR)  # 5.02 minutes -> round(2.51) = 3
    x_t = np.linspace(-1, 1, N_VOLUMES)
    assert nuisance_tk.shape == (N_VOLUMES, 4)
    np.testing.assert_allclose(nuisance_tk[:, 0], 1.0)
    np.testing.assert_allclose(nuisance_tk[:, 1], x_t)
    np.testing.assert_allclose(nuisance_tk[:, 3], (5 * x_t**3 - 3 * x_t) / 2)
    assert drift_basis(135, TR).shape == (135, 3)  # 3.0 minutes -> round(1.5) = 2
    assert drift_basis(30, TR).shape == (30, 2)  # 40 s -> 0, raised to the minimum 1
    assert drift_basis(N_VOLUMES, TR, degree=0).shape == (N_VOLUMES, 1)


def test_lsa_recovers_betas_and_baseline_exactly_without_noise(run):
    result = fit_lsa(run["clean_tv"], run["trials_tn"], run["nuisance_tk"])
    assert isinstance(result, GLMResult) and result.betas_nv.shape == (N_TRIALS, N_VOXELS)
    np.testing.assert_allclose(result.betas_nv, run["betas_nv"], rtol=0, atol=1e-8)
    expected_baseline_v = run["nuisance_signal_tv"].mean(axis=0)
    np.testing.assert_allclose(result.baseline_nv, np.broadcast_to(expected_baseline_v, result.baseline_nv.shape))
    np.testing.assert_allclose(result.percent_signal_change(), run["betas_nv"] / expected_baseline_v * 100)


def test_lsa_recovers_betas_through_ar1_noise(run):
    noisy_tv = run["clean_tv"] + _ar1_noise(np.random.default_rng(1), run["clean_tv"].shape, sd=2.0)
    betas_nv = fit_lsa(noisy_tv, run["trials_tn"], run["nuisance_tk"]).betas_nv
    assert _corr(betas_nv, run["betas_nv"]) > 0.9


@pytest.mark.filterwarnings("ignore:.*mask:RuntimeWarning")  # nilearn: "Given mask will be used"
def test_lsa_equals_nilearn_first_level_model_on_the_same_design(run):
    grid = (4, 5, 2)  # 40 voxels
    noisy_tv = run["clean_tv"] + _ar1_noise(np.random.default_rng(2), run["clean_tv"].shape, sd=5.0)
    img = nib.Nifti1Image(noisy_tv.T.reshape(*grid, N_VOLUMES), np.eye(4))
    mask = nib.Nifti1Image(np.ones(grid, dtype=np.int8), np.eye(4))
    columns = [f"trial{i:02d}" for i in range(N_TRIALS)] + [f"drift{k}" for k in range(run["nuisance_tk"].shape[1])]
    design_tp = np.hstack([run["trials_tn"], run["nuisance_tk"]])
    design = pd.DataFrame(design_tp, columns=columns, index=np.arange(N_VOLUMES) * TR)
    model = FirstLevelModel(mask_img=mask, signal_scaling=False, noise_model="ols", minimize_memory=False)
    model.fit(img, design_matrices=[design])
    nilearn_nv = np.stack(
        [model.compute_contrast(name, output_type="effect_size").get_fdata().reshape(-1) for name in columns[:N_TRIALS]]
    )
    ours_nv = fit_lsa(noisy_tv, run["trials_tn"], run["nuisance_tk"]).betas_nv
    np.testing.assert_allclose(ours_nv, nilearn_nv, rtol=1e-8, atol=1e-8)


def _lss_by_explicit_loop(y_tv, trials_tn, nuisance_tk):
    """Trial by trial: lstsq of y on [x_i, sum of the other trials, nuisance]."""
    betas, baselines = [], []
    for i in range(trials_tn.shape[1]):
        others_t = trials_tn.sum(axis=1) - trials_tn[:, i]
        design_tp = np.column_stack([trials_tn[:, i], others_t, nuisance_tk])
        coef_pv = np.linalg.lstsq(design_tp, y_tv, rcond=None)[0]
        betas.append(coef_pv[0])
        baselines.append((nuisance_tk @ coef_pv[2:]).mean(axis=0))
    return np.stack(betas), np.stack(baselines)


def test_lss_equals_an_explicit_per_trial_lstsq_loop(run):
    noisy_tv = run["clean_tv"] + _ar1_noise(np.random.default_rng(3), run["clean_tv"].shape, sd=5.0)
    result = fit_lss(noisy_tv, run["trials_tn"], run["nuisance_tk"])
    loop_betas_nv, loop_baseline_nv = _lss_by_explicit_loop(noisy_tv, run["trials_tn"], run["nuisance_tk"])
    np.testing.assert_allclose(result.betas_nv, loop_betas_nv, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.baseline_nv, loop_baseline_nv, rtol=1e-9)
    # LSS is a different estimator from LSA when amplitudes vary across trials.
    lsa_nv = fit_lsa(noisy_tv, run["trials_tn"], run["nuisance_tk"]).betas_nv
    assert np.abs(result.betas_nv - lsa_nv).max() > 1.0


def test_lss_and_lsa_agree_on_noiseless_data_the_lss_model_fits(run):
    # With one amplitude per voxel for all trials, [x_i, s_i, N] holds the true model for every i.
    shared_betas_nv = np.broadcast_to(run["betas_nv"][:1], run["betas_nv"].shape)
    clean_tv = run["trials_tn"] @ shared_betas_nv + run["nuisance_signal_tv"]
    lss = fit_lss(clean_tv, run["trials_tn"], run["nuisance_tk"])
    lsa = fit_lsa(clean_tv, run["trials_tn"], run["nuisance_tk"])
    np.testing.assert_allclose(lss.betas_nv, lsa.betas_nv, atol=1e-8)
    np.testing.assert_allclose(lss.betas_nv, shared_betas_nv, atol=1e-8)
    np.testing.assert_allclose(lss.baseline_nv, lsa.baseline_nv, rtol=1e-10)


@pytest.mark.parametrize("fit", [fit_lsa, fit_lss])
def test_valid_t_drops_volumes_exactly_as_slicing(run, fit):
    noisy_tv = run["clean_tv"] + _ar1_noise(np.random.default_rng(4), run["clean_tv"].shape, sd=2.0)
    valid_t = np.ones(N_VOLUMES, dtype=bool)
    valid_t[np.random.default_rng(5).choice(N_VOLUMES, 5, replace=False)] = False
    with_gaps_tv = np.where(valid_t[:, None], noisy_tv, np.nan)  # missing volumes may hold NaN
    masked = fit(with_gaps_tv, run["trials_tn"], run["nuisance_tk"], valid_t=valid_t)
    sliced = fit(noisy_tv[valid_t], run["trials_tn"][valid_t], run["nuisance_tk"][valid_t])
    np.testing.assert_allclose(masked.betas_nv, sliced.betas_nv, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(masked.baseline_nv, sliced.baseline_nv, rtol=1e-12)
    if fit is fit_lsa:
        assert _corr(masked.betas_nv, run["betas_nv"]) > 0.9


def test_percent_signal_change_zeroes_and_counts_nonpositive_baselines():
    betas_nv = np.array([[10.0, 5.0, 3.0], [20.0, -5.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="4 of 6 betas have a baseline <= 0"):
        pct_nv = percent_signal_change(betas_nv, np.array([1000.0, 0.0, -2.0]))
    np.testing.assert_allclose(pct_nv, [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])


def test_bad_input_is_named(run):
    y_tv, trials_tn, nuisance_tk = run["clean_tv"], run["trials_tn"], run["nuisance_tk"]
    with pytest.raises(ValueError, match="mismatched lengths"):
        fit_lsa(y_tv[:-1], trials_tn, nuisance_tk)
    nan_tv = y_tv.copy()
    nan_tv[17, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in timeseries_tv.*volume 17, column 3"):
        fit_lss(nan_tv, trials_tn, nuisance_tk)
    with pytest.raises(ValueError, match="valid_t must be a bool array"):
        fit_lsa(y_tv, trials_tn, nuisance_tk, valid_t=np.ones(N_VOLUMES))
    with pytest.raises(ValueError, match=r"onsets beyond the run: trials \[1\]"):
        trial_regressors([12.0, 400.0], 3.0, N_VOLUMES, TR)
    with pytest.raises(ValueError, match="onsets beyond the run"):
        trial_regressors([-1.0], 3.0, N_VOLUMES, TR)
    duplicate_tn = np.column_stack([trials_tn, trials_tn[:, 5]])
    with pytest.raises(ValueError, match="rank-deficient design.*linear combinations"):
        fit_lsa(y_tv, duplicate_tn, nuisance_tk)
    with pytest.raises(ValueError, match="rank-deficient design.*exceed the 60 valid volumes"):
        fit_lsa(y_tv[:60], trials_tn[:60], nuisance_tk[:60])
    silent_t = trials_tn[:, 61] == 0  # only the volumes before the last trial's onset
    with pytest.raises(ValueError, match=r"rank-deficient design.*trials \[61\] have regressors that are zero"):
        fit_lsa(y_tv, trials_tn, nuisance_tk, valid_t=silent_t)
    with pytest.raises(ValueError, match="marks no volume as valid"):
        fit_lsa(y_tv, trials_tn, nuisance_tk, valid_t=np.zeros(N_VOLUMES, dtype=bool))
    with pytest.raises(ValueError, match="rank-deficient nuisance design"):
        fit_lsa(y_tv, trials_tn, np.column_stack([nuisance_tk, nuisance_tk[:, 1]]))
    with pytest.raises(ValueError, match="must span a constant"):
        fit_lsa(y_tv, trials_tn, nuisance_tk[:, 1:])
    with pytest.raises(ValueError, match=r"rank-deficient LSS design for trials \[0, 1\]"):
        fit_lss(y_tv, trials_tn[:, [4, 4]], nuisance_tk)
    with pytest.raises(ValueError, match="at least 2 trials"):
        fit_lss(y_tv, trials_tn[:, :1], nuisance_tk)


def test_a_duration_too_short_to_cover_any_sample_is_a_value_error_not_a_crash():
    """Found by the service fuzzer: a positive duration of 1e-300 s covers no fine bin; it used to raise
    IndexError, which the service's trial handling does not expect."""
    with pytest.raises(ValueError, match="predict no positive response"):
        trial_regressors(np.array([2.0]), 1e-300, 20, 1.0)
