"""The world's experiment design, built as NSD's: shared test images, unique training images,
3 presentations each spread over sessions, runs of 4-s slots with blank trials.

Image ids: the shared images are 0..n_shared-1 (every subject's list starts with them, as in
NSD's `subjectim`), then each subject's unique images follow in a block of their own.
"""
from __future__ import annotations

import numpy as np

from mindeye.nsd import ExpDesign


def stim_pattern(n_sessions: int, runs: int, slots: int, trials_per_run: list[int], lead: int, tail: int,
                 rng: np.random.Generator) -> np.ndarray:
    """bool (n_sessions, runs, slots): which slots show an image. Blank slots lead and trail each
    run (so the first image comes lead x 4 s in) and the rest are scattered in between."""
    pattern = np.zeros((n_sessions, runs, slots), dtype=bool)
    for run in range(runs):
        n_stim = trials_per_run[run % len(trials_per_run)]
        middle = slots - lead - tail
        if n_stim > middle:
            raise ValueError(f"{n_stim} stimulus trials do not fit in {middle} slots between the blank ones")
        for session in range(n_sessions):
            chosen = np.sort(rng.choice(middle, size=n_stim, replace=False))
            pattern[session, run, lead + chosen] = True
    return pattern


def make_design(cfg, rng: np.random.Generator) -> ExpDesign:
    n_shared, n_unique, repeats = cfg.images.shared, cfg.images.unique_per_subject, cfg.images.repeats
    s = cfg.session
    trials_per_run = list(s.stimulus_trials_per_run)
    trials_per_session = sum(trials_per_run[r % len(trials_per_run)] for r in range(s.runs))
    n_images = n_shared + n_unique  # per subject
    n_trials = n_images * repeats
    if n_trials % trials_per_session:
        raise ValueError(f"world '{cfg.name}': {n_images} images x {repeats} repeats = {n_trials} trials is not a "
                         f"whole number of {trials_per_session}-trial sessions")
    n_sessions = n_trials // trials_per_session
    if max(cfg.sessions_per_subject) > n_sessions:
        raise ValueError(f"sessions_per_subject asks for {max(cfg.sessions_per_subject)} sessions; "
                         f"the design has {n_sessions}")
    subject_images = np.stack([np.concatenate([np.arange(n_shared), n_shared + k * n_unique + np.arange(n_unique)])
                               for k in range(cfg.n_subjects)])
    # Like NSD's masterordering: one order for all subjects, every list index `repeats` times.
    master_order = rng.permutation(np.repeat(np.arange(n_images), repeats))
    pattern = stim_pattern(n_sessions, s.runs, s.slots_per_run, trials_per_run, s.lead_blank_slots,
                           s.tail_blank_slots, rng)
    return ExpDesign(subject_images=subject_images, master_order=master_order,
                     shared_images=np.arange(n_shared), stim_pattern=pattern)


def volumes_per_run(cfg) -> int:
    """NSD: 75 slots x 3 volumes + 1 = 226 volumes at TR 4/3 s."""
    return int(round(cfg.session.slots_per_run * 4.0 / cfg.tr)) + 1
