"""The NSD experiment design: which image each subject saw on each trial, and when.

`ExpDesign` wraps nsd_expdesign.mat with 0-based ids (the file is 1-based, as MATLAB):
- `subject_images` (n_subjects, n_images_per_subject): the images each subject's list holds;
  in NSD the first 1000 columns are the shared images every subject sees (the test set).
- `master_order` (n_trials,): for every trial, an index into the subject's list (same for
  every subject; 30000 = 40 sessions x 750 trials in NSD).
- `shared_images` (n_shared,): the shared images.
- `stim_pattern` (n_sessions, n_runs, n_slots): which 4-s trial slots of a run hold an image
  (the others are blank trials); its sum over a session is the trials a session has (750).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from mindeye.errors import FormatError, MissingFileError
from mindeye.nsd.files import read_design, read_expdesign_arrays, write_expdesign_arrays
from mindeye.nsd.layout import NSDLayout, subject_name

TRIAL_SECONDS = 4.0  # 3 s image + 1 s gap
IMAGE_SECONDS = 3.0


@dataclass(frozen=True)
class TrialTable:
    """One row per stimulus trial of one subject; every column is an (n,) array."""

    subject: int
    session: np.ndarray  # 1-based
    run: np.ndarray  # 1-based
    trial_in_run: np.ndarray  # 0-based, blank slots skipped
    slot: np.ndarray  # 0-based 4-s slot of the run; onset = slot * TRIAL_SECONDS
    global_trial: np.ndarray  # 0-based (session-1) * trials_per_session + trial in session
    image_id: np.ndarray  # 0-based image id
    is_test: np.ndarray  # bool: a shared image

    def __len__(self) -> int:
        return len(self.global_trial)

    @property
    def onset_s(self) -> np.ndarray:
        return self.slot * TRIAL_SECONDS

    def select(self, keep: np.ndarray) -> "TrialTable":
        return TrialTable(self.subject, *(getattr(self, f.name)[keep] for f in fields(self)[1:]))

    def for_run(self, session: int, run: int) -> "TrialTable":
        return self.select((self.session == session) & (self.run == run))


@dataclass(frozen=True)
class ExpDesign:
    subject_images: np.ndarray  # (n_subjects, n_images_per_subject) 0-based
    master_order: np.ndarray  # (n_trials,) 0-based into a subject's list
    shared_images: np.ndarray  # (n_shared,) 0-based
    stim_pattern: np.ndarray  # bool (n_sessions, n_runs, n_slots)
    source: Path | None = None

    def __post_init__(self) -> None:
        where = self.source or Path("<ExpDesign>")
        per_session = self.stim_pattern.sum(axis=(1, 2))
        if not (per_session == per_session[0]).all():
            raise FormatError(where, "stimpattern", "the same number of trials in every session",
                              f"{sorted(set(per_session.tolist()))}")
        if len(self.master_order) != self.stim_pattern.shape[0] * per_session[0]:
            raise FormatError(where, "masterordering length", f"sessions x trials per session = "
                              f"{self.stim_pattern.shape[0] * per_session[0]}", f"{len(self.master_order)}")
        if self.master_order.min() < 0 or self.master_order.max() >= self.subject_images.shape[1]:
            raise FormatError(where, "masterordering", f"indices in [1, {self.subject_images.shape[1]}]",
                              f"[{self.master_order.min() + 1}, {self.master_order.max() + 1}]")
        if not np.isin(self.shared_images, self.subject_images).all():
            raise FormatError(where, "sharedix", "images that subjects see", "ids absent from subjectim")

    @property
    def n_subjects(self) -> int:
        return self.subject_images.shape[0]

    @property
    def trials_per_session(self) -> int:
        return int(self.stim_pattern[0].sum())

    @property
    def runs_per_session(self) -> int:
        return self.stim_pattern.shape[1]

    @property
    def slots_per_run(self) -> int:
        return self.stim_pattern.shape[2]

    @classmethod
    def read(cls, path: Path) -> "ExpDesign":
        raw = read_expdesign_arrays(path)  # int64, whether stored as integers or MATLAB doubles
        return cls(subject_images=raw["subjectim"] - 1, master_order=raw["masterordering"].ravel() - 1,
                   shared_images=raw["sharedix"].ravel() - 1, stim_pattern=raw["stimpattern"].astype(bool),
                   source=Path(path))

    def write(self, path: Path, doubles: bool = False) -> None:
        """`doubles`: store every array as float64, as NSD's MATLAB-written file does."""
        ints, flags = (np.float64, np.float64) if doubles else (np.int32, np.uint8)
        write_expdesign_arrays(path, {
            "subjectim": (self.subject_images + 1).astype(ints),
            "masterordering": (self.master_order + 1).astype(ints)[None, :],
            "sharedix": (self.shared_images + 1).astype(ints)[None, :],
            "stimpattern": self.stim_pattern.astype(flags)})

    def trials(self, subject: int, sessions: list[int] | range) -> TrialTable:
        """Every stimulus trial of `subject` (1-based) in `sessions` (1-based), in acquisition order."""
        if not 1 <= subject <= self.n_subjects:
            raise ValueError(f"subject {subject} not in the design's 1..{self.n_subjects}")
        images = self.subject_images[subject - 1]
        shared = np.isin(images, self.shared_images)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                             ("session", "run", "trial_in_run", "slot", "global_trial")}
        for session in sessions:
            if not 1 <= session <= self.stim_pattern.shape[0]:
                raise ValueError(f"session {session} not in the design's 1..{self.stim_pattern.shape[0]}")
            pattern = self.stim_pattern[session - 1]  # (runs, slots)
            run_idx, slot_idx = np.nonzero(pattern)  # row-major: runs in order, slots in order
            counts = pattern.sum(axis=1)
            cols["session"].append(np.full(len(run_idx), session))
            cols["run"].append(run_idx + 1)
            cols["trial_in_run"].append(np.concatenate([np.arange(c) for c in counts]))
            cols["slot"].append(slot_idx)
            cols["global_trial"].append((session - 1) * self.trials_per_session + np.arange(len(run_idx)))
        arrays = {k: np.concatenate(v).astype(np.int64) for k, v in cols.items()}
        index_in_list = self.master_order[arrays["global_trial"]]
        return TrialTable(subject=subject, image_id=images[index_in_list], is_test=shared[index_in_list], **arrays)


