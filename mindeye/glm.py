"""The reference single-trial GLM: one beta per trial and voxel from one run's time series.

Each trial is a boxcar convolved with SPM's canonical double-gamma HRF, sampled at the volume
times and scaled to a peak of 1; slow drift is a set of Legendre polynomials. Betas are ordinary
least squares, all trials in one model (LSA) or one model per trial (LSS, Mumford et al. 2012),
and convert to percent signal change of the fitted baseline. NSD's betas come from GLMsingle,
which differs in three ways: it picks each voxel's HRF from a library of 20, adds GLMdenoise
noise regressors (principal components of noise-pool voxels) and shrinks betas with voxel-wise
fractional ridge regression. Expect these betas to correlate with NSD's, not to equal them.

Time convention: volume k of a run is acquired at t_k = k * tr, so the first volume is t = 0.
The realtime service's incremental GLM must reproduce these betas; this module is its reference.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre
from scipy import stats

_LSS_MIN_SIN2 = 1e-12  # LSS 2x2 solves whose two columns are closer than this are degenerate


def spm_hrf(dt: float, duration: float = 32.0) -> np.ndarray:
    """SPM's canonical HRF at t = 0, dt, 2 dt, ... up to `duration` seconds, scaled to unit sum.

    A gamma density with delay 6 s minus 1/6 of one with delay 16 s (dispersions 1, onset 0),
    as SPM's spm_hrf defaults. Unit sum makes a boxcar much longer than the HRF, convolved with
    it on the same grid, plateau at the boxcar's height. It peaks at 5 s, turns negative at
    12 s and is lowest near 15.8 s.
    """
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"spm_hrf: dt must be a positive number of seconds, got {dt}")
    if not duration > dt:
        raise ValueError(f"spm_hrf: duration ({duration} s) must exceed dt ({dt} s)")
    t_s = np.arange(int(np.floor(duration / dt + 1e-9)) + 1) * dt  # (n_samples,)
    hrf = stats.gamma.pdf(t_s, 6.0) - stats.gamma.pdf(t_s, 16.0) / 6.0
    return hrf / hrf.sum()


def trial_regressors(
    onsets_s: np.ndarray,
    duration_s: float | np.ndarray,
    n_volumes: int,
    tr: float,
    *,
    oversampling: int = 50,
    hrf: Callable[[float], np.ndarray] = spm_hrf,
) -> np.ndarray:
    """One column per trial (n_volumes, n_trials): its predicted response, peak scaled to 1.

    Each trial is a boxcar from its onset lasting `duration_s` (scalar or one per trial), built
    on a grid of step tr / oversampling (each fine bin holds the fraction of it the stimulus
    covers, so onsets need not fall on the grid), convolved with `hrf(dt)` (a kernel sampled at
    0, dt, 2 dt, ...) and read at the volume times k * tr. Each column is then divided by its maximum over the volumes, so a
    beta is the peak response amplitude in the data's units (GLMsingle scales likewise).
    """
    onsets_n = np.asarray(onsets_s, dtype=float)
    if onsets_n.ndim != 1 or onsets_n.size == 0:
        raise ValueError(f"onsets_s must be a non-empty 1-D array of seconds, got shape {onsets_n.shape}")
    try:
        durations_n = np.broadcast_to(np.asarray(duration_s, dtype=float), onsets_n.shape)
    except ValueError:
        raise ValueError(
            f"duration_s must be a scalar or one value per trial ({onsets_n.size}), "
            f"got shape {np.shape(duration_s)}"
        ) from None
    if not (isinstance(n_volumes, (int, np.integer)) and n_volumes >= 2):
        raise ValueError(f"n_volumes must be an integer >= 2, got {n_volumes!r}")
    if not (np.isfinite(tr) and tr > 0):
        raise ValueError(f"tr must be a positive number of seconds, got {tr}")
    if not (isinstance(oversampling, (int, np.integer)) and oversampling >= 1):
        raise ValueError(f"oversampling must be an integer >= 1, got {oversampling!r}")
    bad_duration_n = ~(np.isfinite(durations_n) & (durations_n > 0))
    if bad_duration_n.any():
        raise ValueError(f"trial durations must be positive and finite: trials {np.flatnonzero(bad_duration_n).tolist()}")
    last_volume_s = (n_volumes - 1) * tr
    outside_n = ~((onsets_n >= 0) & (onsets_n < last_volume_s))  # also catches NaN
    if outside_n.any():
        bad = np.flatnonzero(outside_n)
        raise ValueError(
            f"onsets beyond the run: trials {bad.tolist()} have onsets {onsets_n[bad].tolist()} s, "
            f"outside [0, {last_volume_s:.3f}) s spanned by {n_volumes} volumes at TR {tr} s"
        )

    dt = tr / oversampling
    n_fine = (n_volumes - 1) * oversampling + 1  # fine sample k * oversampling is volume k
    bin_start_f1 = (np.arange(n_fine) * dt)[:, None]  # fine bin f covers [f dt, (f + 1) dt)
    covered_fn = np.minimum(bin_start_f1 + dt, onsets_n + durations_n) - np.maximum(bin_start_f1, onsets_n)
    boxcar_fn = np.clip(covered_fn / dt, 0.0, 1.0)  # fraction of each bin the stimulus covers
    kernel_m = np.asarray(hrf(dt), dtype=float)  # (n_kernel,)
    # Direct (not FFT) convolution keeps the response exactly 0 before each onset, so a trial
    # whose response falls only on dropped volumes makes the design exactly rank-deficient.
    # Only each boxcar's nonzero span is convolved: the same numbers at a fraction of the cost.
    response_fn = np.zeros_like(boxcar_fn)
    for n, boxcar_f in enumerate(boxcar_fn.T):
        covered_f = np.flatnonzero(boxcar_f)
        if covered_f.size == 0:  # a zero duration covers no bin: no response, refused below as all-zero
            continue
        first, last = covered_f[[0, -1]]
        piece = np.convolve(boxcar_f[first:last + 1], kernel_m)[: n_fine - first]
        response_fn[first:first + len(piece), n] = piece
    regressors_tn = response_fn[::oversampling]
    peak_n = regressors_tn.max(axis=0)
    if not (peak_n > 0).all():
        bad = np.flatnonzero(~(peak_n > 0))
        raise ValueError(f"trials {bad.tolist()} predict no positive response at any volume (check the hrf)")
    return regressors_tn / peak_n


def drift_basis(n_volumes: int, tr: float, degree: int | None = None) -> np.ndarray:
    """Legendre polynomials P_0..P_degree over the run (n_volumes, degree + 1); column 0 is ones.

    The run is mapped onto [-1, 1]. The default degree is GLMdenoise's rule, round(run minutes
    / 2) with halves rounded up as MATLAB does, but at least 1: 3 for NSD's 226 volumes at
    TR 4/3 s (5.02 minutes), 2 for runs of [3, 5) minutes.
    """
    if not (isinstance(n_volumes, (int, np.integer)) and n_volumes >= 2):
        raise ValueError(f"n_volumes must be an integer >= 2, got {n_volumes!r}")
    if not (np.isfinite(tr) and tr > 0):
        raise ValueError(f"tr must be a positive number of seconds, got {tr}")
    if degree is None:
        run_minutes = n_volumes * tr / 60.0
        degree = max(1, int(np.floor(run_minutes / 2.0 + 0.5)))
    if not (isinstance(degree, (int, np.integer)) and 0 <= degree < n_volumes):
        raise ValueError(f"degree must be an integer in [0, n_volumes={n_volumes}), got {degree!r}")
    x_t = np.linspace(-1.0, 1.0, n_volumes)
    return legendre.legvander(x_t, degree)


@dataclass(frozen=True)
class GLMResult:
    """Betas and the baseline they are relative to, over the volumes used in the fit.

    `baseline_nv` is the mean, over the fitted volumes, of the nuisance part of the model that
    produced each beta (the signal level with the trial responses removed). LSA fits one model,
    so its rows are one (n_voxels,) array broadcast; LSS fits one model per trial.
    """

    betas_nv: np.ndarray  # (n_trials, n_voxels) peak response amplitude, in the data's units
    baseline_nv: np.ndarray  # (n_trials, n_voxels) in the data's units

    def percent_signal_change(self) -> np.ndarray:
        """(n_trials, n_voxels) betas as % of baseline; see `percent_signal_change`."""
        return percent_signal_change(self.betas_nv, self.baseline_nv)


def fit_lsa(
    timeseries_tv: np.ndarray,
    trial_regressors_tn: np.ndarray,
    nuisance_tk: np.ndarray,
    *,
    valid_t: np.ndarray | None = None,
) -> GLMResult:
    """Least-squares-all: one OLS model holding every trial regressor and the nuisance columns.

    `nuisance_tk` must span a constant (e.g. `drift_basis`). `valid_t` (n_volumes,) bool keeps
    only the volumes marked True: the others are dropped rows, and may hold NaN.
    """
    y_tv, x_tn, nuisance_tk = _valid_rows(timeseries_tv, trial_regressors_tn, nuisance_tk, valid_t)
    # Frisch-Waugh-Lovell: in the model [X, N] the trial betas equal those of regressing y on
    # M_N X, X with its nuisance fit removed; rank[X, N] = rank N + rank M_N X.
    trials_resid_tn = _remove_nuisance(x_tn, nuisance_tk)
    betas_nv, _, rank, _ = np.linalg.lstsq(trials_resid_tn, y_tv, rcond=None)
    if rank < x_tn.shape[1]:
        raise _rank_deficient_error(x_tn, trials_resid_tn, nuisance_tk.shape[1], rank)
    # The residual is orthogonal to the constant, which N spans, so the nuisance fit's mean
    # over the fitted volumes is mean(y) - mean(X) @ betas.
    baseline_v = y_tv.mean(axis=0) - x_tn.mean(axis=0) @ betas_nv
    return GLMResult(betas_nv, np.broadcast_to(baseline_v, betas_nv.shape))


def fit_lss(
    timeseries_tv: np.ndarray,
    trial_regressors_tn: np.ndarray,
    nuisance_tk: np.ndarray,
    *,
    valid_t: np.ndarray | None = None,
) -> GLMResult:
    """Least-squares-separate (Mumford et al. 2012): trial i's beta from the model
    [x_i, s_i, N], where s_i is the sum of every other trial's regressor. Arguments as `fit_lsa`.

    Equivalent to n_trials separate lstsq fits: by Frisch-Waugh-Lovell, x_i's beta in
    [x_i, s_i, N] is its beta in the 2-column fit of y on [M_N x_i, M_N s_i], where M_N removes
    the nuisance fit (the same for every trial, so it is applied once). Each 2x2 system is solved
    in closed form from column sums, for all trials and voxels at once; M_N is symmetric and
    idempotent, so (M_N x)' (M_N y) = (M_N x)' y and y needs no residualising.
    """
    y_tv, x_tn, nuisance_tk = _valid_rows(timeseries_tv, trial_regressors_tn, nuisance_tk, valid_t)
    n_trials = x_tn.shape[1]
    if n_trials < 2:
        raise ValueError("fit_lss needs at least 2 trials (with one trial LSS is LSA: use fit_lsa)")
    trial_tn = _remove_nuisance(x_tn, nuisance_tk)  # M_N x_i
    others_tn = trial_tn.sum(axis=1, keepdims=True) - trial_tn  # M_N s_i
    tt_n = (trial_tn**2).sum(axis=0)
    to_n = (trial_tn * others_tn).sum(axis=0)
    oo_n = (others_tn**2).sum(axis=0)
    det_n = tt_n * oo_n - to_n**2
    degenerate_n = det_n <= _LSS_MIN_SIN2 * tt_n * oo_n  # squared sine of the columns' angle
    if degenerate_n.any():
        raise ValueError(
            f"rank-deficient LSS design for trials {np.flatnonzero(degenerate_n).tolist()}: the trial "
            "regressor is zero, or collinear with the sum of the other trials, once the nuisance "
            "fit is removed (on the valid volumes)"
        )
    ty_nv = trial_tn.T @ y_tv
    oy_nv = others_tn.T @ y_tv
    betas_nv = (oo_n[:, None] * ty_nv - to_n[:, None] * oy_nv) / det_n[:, None]
    others_beta_nv = (tt_n[:, None] * oy_nv - to_n[:, None] * ty_nv) / det_n[:, None]
    # As in fit_lsa, trial i's nuisance fit has mean mean(y) - mean(x_i) b_i - mean(s_i) c_i.
    trial_mean_n = x_tn.mean(axis=0)
    others_mean_n = x_tn.sum(axis=1).mean() - trial_mean_n
    baseline_nv = y_tv.mean(axis=0) - trial_mean_n[:, None] * betas_nv - others_mean_n[:, None] * others_beta_nv
    return GLMResult(betas_nv, baseline_nv)


def percent_signal_change(betas_nv: np.ndarray, baseline_nv: np.ndarray) -> np.ndarray:
    """100 * betas / baseline (arrays broadcast together).

    Where the baseline is <= 0 (voxels outside the brain or without signal) the result is 0,
    not inf or NaN, because NSD's int16 storage has no NaN; a RuntimeWarning counts them.
    """
    betas_nv, baseline_nv = np.broadcast_arrays(np.asarray(betas_nv, float), np.asarray(baseline_nv, float))
    positive_nv = baseline_nv > 0
    pct_nv = np.zeros(betas_nv.shape)
    np.divide(100.0 * betas_nv, baseline_nv, out=pct_nv, where=positive_nv)
    n_bad = int(positive_nv.size - positive_nv.sum())
    if n_bad:
        warnings.warn(
            f"{n_bad} of {positive_nv.size} betas have a baseline <= 0; their percent signal change is set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
    return pct_nv


def _valid_rows(
    timeseries_tv: np.ndarray,
    trial_regressors_tn: np.ndarray,
    nuisance_tk: np.ndarray,
    valid_t: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays as float64, checked, restricted to the valid volumes."""
    arrays = {
        "timeseries_tv": np.asarray(timeseries_tv, dtype=float),
        "trial_regressors_tn": np.asarray(trial_regressors_tn, dtype=float),
        "nuisance_tk": np.asarray(nuisance_tk, dtype=float),
    }
    for name, array in arrays.items():
        if array.ndim != 2 or array.shape[1] == 0:
            raise ValueError(f"{name} must be 2-D (n_volumes, n >= 1), got shape {array.shape}")
    n_volumes = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(n_volumes.values())) > 1:
        raise ValueError(f"mismatched lengths: volumes (rows) per array are {n_volumes}")
    n_total = n_volumes["timeseries_tv"]
    if valid_t is None:
        valid_t = np.ones(n_total, dtype=bool)
    valid_t = np.asarray(valid_t)
    if valid_t.dtype != bool or valid_t.shape != (n_total,):
        raise ValueError(f"valid_t must be a bool array of shape ({n_total},), got {valid_t.dtype} {valid_t.shape}")
    kept_t = np.flatnonzero(valid_t)
    if kept_t.size == 0:
        raise ValueError("valid_t marks no volume as valid")
    y_tv, x_tn, nuisance_tk = (array[kept_t] for array in arrays.values())
    for name, array in zip(arrays, (y_tv, x_tn, nuisance_tk)):
        finite = np.isfinite(array)
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            raise ValueError(
                f"NaN or inf in {name}: {int(finite.size - finite.sum())} values on valid volumes, the first "
                f"at volume {kept_t[row]}, column {col} (mark missing volumes False in valid_t instead)"
            )
    return y_tv, x_tn, nuisance_tk


