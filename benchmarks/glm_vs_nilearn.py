"""The realtime incremental GLM against real-time MindEye's nilearn LSS refit, on one synthetic NSD run.

Real-time MindEye (rtcloud-projects `mindeye`) refits, for every trial, a nilearn FirstLevelModel on
all volumes so far: events cropped to the trials up to this one, this one "probe" and the rest
"reference", glover HRF, no drift model, AR(1) noise, no scaling. This script fits both on the same
run (TR 4/3 s, 226 volumes, 62 trials in NSD's slots, the synthetic world's scanner model) and prints
(a) how their betas agree with each other and with the truth, (b) the cost of nilearn's refit for
the final trial against ours, measured side by side, (c) our cost per volume through the run.
nilearn is fitted at each trial's horizon (onset + post_s, the volume our beta is ready at) so both
see the same volumes. Timings are of this machine; compare the ratios. OPENBLAS_NUM_THREADS=1 puts
both on one thread (nilearn's n_jobs is 1), the like-for-like comparison on a shared machine.

The sweep behind `OnlineGLMSettings`' defaults, and the comparison under per-voxel drift on a simulator
of its own, are `benchmarks/glm_drift.py`'s.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/glm_vs_nilearn.py [--voxels 15000] [--seed 0]
"""
from __future__ import annotations

import argparse
import time
import warnings
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.glm.first_level import FirstLevelModel

from mindeye.glm import drift_basis, fit_lsa, fit_lss, trial_regressors
from realtime.glm import IncrementalGLM, OnlineGLMSettings, TrialBeta
from simulators.world.scanner import run_timeseries

TR = 4.0 / 3.0
N_VOLUMES = 226
N_TRIALS = 62
GRID_XY = 25  # nilearn gets the voxels as a (25, 25, nz) block


def simulate_run(n_voxels: int, seed: int, noise_pct: float = 1.0, drift_pct: float = 2.0):
    """(timeseries_tv, onsets_n, true responses (n_trials, V) in % signal change), as the small world makes
    them: responses 1 +- 2 % plus 1.5 % trial noise, voxel HRFs shifted 0.5 s (sd), AR(1) 0.4 noise."""
    rng = np.random.default_rng(seed)
    onsets_n = 4.0 * np.sort(rng.choice(np.arange(3, 75 - 4), N_TRIALS, replace=False))
    image_response_nv = 1.0 + 2.0 * rng.standard_normal((N_TRIALS, n_voxels))
    response_nv = image_response_nv + 1.5 * rng.standard_normal((N_TRIALS, n_voxels))  # trial-to-trial noise
    hrf_shift_v = 0.5 * rng.standard_normal(n_voxels)
    baseline_v = 1000.0 * (1 + 0.1 * rng.standard_normal(n_voxels))
    snr = SimpleNamespace(drift_pct=drift_pct, ar1=0.4, ts_noise_pct=noise_pct)
    ts_tv = run_timeseries(onsets_n, response_nv, hrf_shift_v, baseline_v, N_VOLUMES, TR, snr, rng)
    return ts_tv.astype(float), onsets_n, response_nv


def run_incremental(ts_tv: np.ndarray, onsets_n: np.ndarray, settings: OnlineGLMSettings):
    """Feed the run in order: (reports by trial, seconds per add_volume (T,), row ops per volume (T,),
    parameters in play after each volume (T,), seconds of the call that reported each trial (n_trials,))."""
    glm = IncrementalGLM(ts_tv.shape[1], settings)
    for i, onset in enumerate(onsets_n):
        glm.add_trial(i, onset)
    reports: dict[int, TrialBeta] = {}
    seconds_t, ops_t, parameters_t = np.zeros(len(ts_tv)), np.zeros(len(ts_tv)), np.zeros(len(ts_tv))
    report_seconds_n = np.full(len(onsets_n), np.nan)
    for k, values_v in enumerate(ts_tv):
        ops_before, start = glm.counters.voxel_row_ops, time.perf_counter()
        ready = glm.add_volume(k, values_v)
        seconds_t[k], ops_t[k] = time.perf_counter() - start, glm.counters.voxel_row_ops - ops_before
        parameters_t[k] = glm.n_parameters
        for beta in ready:
            reports[beta.trial_id] = beta
            report_seconds_n[beta.trial_id] = seconds_t[k]
    reports.update({beta.trial_id: beta for beta in glm.finish()})
    return reports, seconds_t, ops_t, parameters_t, report_seconds_n