def task_runs(layout: NSDLayout, subject: int, session: int) -> list[int]:
    """The file run numbers of a session's task runs, in order: the runs whose design file has an event.

    Sessions with resting-state runs have 14 runs, 1 and 14 at rest (all-zero design files), so
    the design's run k (`TrialTable.run`, `stim_pattern`) is the k-th task run, not file k."""
    runs, run = [], 1
    while (path := layout.design(subject, session, run)).is_file():
        if (read_design(path) >= 0).any():
            runs.append(run)
        run += 1
    if not runs:
        raise MissingFileError(layout.design(subject, session, 1), f"task runs of {subject_name(subject)} session "
                               f"{session} (design files with at least one trial)", hint=f"NSD root is {layout.root}")
    return runs


def onset_volume(slot: np.ndarray, tr: float) -> np.ndarray:
    """Volume index at which a trial slot's image appears (NSD: slot * 4 s / 1.333 s = slot * 3)."""
    return np.round(np.asarray(slot) * TRIAL_SECONDS / tr).astype(np.int64)


def design_vector(trials: TrialTable, n_volumes: int, tr: float) -> np.ndarray:
    """(T,) 0-based image id at each onset volume of one run's trials, -1 elsewhere."""
    out = np.full(n_volumes, -1, dtype=np.int64)
    volumes = onset_volume(trials.slot, tr)
    if len(volumes) and volumes.max() >= n_volumes:
        raise ValueError(f"trial onset at volume {volumes.max()} beyond a run of {n_volumes} volumes")
    out[volumes] = trials.image_id
    return out
