"""The realtime service's single-trial GLM: one beta map per trial as soon as its response has
arrived, for the same work per volume at the start of a run as at its end.

Model. Each voxel's signal is a level that drifts as a random walk (`drift_per_s` of the noise
variance a second; NSD's time series are not high-pass filtered and drift differently in every
voxel), plus every trial's regressor times its response, plus white noise. A trial's response
is the voxel's mean response plus the trial's own deviation, with a normal prior on the deviation
(`response_sd` noise SDs): the data decide the mean response, and a trial whose regressor is
nearly collinear with its neighbours' (trials back to back) is pulled toward it rather than
fitted to noise. Regressors are exactly as `mindeye.glm` makes them (boxcar * SPM canonical
HRF, peak 1, volume k at t = k tr). At a trial's horizon h (the last volume at or before
onset + `post_s`) its beta is the posterior mean given every volume k <= h that arrived (the GLS
estimate under that covariance), in percent of the level at h, as in
`GLMResult.percent_signal_change`. `reference_betas` computes it from a whole array with dense
GLS; `IncrementalGLM` gets the same numbers (allclose 1e-6, tests/test_realtime_glm.py) one
volume at a time. The settings are in units of each voxel's noise, so one filter serves every
voxel and the betas do not depend on a voxel's scale. docs/realtime.md has the measured accuracy
against nilearn's refits under drift, and the sweep behind the defaults
(`benchmarks/glm_drift.py`).

Constant work. The fit is an information filter over the parameters still in play: the level,
the mean response and the trials whose response overlaps the newest volume (at most ~10 on NSD
timing): the information matrix A (p x p) and vector B (p x V). A volume costs the level's walk
(a rank-1 downdate of A, B <- B - g a B_0) and one rank-1 update, O(p V). A trial whose response
has ended is removed by its Schur complement, which is exact because no later volume involves
it. A report solves a p x p system and applies two rows of its inverse to B, O(p V). The work
does not grow with the run, nor does the memory: B, a reorder buffer of at most `grace_volumes`
volumes, and a 16-byte digest per volume for the duplicate check. `counters.voxel_row_ops`
counts the (V,) row operations.

Faults. Volumes are folded in in index order. A volume is missing if it has not come by the
time a volume `grace_volumes` later has arrived. Its row is dropped (as `valid_t` in
`mindeye.glm`), and the trials whose response window holds it say so in their diagnostics. If
it comes later, it is logged and dropped, so every trial sees the same missing set. Trials
fitted before a fault are untouched. Later ones feel it less the further the level has walked
since. A duplicate with the same data is ignored. A duplicate with different data is a
ValueError, and the first copy stays in use: a scanner never rewrites a volume, so two copies
that differ mean a broken pipeline. Trials may be announced during the run, but before the
volume that first holds their response is folded in (else a ValueError); the model of every
earlier trial then already includes them.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from mindeye.glm import GLMResult, percent_signal_change, trial_regressors
from mindeye.nsd.design import IMAGE_SECONDS

log = logging.getLogger(__name__)

HRF_SECONDS = 32.0  # the length of mindeye.glm.spm_hrf's kernel: a response ends this long after its stimulus
_MAX_CONDITION = 1e10  # a report whose (scaled) normal equations are worse conditioned is unestimable


@dataclass(frozen=True)
class OnlineGLMSettings:
    """When a trial's beta is reported, and the model it comes from.

    `post_s`: the beta is reported once the volume at or before onset + post_s is in; the
    canonical response to a 3-s image peaks ~6 s after onset. `drift_per_s`: the variance the
    signal level gains per second (a random walk), in units of the noise variance; 0 keeps one
    constant level for the run. `response_sd`: how far a trial's response lies from the voxel's
    mean response (the spread of the prior on it), in noise standard deviations; large values
    approach unshrunk LSA. `grace_volumes`: a volume is missing once one this many volumes later
    has arrived (the most reordering tolerated).
    """

    tr: float
    post_s: float = 12.0
    drift_per_s: float = 0.1
    response_sd: float = 3.0
    grace_volumes: int = 3

    def __post_init__(self):
        if not (np.isfinite(self.tr) and self.tr > 0):
            raise ValueError(f"tr must be a positive number of seconds, got {self.tr}")
        if not (np.isfinite(self.post_s) and 0 < self.post_s <= HRF_SECONDS):
            raise ValueError(f"post_s must be in (0, {HRF_SECONDS}] s, got {self.post_s}")
        if not (np.isfinite(self.drift_per_s) and self.drift_per_s >= 0):
            raise ValueError(f"drift_per_s must be a finite number >= 0, got {self.drift_per_s}")
        if not (np.isfinite(self.response_sd) and self.response_sd > 0):
            raise ValueError(f"response_sd must be a finite number > 0, got {self.response_sd}")
        if not (isinstance(self.grace_volumes, (int, np.integer)) and self.grace_volumes >= 1):
            raise ValueError(f"grace_volumes must be an integer >= 1, got {self.grace_volumes!r}")

    def drift_variance(self, n_volumes: int | np.ndarray) -> float | np.ndarray:
        """What the level's variance grows by over n volumes, in units of the noise variance."""
        return self.drift_per_s * self.tr * n_volumes

    @property
    def response_precision(self) -> float:
        """The prior's information on a trial's deviation from the mean response."""
        return 1.0 / self.response_sd**2

    def horizon_volume(self, onset_s: float) -> int:
        """The last volume of a trial's fit: the one at or before onset + post_s."""
        return int(np.floor((onset_s + self.post_s) / self.tr + 1e-9))


