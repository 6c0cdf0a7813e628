"""The realtime incremental GLM against its batch reference, the truth, the offline GLM, and faults."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from mindeye.glm import drift_basis, fit_lsa, fit_lss, trial_regressors
from realtime.glm import IncrementalGLM, OnlineGLMSettings, TrialBeta, reference_betas, trial_response
from simulators.world.scanner import run_timeseries

TR = 4.0 / 3.0
N_VOLUMES = 226  # an NSD run: 75 4-s slots
SETTINGS = OnlineGLMSettings(tr=TR)  # the defaults: post_s 12, grace 3 volumes


def nsd_onsets(rng: np.random.Generator, n_slots: int = 75, n_trials: int = 62) -> np.ndarray:
    """Onsets (s) of an NSD-like run: 3 blank slots lead, 4 trail, the rest of the blanks scattered."""
    return 4.0 * np.sort(rng.choice(np.arange(3, n_slots - 4), n_trials, replace=False))


def simulated_run(seed: int, n_voxels: int, noise_pct: float, trial_noise_pct: float = 0.0):
    """(timeseries_tv, onsets_n, true responses in % signal change (n_trials, V)) from the world's scanner model."""
    rng = np.random.default_rng(seed)
    onsets_n = nsd_onsets(rng)
    response_nv = 1.0 + 2.0 * rng.standard_normal((onsets_n.size, n_voxels))
    response_nv += trial_noise_pct * rng.standard_normal(response_nv.shape)
    hrf_shift_v = 0.5 * rng.standard_normal(n_voxels)
    baseline_v = 1000.0 * (1 + 0.1 * rng.standard_normal(n_voxels))
    snr = SimpleNamespace(drift_pct=2.0, ar1=0.4, ts_noise_pct=noise_pct)
    ts_tv = run_timeseries(onsets_n, response_nv, hrf_shift_v, baseline_v, N_VOLUMES, TR, snr, rng)
    return ts_tv.astype(float), onsets_n, response_nv


def feed(glm: IncrementalGLM, arrivals: list[int], ts_tv: np.ndarray) -> dict[int, tuple[TrialBeta, int]]:
    """Send the volumes in `arrivals` order, then finish(); trial id -> (report, position of the call that gave it)."""
    reports = {}
    for position, k in enumerate(arrivals):
        for beta in glm.add_volume(k, ts_tv[k]):
            assert beta.trial_id not in reports
            reports[beta.trial_id] = (beta, position)
    for beta in glm.finish():
        reports[beta.trial_id] = (beta, len(arrivals))
    return reports


def glm_with_trials(n_voxels: int, onsets_n: np.ndarray, settings: OnlineGLMSettings = SETTINGS) -> IncrementalGLM:
    glm = IncrementalGLM(n_voxels, settings)
    for i, onset in enumerate(onsets_n):
        glm.add_trial(i, onset)
    return glm