def _remove_nuisance(x_tn: np.ndarray, nuisance_tk: np.ndarray) -> np.ndarray:
    """M_N x: x minus its least-squares fit by the nuisance columns, which are checked to have
    full column rank and to span a constant (else betas would absorb the signal baseline)."""
    n_volumes, n_nuisance = nuisance_tk.shape
    basis_tk, singular_k, _ = np.linalg.svd(nuisance_tk, full_matrices=False)
    rank = int((singular_k > singular_k.max() * max(nuisance_tk.shape) * np.finfo(float).eps).sum())
    if rank < n_nuisance:
        raise ValueError(
            f"rank-deficient nuisance design: rank {rank} < {n_nuisance} columns on {n_volumes} valid volumes"
        )
    ones_t = np.ones(n_volumes)
    if np.linalg.norm(ones_t - basis_tk @ (basis_tk.T @ ones_t)) > 1e-8 * np.sqrt(n_volumes):
        raise ValueError("nuisance_tk must span a constant: include an intercept column (drift_basis column 0)")
    return x_tn - basis_tk @ (basis_tk.T @ x_tn)


def _rank_deficient_error(x_tn: np.ndarray, trials_resid_tn: np.ndarray, n_nuisance: int, rank: int) -> ValueError:
    """Say why [trials, nuisance] is rank-deficient, naming trials whose regressor vanishes."""
    n_volumes, n_trials = x_tn.shape
    resid_norm_n = np.linalg.norm(trials_resid_tn, axis=0)
    vanished = np.flatnonzero(resid_norm_n <= 1e-10 * np.linalg.norm(x_tn, axis=0).max())
    if n_trials + n_nuisance > n_volumes:
        why = f"{n_trials} trial + {n_nuisance} nuisance columns exceed the {n_volumes} valid volumes"
    elif vanished.size:
        why = f"trials {vanished.tolist()} have regressors that are zero or explained by the nuisance columns"
    else:
        why = "some trial regressors are linear combinations of others (duplicate onsets?)"
    return ValueError(f"rank-deficient design: trial columns have rank {rank} < {n_trials}; {why}")
