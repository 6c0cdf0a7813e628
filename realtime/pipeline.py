"""From accepted volumes to trial betas: each subject's ROI, then one incremental GLM per run.

`SubjectRois` holds the service's content checks, the callbacks `Admission` calls before accepting:
`check_run` when a run starts (the subject must have an ROI and a model, the geometry must be the
ROI's; later volumes must repeat the run's geometry, which admission checks), and `read_volume` on
every volume (its ROI values, which must be finite). Detrending and scaling happen inside the
GLM: its forgetting constant is a local signal level that follows drift, and betas are percent of
that level (realtime/glm.py), the units the training betas have.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mindeye.nsd import NSDLayout, RoiMask, read_roi
from mindeye.protocol import Event, Reason, RunStart, Volume
from realtime.admission import Refusal, RunState
from realtime.glm import IncrementalGLM, OnlineGLMSettings, TrialBeta

log = logging.getLogger(__name__)

MAX_ABS_SAMPLE = 1e9  # scanner intensities are < 1e5; squared sums of larger ones break the GLM's float64 solve
AFFINE_TOLERANCE_MM = 1e-3  # NIfTI headers store float32: an equal affine can differ in the last bits


class SubjectRois:
    """The ROI of every subject the service decodes: which voxels of a volume the GLM sees."""

    def __init__(self, rois: dict[str, RoiMask]):
        if not rois:
            raise ValueError("no subject ROI: the service would refuse every run")
        self.rois = rois
        self._flat_index = {subject: roi.flat_index for subject, roi in rois.items()}

    @classmethod
    def from_layout(cls, root: str | Path, subjects: list[str]) -> SubjectRois:
        """nsdgeneral masks of `subjects` ("subj01", ...) from an NSD tree (real NSD or the world)."""
        layout = NSDLayout(Path(root))
        return cls({subject: read_roi(layout.roi(_subject_number(subject))) for subject in subjects})

    def n_voxels(self, subject: str) -> int:
        return self.rois[subject].n_voxels

    def check_run(self, message: RunStart | Volume) -> None:
        """Refuse a run the service cannot decode: an unknown subject, or a geometry off its ROI."""
        roi = self.rois.get(message.subject)
        if roi is None:
            raise Refusal(Reason.UNKNOWN_SUBJECT, f"subject {message.subject} has no ROI and model here; known: "
                                                  f"{', '.join(sorted(self.rois))}")
        if tuple(message.shape) != roi.shape:
            raise Refusal(Reason.GEOMETRY_MISMATCH, f"{message.TYPE} shape {list(message.shape)} is not the shape "
                                                     f"of {message.subject}'s ROI, {list(roi.shape)}")
        offset_mm = float(np.abs(np.asarray(message.affine) - roi.affine).max())
        if offset_mm > AFFINE_TOLERANCE_MM:
            raise Refusal(Reason.GEOMETRY_MISMATCH, f"{message.TYPE} affine differs from {message.subject}'s ROI "
                                                     f"affine by up to {offset_mm:.4g} mm: another space")

    def read_volume(self, volume: Volume) -> np.ndarray:
        """The volume's ROI values (V,) in the one voxel order; NaN, inf or a magnitude over MAX_ABS_SAMPLE
        among them is refused."""
        values_v = volume.array().reshape(-1)[self._flat_index[volume.subject]]
        if values_v.dtype.kind == "f":
            n_bad = int(values_v.size - np.count_nonzero(np.abs(values_v) <= MAX_ABS_SAMPLE))  # NaN fails <= too
            if n_bad:
                raise Refusal(Reason.BAD_DATA, f"volume {volume.index}: {n_bad} of {values_v.size} ROI voxels are "
                                               f"NaN, inf or beyond +-{MAX_ABS_SAMPLE:g}")
        return values_v


def _subject_number(subject: str) -> int:
    if not (subject.startswith("subj") and subject[4:].isdigit()):
        raise ValueError(f"subject '{subject}' is not an NSD subject name (subjNN); pass its ROI explicitly")
    return int(subject[4:])


@dataclass(frozen=True)
class TrialOutcome:
    """One stimulus trial of a run, once its beta is known or known to be unestimable."""

    run: RunState
    event: Event
    beta: TrialBeta | None  # None when the trial could not enter the GLM (announced too late)
    problem: str | None

    @property
    def betas_v(self) -> np.ndarray | None:
        return None if self.beta is None else self.beta.beta_pct_v


class RunPipeline:
    """One run's GLM: trials from the schedule, volumes in index order, betas as they become ready."""

    def __init__(self, run: RunState, n_voxels: int, settings: OnlineGLMSettings):
        self.run = run
        self.glm = IncrementalGLM(n_voxels, settings)
        self.events: dict[int, Event] = {}
        self.outcomes: list[TrialOutcome] = []

    def add_events(self, events: tuple[Event, ...]) -> list[TrialOutcome]:
        """Announce stimulus trials (blank ones are not regressors); those too late to estimate come back."""
        unestimable = []
        for event in events:
            if event.label == "blank":
                continue
            self.events[event.trial] = event
            try:
                self.glm.add_trial(event.trial, event.onset_s, event.duration_s)
            except ValueError as error:
                log.warning("run %s trial %d: %s", self.run.key, event.trial, error)
                unestimable.append(self._outcome(event, None, str(error)))
        return unestimable

    def use_volume(self, index: int, values_v: np.ndarray) -> list[TrialOutcome]:
        return [self._outcome(self.events[b.trial_id], b, b.problem) for b in self.glm.add_volume(index, values_v)]

    def finish(self) -> list[TrialOutcome]:
        return [self._outcome(self.events[b.trial_id], b, b.problem) for b in self.glm.finish()]

    def _outcome(self, event: Event, beta: TrialBeta | None, problem: str | None) -> TrialOutcome:
        outcome = TrialOutcome(self.run, event, beta, problem)
        self.outcomes.append(outcome)
        return outcome

    def save(self, path: Path) -> Path:
        """The run's betas as .npz: trial (n,), image_id (n,; -1 unknown), betas_nv float32 (n, V; NaN
        where unestimable), missing_volumes (n,): volumes of the trial's window that never came."""
        outcomes = sorted(self.outcomes, key=lambda o: o.event.trial)
        betas_nv = np.full((len(outcomes), self.glm.n_voxels), np.nan, dtype=np.float32)
        for row, outcome in enumerate(outcomes):
            if outcome.betas_v is not None:
                betas_nv[row] = outcome.betas_v
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, trial=np.array([o.event.trial for o in outcomes], dtype=np.int64),
                 image_id=np.array([-1 if o.event.image_id is None else o.event.image_id for o in outcomes],
                                   dtype=np.int64),
                 betas_nv=betas_nv,
                 missing_volumes=np.array([0 if o.beta is None else len(o.beta.missing_volumes) for o in outcomes]))
        tmp.replace(path)
        return path