def corr_per_trial(a_nv: np.ndarray, b_nv: np.ndarray) -> np.ndarray:
    a_nv = a_nv - a_nv.mean(axis=1, keepdims=True)
    b_nv = b_nv - b_nv.mean(axis=1, keepdims=True)
    return (a_nv * b_nv).sum(axis=1) / np.sqrt((a_nv**2).sum(axis=1) * (b_nv**2).sum(axis=1))


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """These small lstsq problems run fastest on one BLAS thread, and do not stall (10x) when other
    processes share the cores."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def noisy_run():
    return simulated_run(seed=0, n_voxels=48, noise_pct=1.0, trial_noise_pct=1.0)


def test_trial_response_is_the_reference_regressor_wherever_the_trial_is():
    onsets_n = 12.0 + 4.0 * np.array([0, 1, 17, 40, 66]) + np.array([0.0, 0.3, 0.0, 1e-4, 0.7])
    regressors_tn = trial_regressors(onsets_n, 3.0, N_VOLUMES, TR)
    for n, onset in enumerate(onsets_n):
        first, response_r = trial_response(onset, 3.0, TR)
        column_t = np.zeros(N_VOLUMES)
        column_t[first : first + response_r.size] = response_r[: N_VOLUMES - first]
        np.testing.assert_allclose(column_t, regressors_tn[:, n], rtol=0, atol=1e-12)
        assert first == int(np.floor(onset / TR)) + 1  # zero at and before the onset, nonzero right after
        assert 34.0 < response_r.size * TR < 37.0  # 3 s image + 32 s HRF
    # Moving a trial by whole volumes moves its response and nothing else.
    first_a, response_a = trial_response(20.3, 3.0, TR)
    first_b, response_b = trial_response(20.3 + 150 * TR, 3.0, TR)
    assert first_b == first_a + 150
    np.testing.assert_allclose(response_b, response_a, rtol=0, atol=1e-12)


def test_noiseless_run_gives_the_true_betas_and_baseline():
    rng = np.random.default_rng(1)
    onsets_n = nsd_onsets(rng)
    betas_nv = 10.0 + 10.0 * rng.standard_normal((onsets_n.size, 30))
    baseline_v = 1000.0 + 50.0 * rng.standard_normal(30)
    ts_tv = baseline_v + trial_regressors(onsets_n, 3.0, N_VOLUMES, TR) @ betas_nv
    # the prior pulls each response toward the voxel's mean response by its weight against the data's:
    # a vague prior lets the data speak alone (the drift, which noiseless data never show, is left as it is)
    unshrunk = OnlineGLMSettings(tr=TR, response_sd=1e4)
    reports = feed(glm_with_trials(30, onsets_n, unshrunk), list(range(N_VOLUMES)), ts_tv)
    assert sorted(reports) == list(range(onsets_n.size))
    for i, (beta, _) in reports.items():
        np.testing.assert_allclose(beta.beta_v, betas_nv[i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(beta.baseline_v, baseline_v, rtol=1e-8)
        np.testing.assert_allclose(beta.beta_pct_v, 100 * betas_nv[i] / baseline_v, rtol=0, atol=1e-6)
        assert beta.problem is None and beta.missing_volumes == ()


def _shuffled_in_blocks(rng, n_volumes: int, block: int) -> list[int]:
    order = np.arange(n_volumes)
    for start in range(0, n_volumes, block):
        rng.shuffle(order[start : start + block])
    return order.tolist()


def _with_duplicates(rng, arrivals: list[int]) -> list[int]:
    """Re-send about a third of the volumes, up to 6 arrivals later."""
    out = list(arrivals)
    for k in arrivals:
        if rng.random() < 0.3:
            out.insert(min(len(out), out.index(k) + 1 + int(rng.integers(6))), k)
    return out


MISSING = [40, 41, 100, 180]


@pytest.mark.parametrize("scenario", ["in order", "shuffled", "duplicated", "missing", "everything", "announced live"])
def test_incremental_equals_the_batch_reference(noisy_run, scenario):
    ts_tv, onsets_n, _ = noisy_run
    rng = np.random.default_rng(2)
    arrivals = list(range(N_VOLUMES))
    if scenario in ("shuffled", "everything"):
        arrivals = _shuffled_in_blocks(rng, N_VOLUMES, SETTINGS.grace_volumes)
    if scenario in ("missing", "everything"):
        arrivals = [k for k in arrivals if k not in MISSING]
    if scenario in ("duplicated", "everything"):
        arrivals = _with_duplicates(rng, arrivals)
    valid_t = np.isin(np.arange(N_VOLUMES), arrivals)

    if scenario == "announced live":  # each trial just before the volume that first holds its response
        glm = IncrementalGLM(ts_tv.shape[1], SETTINGS)
        first_n = np.array([trial_response(onset, 3.0, TR)[0] for onset in onsets_n])
        reports = {}
        for k in arrivals:
            for i in np.flatnonzero(first_n == k):
                glm.add_trial(int(i), onsets_n[i])
            reports.update({beta.trial_id: (beta, k) for beta in glm.add_volume(k, ts_tv[k])})
        reports.update({beta.trial_id: (beta, -1) for beta in glm.finish()})
    else:
        glm = glm_with_trials(ts_tv.shape[1], onsets_n)
        reports = feed(glm, arrivals, ts_tv)

    reference = reference_betas(ts_tv, onsets_n, SETTINGS, valid_t=valid_t)
    assert sorted(reports) == list(range(onsets_n.size))
    ours_nv = np.stack([reports[i][0].beta_v for i in range(onsets_n.size)])
    baseline_nv = np.stack([reports[i][0].baseline_v for i in range(onsets_n.size)])
    np.testing.assert_allclose(ours_nv, reference.betas_nv, rtol=1e-6, atol=1e-6 * np.abs(reference.betas_nv).max())
    np.testing.assert_allclose(baseline_nv, reference.baseline_nv, rtol=1e-9)
    assert glm.counters.volumes_used == valid_t.sum()
    assert glm.counters.volumes_missing == N_VOLUMES - valid_t.sum()
    assert glm.counters.duplicates_ignored == len(arrivals) - valid_t.sum()


def test_a_trial_whose_response_has_barely_begun_does_not_spoil_the_others(noisy_run):
    ts_tv, onsets_n, _ = noisy_run
    onsets_n = onsets_n - 1e-3  # each response starts at 1e-13 of its peak on the volume after the onset...
    settings = OnlineGLMSettings(tr=TR, post_s=12.0 + 1e-3)  # ...which is the horizon of the trial 3 slots back
    assert trial_response(onsets_n[0], 3.0, TR)[1][0] < 1e-12
    reports = feed(glm_with_trials(ts_tv.shape[1], onsets_n, settings), list(range(N_VOLUMES)), ts_tv)
    assert all(reports[i][0].problem is None for i in range(onsets_n.size))
    reference = reference_betas(ts_tv, onsets_n, settings)
    ours_nv = np.stack([reports[i][0].beta_v for i in range(onsets_n.size)])
    np.testing.assert_allclose(ours_nv, reference.betas_nv, rtol=1e-6, atol=1e-6 * np.abs(reference.betas_nv).max())


def test_finish_reports_trials_whose_horizon_the_run_never_reached(noisy_run):
    ts_tv, onsets_n, _ = noisy_run
    n_arrived = 216  # the last trial starts at most 280 s in (volume 210); its horizon is volume 219
    reports = feed(glm_with_trials(ts_tv.shape[1], onsets_n), list(range(n_arrived)), ts_tv)
    reference = reference_betas(ts_tv[:n_arrived], onsets_n, SETTINGS)
    cut_short = [i for i, onset in enumerate(onsets_n) if SETTINGS.horizon_volume(onset) >= n_arrived]
    assert cut_short  # the seed puts a trial in the last slots
    for i in range(onsets_n.size):
        beta, position = reports[i]
        np.testing.assert_allclose(beta.beta_v, reference.betas_nv[i], rtol=1e-6, atol=1e-6)
        assert beta.horizon_volume == min(SETTINGS.horizon_volume(onsets_n[i]), n_arrived - 1)
        assert (position == n_arrived) == (i in cut_short)  # reported by finish(), or by a volume


def test_betas_track_the_truth_and_the_offline_lsa_fit():
    ts_tv, onsets_n, truth_nv = simulated_run(seed=3, n_voxels=200, noise_pct=0.5, trial_noise_pct=1.0)
    reports = feed(glm_with_trials(200, onsets_n), list(range(N_VOLUMES)), ts_tv)
    ours_nv = np.stack([reports[i][0].beta_pct_v for i in range(onsets_n.size)])
    regressors_tn, nuisance_tk = trial_regressors(onsets_n, 3.0, N_VOLUMES, TR), drift_basis(N_VOLUMES, TR)
    lsa_nv = fit_lsa(ts_tv, regressors_tn, nuisance_tk).percent_signal_change()
    lss_nv = fit_lss(ts_tv, regressors_tn, nuisance_tk).percent_signal_change()
    ours_vs_truth = corr_per_trial(ours_nv, truth_nv)
    assert np.median(ours_vs_truth) > 0.9 and np.percentile(ours_vs_truth, 5) > 0.85
    assert np.median(corr_per_trial(ours_nv, lsa_nv)) > 0.95  # the full-run fit the world's betas use
    # Full-run LSS is a worse estimator on this design (see the module docstring); ours is closer to the truth.
    assert np.median(ours_vs_truth) > np.median(corr_per_trial(lss_nv, truth_nv)) + 0.05


def test_a_trial_is_ready_at_the_volume_that_completes_its_window(noisy_run):
    ts_tv, onsets_n, _ = noisy_run
    reports = feed(glm_with_trials(ts_tv.shape[1], onsets_n), list(range(N_VOLUMES)), ts_tv)
    for i, onset in enumerate(onsets_n):
        beta, position = reports[i]
        horizon = int(np.floor((onset + SETTINGS.post_s) / TR + 1e-9))
        assert position == beta.ready_volume == beta.horizon_volume == horizon  # not one volume earlier
        assert beta.response_volumes == horizon - int(np.floor(onset / TR))


def test_a_missing_volume_delays_its_trials_by_the_grace_and_is_reported(noisy_run):
    ts_tv, onsets_n, _ = noisy_run
    trial = 30
    first, _ = trial_response(onsets_n[trial], 3.0, TR)
    horizon = SETTINGS.horizon_volume(onsets_n[trial])
    missing = horizon - 1
    arrivals = [k for k in range(N_VOLUMES) if k != missing]
    reports = feed(glm_with_trials(ts_tv.shape[1], onsets_n), arrivals, ts_tv)
    beta, position = reports[trial]
    assert arrivals[position] == missing + SETTINGS.grace_volumes  # volume horizon + 2 proves it is not coming
    assert beta.ready_volume == missing + SETTINGS.grace_volumes and beta.horizon_volume == horizon
    assert beta.missing_volumes == (missing,) and beta.response_volumes == horizon - first + 1
    assert beta.problem is None and np.isfinite(beta.beta_pct_v).all()
    untouched = [i for i in range(onsets_n.size) if SETTINGS.horizon_volume(onsets_n[i]) < missing - 12]
    assert all(reports[i][0].missing_volumes == () for i in untouched)


def test_trials_before_a_fault_are_untouched_and_its_influence_fades(noisy_run):
    ts_tv, onsets_n, _ = noisy_run
    clean = feed(glm_with_trials(ts_tv.shape[1], onsets_n), list(range(N_VOLUMES)), ts_tv)
    missing = 120
    faulty = feed(glm_with_trials(ts_tv.shape[1], onsets_n), [k for k in range(N_VOLUMES) if k != missing], ts_tv)
    lag_s_n = np.array([(SETTINGS.horizon_volume(onset) - missing) * TR for onset in onsets_n])
    change_n = np.array([
        np.abs(faulty[i][0].beta_v - clean[i][0].beta_v).max() / np.abs(clean[i][0].beta_v).max()
        for i in range(onsets_n.size)
    ])
    assert (change_n[lag_s_n < 0] == 0).all()  # fitted before the fault: bit for bit the same
    assert change_n[(lag_s_n >= 0) & (lag_s_n < 15)].max() > 0.01  # the fault does matter nearby...
    assert change_n[lag_s_n > 90].max() < 0.02  # ...and fades as the level walks on


def test_work_and_memory_per_volume_do_not_grow_through_a_long_run():
    n_volumes, settings = 600, OnlineGLMSettings(tr=TR)
    # A 4-s slot every 3 volumes, every 10th blank, to the end: the same density all through the run, since
    # the work per volume follows how many trials' responses overlap (random blanks make it wander +-20 %).
    slots = np.array([slot for slot in range(n_volumes // 3) if slot % 10 != 9])
    ts_tv = 1000.0 + np.random.default_rng(4).standard_normal((n_volumes, 4))
    glm = glm_with_trials(4, 4.0 * slots, settings)
    ops_t, parameters_t = np.zeros(n_volumes), np.zeros(n_volumes)
    for k in range(n_volumes):
        before = glm.counters.voxel_row_ops
        glm.add_volume(k, ts_tv[k])
        ops_t[k], parameters_t[k] = glm.counters.voxel_row_ops - before, glm.n_parameters
        assert glm.n_pending == 0
    assert glm.counters.trials_reported + len(glm.finish()) == slots.size
    filling = int(np.ceil((3.0 + 32.0) / TR))  # the volumes until the first trials' responses have ended
    first, last = ops_t[filling : n_volumes // 3], ops_t[-n_volumes // 3 :]
    assert 0.95 < last.mean() / first.mean() < 1.05  # a full refit would do ~4 times the work in the last third
    max_parameters = 2 + int(np.ceil((3.0 + 32.0) / 4.0))  # level, mean response, trials whose responses overlap
    assert parameters_t.max() <= max_parameters
    assert ops_t.max() <= 7 * max_parameters  # fold in + add a trial + report + retire one, each O(p) rows


def test_duplicates_are_ignored_and_conflicting_copies_rejected(noisy_run, caplog):
    ts_tv, onsets_n, _ = noisy_run
    glm = glm_with_trials(ts_tv.shape[1], onsets_n)
    for k in range(50):
        glm.add_volume(k, ts_tv[k])
    assert glm.add_volume(49, ts_tv[49].astype(np.int64)) == []  # same values, another dtype: the same volume
    changed_v = ts_tv[49].copy()
    changed_v[3] += 1.0
    with pytest.raises(ValueError, match="volume 49 arrived again with different data; the first copy is kept"):
        glm.add_volume(49, changed_v)
    glm.add_volume(52, ts_tv[52])
    glm.add_volume(53, ts_tv[53])  # 50 is now missing (50 + 3 arrived)
    with caplog.at_level(logging.WARNING, logger="realtime.glm"):
        assert glm.add_volume(50, ts_tv[50]) == []
    assert "volume 50 arrived after it was declared missing; dropped" in caplog.text
    assert glm.counters.duplicates_ignored == 1 and glm.counters.late_dropped == 1
    assert glm.counters.volumes_missing == 1 and glm.n_pending == 2  # 51 is still awaited; 52, 53 wait for it


def test_bad_input_is_named(noisy_run):
    ts_tv, onsets_n, _ = noisy_run
    glm = glm_with_trials(ts_tv.shape[1], onsets_n)
    with pytest.raises(ValueError, match=r"volume 3: expected 48 voxel values, got shape \(47,\)"):
        glm.add_volume(3, ts_tv[3, :-1])
    nan_v = ts_tv[3].copy()
    nan_v[[1, 5]] = np.nan
    with pytest.raises(ValueError, match="volume 3: 2 of 48 values are NaN or inf; volume rejected"):
        glm.add_volume(3, nan_v)
    for index in (-1, 2.0, True):
        with pytest.raises(ValueError, match="volume index must be an integer >= 0"):
            glm.add_volume(index, ts_tv[0])
    with pytest.raises(ValueError, match="trial 0 was already announced"):
        glm.add_trial(0, 100.0)
    with pytest.raises(ValueError, match="onset_s must be a finite number of seconds >= 0"):
        glm.add_trial("x", -4.0)
    for k in range(20):
        glm.add_volume(k, ts_tv[k])
    with pytest.raises(ValueError, match=r"trial 'late' \(onset 16.0 s\) announced too late: its response starts "
                                         r"at volume 13, but volumes up to 19 are already in the model"):
        glm.add_trial("late", 16.0)
    glm.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        glm.add_volume(20, ts_tv[20])
    with pytest.raises(ValueError, match="post_s must be in"):
        OnlineGLMSettings(tr=TR, post_s=0.0)
    with pytest.raises(ValueError, match="grace_volumes must be an integer >= 1"):
        OnlineGLMSettings(tr=TR, grace_volumes=0)


def test_a_trial_whose_response_never_arrived_is_reported_unestimable(noisy_run):
    ts_tv, onsets_n, _ = noisy_run
    trial = 20
    first, _ = trial_response(onsets_n[trial], 3.0, TR)
    horizon = SETTINGS.horizon_volume(onsets_n[trial])
    lost = range(first, horizon + 1)
    reports = feed(glm_with_trials(ts_tv.shape[1], onsets_n), [k for k in range(N_VOLUMES) if k not in lost], ts_tv)
    beta = reports[trial][0]
    assert beta.beta_pct_v is None and beta.beta_v is None
    assert beta.problem == f"no volume up to {horizon} holding its response arrived"
    assert beta.missing_volumes == tuple(lost)
    later = [i for i in range(onsets_n.size) if trial_response(onsets_n[i], 3.0, TR)[0] > horizon]
    assert all(reports[i][0].problem is None for i in later)  # it joins the model once its response shows