def trial_response(onset_s: float, duration_s: float, tr: float) -> tuple[int, np.ndarray]:
    """(first_volume, response_r): one trial's regressor where it is nonzero, on volumes
    first_volume, first_volume + 1, ...

    The numbers `mindeye.glm.trial_regressors` gives this trial in a run that holds its peak,
    computed on a few dozen volumes: the onset is shifted by whole TRs, which keeps the fine
    grid (tr / oversampling) aligned, so the cost does not depend on where the trial is.
    """
    shift = int(np.floor(onset_s / tr))
    if onset_s - shift * tr < 0:  # the quotient rounded up to a whole number
        shift -= 1
    local_onset_s = onset_s - shift * tr
    n_local = int(np.ceil((local_onset_s + duration_s + HRF_SECONDS) / tr)) + 2
    response_t = trial_regressors(np.array([local_onset_s]), duration_s, n_local, tr)[:, 0]
    nonzero = np.flatnonzero(response_t)
    return shift + int(nonzero[0]), response_t[nonzero[0] : nonzero[-1] + 1]


def reference_betas(
    timeseries_tv: np.ndarray,
    onsets_s: np.ndarray,
    settings: OnlineGLMSettings,
    *,
    durations_s: float | np.ndarray = IMAGE_SECONDS,
    valid_t: np.ndarray | None = None,
) -> GLMResult:
    """Every trial's beta and baseline as `IncrementalGLM` reports them, from the whole array.

    Trial i: dense GLS on the valid volumes k <= h_i = min(its horizon, n_volumes - 1), with columns
    a constant, the sum of the trials and every trial nonzero on those volumes, covariance white
    noise + the level's random walk from the first valid volume, and the prior's information on
    each trial's deviation; its beta is the mean response + its deviation, its baseline the constant
    + the walk's prediction at h_i. `valid_t` (n_volumes,) bool marks the volumes that arrived. The
    test oracle, written apart from the filter: O(n_volumes^3) work per trial.
    """
    y_tv = np.asarray(timeseries_tv, dtype=float)
    if y_tv.ndim != 2:
        raise ValueError(f"timeseries_tv must be 2-D (n_volumes, n_voxels), got shape {y_tv.shape}")
    n_volumes = y_tv.shape[0]
    onsets_n = np.asarray(onsets_s, dtype=float).reshape(-1)
    durations_n = np.broadcast_to(np.asarray(durations_s, dtype=float), onsets_n.shape)
    valid_t = np.ones(n_volumes, dtype=bool) if valid_t is None else np.asarray(valid_t, dtype=bool)
    if valid_t.shape != (n_volumes,):
        raise ValueError(f"valid_t must have shape ({n_volumes},), got {valid_t.shape}")
    if not np.isfinite(y_tv[valid_t]).all():
        raise ValueError("timeseries_tv has NaN or inf on valid volumes (mark missing volumes False in valid_t)")

    regressors_tn = np.zeros((n_volumes, onsets_n.size))
    for n, (onset_s, duration_s) in enumerate(zip(onsets_n, durations_n)):
        first, response_r = trial_response(onset_s, duration_s, settings.tr)
        stop = min(n_volumes, first + response_r.size)
        regressors_tn[first:stop, n] = response_r[: max(0, stop - first)]

    betas_nv = np.empty((onsets_n.size, y_tv.shape[1]))
    baseline_nv = np.empty_like(betas_nv)
    for i, onset_s in enumerate(onsets_n):
        horizon = min(settings.horizon_volume(onset_s), n_volumes - 1)
        rows_r = np.flatnonzero(valid_t[: horizon + 1])
        in_model = np.flatnonzero((regressors_tn[rows_r] != 0).any(axis=0))
        if i not in in_model:
            raise ValueError(f"trial {i}: no valid volume up to its horizon (volume {horizon}) holds its response")
        trials_rm = regressors_tn[np.ix_(rows_r, in_model)]
        design_rp = np.column_stack([np.ones(rows_r.size), trials_rm.sum(axis=1), trials_rm])
        # the level's random walk from the first valid volume on, plus white noise of unit variance
        walked_r = settings.drift_variance(rows_r - rows_r[0])
        covariance_rr = np.minimum.outer(walked_r, walked_r) + np.eye(rows_r.size)
        whiten = np.linalg.cholesky(covariance_rr)
        design_w = np.linalg.solve(whiten, design_rp)
        data_w = np.linalg.solve(whiten, y_tv[rows_r])
        prior_pp = np.diag([0.0, 0.0] + [settings.response_precision] * in_model.size)
        info_pp = design_w.T @ design_w + prior_pp
        coef_pv = np.linalg.solve(info_pp, design_w.T @ data_w)
        # the level at the horizon: the constant plus the walk's prediction at the last valid volume
        residual_w = data_w - design_w @ coef_pv
        walk_v = np.linalg.solve(whiten.T, residual_w).T @ walked_r
        baseline_nv[i] = coef_pv[0] + walk_v
        betas_nv[i] = coef_pv[1] + coef_pv[2 + int(np.searchsorted(in_model, i))]
    return GLMResult(betas_nv, baseline_nv)