def nilearn_refit(ts_tv: np.ndarray, onsets_n: np.ndarray, probe: int, horizon: int) -> tuple[np.ndarray, float]:
    """Real-time MindEye's LSS refit for trial `probe` on volumes 0..horizon: (effect size (V,), seconds)."""
    n_voxels = ts_tv.shape[1]
    nz = -(-n_voxels // GRID_XY**2)
    in_mask = np.arange(GRID_XY * GRID_XY * nz) < n_voxels
    data = np.zeros((in_mask.size, horizon + 1), dtype=np.float32)
    data[in_mask] = ts_tv[: horizon + 1].T
    img = nib.Nifti1Image(data.reshape(GRID_XY, GRID_XY, nz, horizon + 1), np.eye(4))
    mask = nib.Nifti1Image(in_mask.reshape(GRID_XY, GRID_XY, nz).astype(np.int8), np.eye(4))
    cropped = onsets_n[onsets_n <= onsets_n[probe]]
    events = pd.DataFrame({"onset": cropped, "duration": 3.0,
                           "trial_type": ["probe" if o == onsets_n[probe] else "reference" for o in cropped]})
    model = FirstLevelModel(t_r=TR, slice_time_ref=0, hrf_model="glover", drift_model=None, high_pass=None,
                            mask_img=mask, signal_scaling=False, smoothing_fwhm=None, noise_model="ar1",
                            n_jobs=1, verbose=0, minimize_memory=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "mask will be resampled", "matrix is singular at..." chatter
        model.fit(img, events=events)
        effect_img = model.compute_contrast("probe", output_type="effect_size")
    seconds = time.perf_counter() - start
    return effect_img.get_fdata().reshape(-1)[in_mask], seconds


def corr_per_trial(a_nv: np.ndarray, b_nv: np.ndarray) -> np.ndarray:
    a_nv = a_nv - a_nv.mean(axis=1, keepdims=True)
    b_nv = b_nv - b_nv.mean(axis=1, keepdims=True)
    return (a_nv * b_nv).sum(axis=1) / np.sqrt((a_nv**2).sum(axis=1) * (b_nv**2).sum(axis=1))


def summary(c_n: np.ndarray) -> str:
    return f"median {np.median(c_n):.3f}, 5th pct {np.percentile(c_n, 5):.3f}"


def compare(n_voxels: int, seed: int, n_nilearn: int) -> None:
    settings = OnlineGLMSettings(tr=TR)
    print(f"run: {N_VOLUMES} volumes at TR {TR:.3f} s, {N_TRIALS} trials, {n_voxels} voxels, seed {seed}; "
          f"ours: post_s {settings.post_s}, drift_per_s {settings.drift_per_s}, response_sd {settings.response_sd}")
    ts_tv, onsets_n, truth_nv = simulate_run(n_voxels, seed)
    reports, seconds_t, ops_t, parameters_t, report_seconds_n = run_incremental(ts_tv, onsets_n, settings)
    ours_nv = np.stack([reports[i].beta_v for i in range(N_TRIALS)])
    ours_pct_nv = np.stack([reports[i].beta_pct_v for i in range(N_TRIALS)])

    probes = np.unique(np.linspace(0, N_TRIALS - 1, min(n_nilearn, N_TRIALS)).round().astype(int))
    nilearn_nv, nilearn_pct_nv, nilearn_seconds_n = [], [], []
    for i in probes:
        horizon = reports[i].horizon_volume
        effect_v, seconds = nilearn_refit(ts_tv, onsets_n, i, horizon)
        nilearn_nv.append(effect_v)
        nilearn_pct_nv.append(100 * effect_v / ts_tv[: horizon + 1].mean(axis=0))  # glover's peak is not 1
        nilearn_seconds_n.append(seconds)
    nilearn_nv, nilearn_pct_nv = np.stack(nilearn_nv), np.stack(nilearn_pct_nv)

    regressors_tn, nuisance_tk = trial_regressors(onsets_n, 3.0, N_VOLUMES, TR), drift_basis(N_VOLUMES, TR)
    lsa_pct_nv = fit_lsa(ts_tv, regressors_tn, nuisance_tk).percent_signal_change()
    lss_pct_nv = fit_lss(ts_tv, regressors_tn, nuisance_tk).percent_signal_change()
    which = "all trials" if probes.size == N_TRIALS else f"trials {probes.tolist()}"
    print(f"\n(a) agreement, correlation over voxels per trial (nilearn refit on {which})")
    print(f"    ours vs nilearn RT refit:      {summary(corr_per_trial(ours_nv[probes], nilearn_nv))}")
    print(f"    ours vs truth:                 {summary(corr_per_trial(ours_pct_nv, truth_nv))}  (all trials)")
    print(f"    nilearn RT refit vs truth:     {summary(corr_per_trial(nilearn_pct_nv, truth_nv[probes]))}")
    print(f"    ours on those trials vs truth: {summary(corr_per_trial(ours_pct_nv[probes], truth_nv[probes]))}")
    print(f"    full-run fit_lsa vs truth:     {summary(corr_per_trial(lsa_pct_nv, truth_nv))}  (sees the future)")
    print(f"    full-run fit_lss vs truth:     {summary(corr_per_trial(lss_pct_nv, truth_nv))}  (sees the future)")
    print(f"    ours vs full-run fit_lsa:      {summary(corr_per_trial(ours_pct_nv, lsa_pct_nv))}")
    print(f"    ours vs full-run fit_lss:      {summary(corr_per_trial(ours_pct_nv, lss_pct_nv))}")

    last = N_TRIALS - 1
    ours_trial_s, ours_volume_s = report_seconds_n[last], np.median(seconds_t)
    print(f"\n(b) cost at the end of the run (trial {last}, horizon volume {reports[last].horizon_volume})")
    if probes[-1] == last:
        nilearn_s = nilearn_seconds_n[-1]
        print(f"    nilearn refit (fit + contrast, 1 job): {1e3 * nilearn_s:9.1f} ms")
        print(f"    ours, the volume call that reported it: {1e3 * ours_trial_s:8.3f} ms  "
              f"-> nilearn / ours = {nilearn_s / ours_trial_s:,.0f}x")
        print(f"    ours, median volume call:               {1e3 * ours_volume_s:8.3f} ms  "
              f"-> nilearn / ours = {nilearn_s / ours_volume_s:,.0f}x")
    print(f"    nilearn refit for trial {probes[0]} (horizon {reports[probes[0]].horizon_volume}): "
          f"{1e3 * nilearn_seconds_n[0]:.1f} ms; for trial {probes[-1]}: {1e3 * nilearn_seconds_n[-1]:.1f} ms "
          f"(grows with the volumes so far)")
    print(f"    ours over all reporting calls: median {1e3 * np.nanmedian(report_seconds_n):.3f} ms, "
          f"max {1e3 * np.nanmax(report_seconds_n):.3f} ms")

    thirds = np.array_split(np.arange(N_VOLUMES), 3)
    print("\n(c) our cost per volume through the run (first / middle / last third of the volumes)")
    print("    median ms per add_volume: " + " / ".join(f"{1e3 * np.median(seconds_t[t]):.3f}" for t in thirds))
    print("    mean ms per add_volume:   " + " / ".join(f"{1e3 * np.mean(seconds_t[t]):.3f}" for t in thirds))
    print("    mean (V,) row ops:        " + " / ".join(f"{ops_t[t].mean():.1f}" for t in thirds))
    print("    mean parameters in play:  " + " / ".join(f"{parameters_t[t].mean():.1f}" for t in thirds)
          + "  (the work follows the trials whose responses overlap: fewer in the first 35 s and near blanks)")
    n_long = 900  # 20 minutes, the same density throughout: a 4-s slot every 3 volumes, every 10th blank
    slots = np.array([slot for slot in range(n_long // 3 - 9) if slot % 10 != 9])
    noise_tv = 1000.0 + np.random.default_rng(seed).standard_normal((n_long, n_voxels))
    _, seconds_t, ops_t, parameters_t, _ = run_incremental(noise_tv, 4.0 * slots, settings)
    thirds = np.array_split(np.arange(n_long), 3)
    print(f"    a {n_long}-volume run ({len(slots)} trials, even density): median ms per add_volume "
          + " / ".join(f"{1e3 * np.median(seconds_t[t]):.3f}" for t in thirds)
          + ", mean row ops " + " / ".join(f"{ops_t[t].mean():.1f}" for t in thirds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voxels", type=int, default=15000, help="ROI voxels (default 15000, NSD scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic run")
    parser.add_argument("--nilearn-trials", type=int, default=N_TRIALS,
                        help=f"trials to refit with nilearn, evenly spaced, the last included (default all {N_TRIALS})")
    args = parser.parse_args()
    compare(args.voxels, args.seed, max(1, args.nilearn_trials))


if __name__ == "__main__":
    main()
