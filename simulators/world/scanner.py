"""One run's pre-processed time series, as NSD provides them: int16 volumes at TR 4/3 s.

    signal_v(t) = baseline_v * (1 + [sum_trials response_v,trial * hrf_v(t - onset) + drift_v(t) + noise_v(t)] / 100)

with voxel HRFs shifted from the canonical one (the GLM that estimates betas assumes the
canonical HRF, as real analyses do), a slow polynomial drift, optionally a random-walk drift of
each voxel's own (`snr.voxel_drift_pct`, e.g. `+world.snr.voxel_drift_pct=2`), and AR(1) noise;
zero outside the brain (NSD zeroes non-brain voxels).
"""
from __future__ import annotations

import numpy as np

from mindeye.glm import trial_regressors
from mindeye.nsd.design import IMAGE_SECONDS

N_HRF_SHIFT_BINS = 5  # voxel HRF shifts are rounded to this many values (one regressor set each)


def run_timeseries(onsets_s: np.ndarray, trial_response_nv: np.ndarray, hrf_shift_v: np.ndarray,
                   baseline_v: np.ndarray, n_volumes: int, tr: float, snr_cfg,
                   rng: np.random.Generator) -> np.ndarray:
    """(n_volumes, V) int16 time series of the V brain voxels; `trial_response_nv` in % signal change
    (zero for voxels without signal), `hrf_shift_v` in seconds."""
    n_voxels = len(baseline_v)
    pct_tv = np.zeros((n_volumes, n_voxels))
    if len(onsets_s):
        edges = np.linspace(hrf_shift_v.min(), hrf_shift_v.max() + 1e-9, N_HRF_SHIFT_BINS + 1)
        bin_v = np.clip(np.digitize(hrf_shift_v, edges) - 1, 0, N_HRF_SHIFT_BINS - 1)
        for b in np.unique(bin_v):
            voxels = bin_v == b
            shift = 0.5 * (edges[b] + edges[b + 1])
            regressors_tn = trial_regressors(onsets_s + shift, IMAGE_SECONDS, n_volumes, tr)
            pct_tv[:, voxels] = regressors_tn @ trial_response_nv[:, voxels]
    pct_tv += _drift_pct(n_volumes, n_voxels, snr_cfg.drift_pct, rng)
    voxel_drift_pct = getattr(snr_cfg, "voxel_drift_pct", 0.0)  # absent in the default worlds: their data unchanged
    if voxel_drift_pct:
        pct_tv += _voxel_walk_pct(n_volumes, n_voxels, voxel_drift_pct, rng)
    pct_tv += _ar1_noise(n_volumes, n_voxels, snr_cfg.ar1, rng) * snr_cfg.ts_noise_pct
    values_tv = baseline_v * (1.0 + pct_tv / 100.0)
    return np.clip(np.round(values_tv), -32768, 32767).astype(np.int16)


def _drift_pct(n_volumes: int, n_voxels: int, amplitude_pct: float, rng: np.random.Generator) -> np.ndarray:
    """Slow drift: random cubic polynomials over the run, shared shape plus a voxel-specific part."""
    x_t = np.linspace(-1, 1, n_volumes)[:, None]
    basis_tk = np.concatenate([x_t, x_t ** 2 - 1 / 3, x_t ** 3 - 0.6 * x_t], axis=1)
    weights_kv = 0.6 * rng.standard_normal((3, 1)) + 0.4 * rng.standard_normal((3, n_voxels))
    return amplitude_pct * basis_tk @ weights_kv


def _voxel_walk_pct(n_volumes: int, n_voxels: int, sd_pct: float, rng: np.random.Generator) -> np.ndarray:
    """Drift that differs between voxels, as in time series that were not high-pass filtered (NSD's): an
    independent random walk per voxel, its standard deviation over the run `sd_pct`."""
    walk_tv = np.cumsum(rng.standard_normal((n_volumes, n_voxels)), axis=0)
    walk_tv -= walk_tv.mean(axis=0)
    return sd_pct * walk_tv / walk_tv.std(axis=0)


def _ar1_noise(n_volumes: int, n_voxels: int, ar1: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance AR(1) noise per voxel, (n_volumes, V)."""
    innovations = rng.standard_normal((n_volumes, n_voxels)) * np.sqrt(1 - ar1 ** 2)
    noise = np.empty_like(innovations)
    noise[0] = rng.standard_normal(n_voxels)
    for t in range(1, n_volumes):
        noise[t] = ar1 * noise[t - 1] + innovations[t]
    return noise