@dataclass(frozen=True)
class TrialBeta:
    """One trial's beta map, reported once; the arrays are None when it was unestimable (`problem`)."""

    trial_id: Hashable
    onset_s: float
    beta_pct_v: np.ndarray | None  # (V,) percent of baseline_v
    beta_v: np.ndarray | None  # (V,) peak response amplitude, in the data's units
    baseline_v: np.ndarray | None  # (V,) the model's signal level, in the data's units
    horizon_volume: int  # the last volume in the fit
    ready_volume: int  # the volume whose arrival made the beta ready
    response_volumes: int  # volumes from the first that holds its response to the horizon
    missing_volumes: tuple[int, ...]  # of those, the ones that never came
    problem: str | None = None


@dataclass
class GLMCounters:
    """What the GLM did so far; `voxel_row_ops` is its per-voxel work, (V,) row operations."""

    volumes_used: int = 0
    volumes_missing: int = 0
    duplicates_ignored: int = 0
    late_dropped: int = 0
    trials_reported: int = 0
    voxel_row_ops: int = 0


@dataclass
class _Trial:
    trial_id: Hashable
    onset_s: float
    first_volume: int
    response_r: np.ndarray  # (n_response,) its regressor on volumes first_volume, ...
    horizon_volume: int
    missing: list[int] = field(default_factory=list)
    reported: bool = False

    @property
    def last_volume(self) -> int:
        return self.first_volume + self.response_r.size - 1

    def value_at(self, k: int) -> float:
        return float(self.response_r[k - self.first_volume]) if self.first_volume <= k <= self.last_volume else 0.0


class IncrementalGLM:
    """One run's single-trial betas, fed one volume at a time (see the module docstring).

    `add_volume` and `finish` return the `TrialBeta`s they made ready, each trial once, in
    onset order. Not thread-safe: one ingest loop feeds it.
    """

    def __init__(self, n_voxels: int, settings: OnlineGLMSettings):
        if not (isinstance(n_voxels, (int, np.integer)) and n_voxels >= 1):
            raise ValueError(f"n_voxels must be a positive integer, got {n_voxels!r}")
        self.n_voxels = int(n_voxels)
        self.settings = settings
        self.counters = GLMCounters()
        self._ids: set[Hashable] = set()
        self._waiting: list[_Trial] = []  # announced, not yet in the model; by first_volume
        self._unreported: list[_Trial] = []  # by onset (so by first_volume and horizon too)
        self._active: list[_Trial] = []  # in the model, parameters 2.. (0 the level, 1 the mean response)
        self._info_pp = np.zeros((2, 2))  # A: the information on the parameters (data and prior)
        self._moments_pv = np.zeros((2, self.n_voxels))  # B: the information vector, one column a voxel
        self._pending: dict[int, np.ndarray] = {}  # arrived, not yet folded in; at most grace_volumes
        self._digests: dict[int, bytes | None] = {}  # every volume index seen: its digest, None if missing
        self._last_used = -1  # the last volume folded into A and B
        self._committed = -1  # every volume up to this one is folded in or missing
        self._newest = -1
        self._finished = False

    def add_trial(self, trial_id: Hashable, onset_s: float, duration_s: float = IMAGE_SECONDS) -> None:
        """Announce a trial: a `duration_s` image shown `onset_s` seconds after volume 0 began."""
        if self._finished:
            raise RuntimeError("add_trial after finish(): the run is over")
        if trial_id in self._ids:
            raise ValueError(f"trial {trial_id!r} was already announced")
        if not (np.isfinite(onset_s) and onset_s >= 0):
            raise ValueError(f"trial {trial_id!r}: onset_s must be a finite number of seconds >= 0, got {onset_s}")
        if not (np.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"trial {trial_id!r}: duration_s must be positive and finite, got {duration_s}")
        first, response_r = trial_response(float(onset_s), float(duration_s), self.settings.tr)
        if first <= self._committed:
            raise ValueError(
                f"trial {trial_id!r} (onset {onset_s} s) announced too late: its response starts at volume {first}, "
                f"but volumes up to {self._committed} are already in the model"
            )
        trial = _Trial(trial_id, float(onset_s), first, response_r, self.settings.horizon_volume(onset_s))
        self._ids.add(trial_id)
        bisect.insort(self._waiting, trial, key=lambda t: t.first_volume)
        bisect.insort(self._unreported, trial, key=lambda t: t.onset_s)

    def add_volume(self, index: int, values_v: np.ndarray) -> list[TrialBeta]:
        """Take volume `index` (0-based) of the ROI voxels, (V,); return the betas it made ready."""
        if self._finished:
            raise RuntimeError(f"add_volume({index}) after finish(): the run is over")
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
            raise ValueError(f"volume index must be an integer >= 0, got {index!r}")
        index = int(index)
        y_v = np.array(values_v, dtype=float)  # a copy: the caller may reuse its buffer
        if y_v.shape != (self.n_voxels,):
            raise ValueError(f"volume {index}: expected {self.n_voxels} voxel values, got shape {y_v.shape}")
        n_bad = int(y_v.size - np.isfinite(y_v).sum())
        if n_bad:
            raise ValueError(f"volume {index}: {n_bad} of {y_v.size} values are NaN or inf; volume rejected")
        digest = hashlib.blake2b(y_v.tobytes(), digest_size=16).digest()
        if index in self._digests:
            return self._repeat(index, digest)
        self._digests[index] = digest
        self._pending[index] = y_v
        self._newest = max(self._newest, index)
        return self._fold_in(ready_volume=index, drain=False)

    def finish(self) -> list[TrialBeta]:
        """End the run: fold in what arrived, and report every remaining trial with the data there is."""
        if self._finished:
            return []
        reports = self._fold_in(ready_volume=self._newest, drain=True)
        while self._unreported:
            reports.append(self._report(self._unreported.pop(0), self._committed, self._newest))
        self._finished = True
        return reports

    @property
    def n_parameters(self) -> int:
        """Rows of the state B: the level, the mean response and the trials in play."""
        return self._moments_pv.shape[0]

    @property
    def n_pending(self) -> int:
        """Volumes that arrived ahead of a gap and wait to be folded in."""
        return len(self._pending)

    def _repeat(self, index: int, digest: bytes) -> list[TrialBeta]:
        seen = self._digests[index]
        if seen is None:
            self.counters.late_dropped += 1
            log.warning("volume %d arrived after it was declared missing; dropped", index)
            return []
        if seen != digest:
            raise ValueError(f"volume {index} arrived again with different data; the first copy is kept")
        self.counters.duplicates_ignored += 1
        return []

    def _fold_in(self, ready_volume: int, drain: bool) -> list[TrialBeta]:
        """Fold in volumes in index order while the next one is here or known missing."""
        reports = []
        while True:
            k = self._committed + 1
            if k in self._pending:
                self._use(k, self._pending.pop(k))
            elif k <= self._newest and (drain or self._newest >= k + self.settings.grace_volumes):
                self._declare_missing(k)
            else:
                return reports
            self._committed = k
            while self._unreported and self._unreported[0].horizon_volume <= k:
                reports.append(self._report(self._unreported.pop(0), k, ready_volume))
            self._retire_ended(k)

    def _use(self, k: int, y_v: np.ndarray) -> None:
        """Let the level walk to volume k, then add volume k's row to A and B."""
        if self._last_used >= 0:
            self._walk_level(self.settings.drift_variance(k - self._last_used))
        while self._waiting and self._waiting[0].first_volume <= k:
            trial = self._waiting.pop(0)
            if k <= trial.last_volume:  # else every volume of its response was missing: it never enters
                self._activate(trial)
        trials_p = [trial.value_at(k) for trial in self._active]
        regressors_p = np.array([1.0, sum(trials_p), *trials_p])
        self._info_pp += np.outer(regressors_p, regressors_p)
        self._moments_pv += regressors_p[:, None] * y_v
        self.counters.voxel_row_ops += regressors_p.size
        self.counters.volumes_used += 1
        self._last_used = k

    def _walk_level(self, variance: float) -> None:
        """The information filter's prediction step: the level (parameter 0) gains `variance`.
        A <- (A^-1 + q e0 e0')^-1 = A - g a a' with a = A e0, g = q / (1 + q a_0), and B <- B - g a B_0,
        which keeps A^-1 B; both forms hold for a singular A (no information on some parameters yet)."""
        if variance == 0.0:
            return
        column_p = self._info_pp[:, 0].copy()
        gain = variance / (1.0 + variance * column_p[0])
        self._info_pp -= gain * np.outer(column_p, column_p)
        self._moments_pv -= np.outer(gain * column_p, self._moments_pv[0])
        self.counters.voxel_row_ops += self._moments_pv.shape[0]

    def _activate(self, trial: _Trial) -> None:
        """A new parameter, a trial's deviation from the mean response: the prior's information in A
        (mean 0, variance response_sd^2), a zero row in B."""
        self._active.append(trial)
        self._info_pp = np.pad(self._info_pp, ((0, 1), (0, 1)))
        self._info_pp[-1, -1] = self.settings.response_precision
        self._moments_pv = np.vstack([self._moments_pv, np.zeros(self.n_voxels)])
        self.counters.voxel_row_ops += 1

    def _retire_ended(self, k: int) -> None:
        """Marginalise out reported trials whose response ended at or before volume k (Schur complement)."""
        for trial in [t for t in self._active if t.reported and t.last_volume <= k]:
            j = 2 + self._active.index(trial)
            keep = np.arange(self._info_pp.shape[0]) != j
            coupling_r = self._info_pp[keep, j] / self._info_pp[j, j]
            self._info_pp = self._info_pp[np.ix_(keep, keep)] - np.outer(coupling_r, self._info_pp[j, keep])
            self._moments_pv = self._moments_pv[keep] - np.outer(coupling_r, self._moments_pv[j])
            self._active.remove(trial)
            self.counters.voxel_row_ops += 2 * int(keep.sum())

    def _declare_missing(self, k: int) -> None:
        self._digests[k] = None
        self.counters.volumes_missing += 1
        for trial in self._unreported:  # by onset: those whose window holds k come first
            if trial.first_volume > k:
                break
            trial.missing.append(k)
        log.warning("volume %d never arrived (newest is %d): dropped from the fit", k, self._newest)

    def _report(self, trial: _Trial, horizon: int, ready_volume: int) -> TrialBeta:
        trial.reported = True
        self.counters.trials_reported += 1
        diagnostics = dict(
            trial_id=trial.trial_id, onset_s=trial.onset_s, horizon_volume=horizon, ready_volume=ready_volume,
            response_volumes=max(0, horizon - trial.first_volume + 1), missing_volumes=tuple(trial.missing),
        )
        if trial not in self._active:
            return TrialBeta(beta_pct_v=None, beta_v=None, baseline_v=None, **diagnostics,
                             problem=f"no volume up to {horizon} holding its response arrived")
        # Jacobi scaling: a trial whose response has barely begun (a first value of 1e-13 when its
        # onset is just before a volume) has a tiny diagonal entry, which is no collinearity.
        scale_p = 1.0 / np.sqrt(np.diag(self._info_pp))
        scaled_pp = self._info_pp * np.outer(scale_p, scale_p)
        condition = np.linalg.cond(scaled_pp)
        if not condition < _MAX_CONDITION:
            return TrialBeta(beta_pct_v=None, beta_v=None, baseline_v=None, **diagnostics,
                             problem=f"collinear design (condition number {condition:.3g})")
        selector_p2 = np.zeros((self._info_pp.shape[0], 2))
        selector_p2[0, 0] = 1.0  # the level now
        selector_p2[[1, 2 + self._active.index(trial)], 1] = 1.0  # the mean response + the trial's deviation
        rows_2p = (scale_p[:, None] * np.linalg.solve(scaled_pp, scale_p[:, None] * selector_p2)).T  # of A^-1
        baseline_v, beta_v = rows_2p @ self._moments_pv
        self.counters.voxel_row_ops += 2 * self._info_pp.shape[0]
        beta_pct_v = percent_signal_change(beta_v, baseline_v)
        return TrialBeta(beta_pct_v=beta_pct_v, beta_v=beta_v, baseline_v=baseline_v, **diagnostics)
