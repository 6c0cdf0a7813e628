"""Simulated head motion: a deterministic trajectory per session and a volume moved by it.

The parameters follow mindeye.motion (6 numbers: translations in mm, rotations in rad, RAS+ world,
R = Rz Ry Rx about the volume centre; a head point at p in the reference is at M(p) in the moved
volume). A session's motion has three parts, all drawn from one seed:

- a session offset: today's head position relative to the calibration session's (one rigid
  transform for the whole session, `session_offset_mm` / `_deg` in size);
- slow drift: a straight-line creep in a random direction (`drift_mm_per_min`, `drift_deg_per_min`),
  with `wobble` plus a small random wobble per volume;
- sudden jerks (`jerks_per_min` on average): a random displacement of up to `jerk_max_mm` and
  `jerk_max_deg` that either stays (the head settled elsewhere) or lasts 1-3 volumes and returns
  (a cough, a swallow).

`within_t6` is the head relative to today's first volume (what per-volume motion correction
estimates); `calibration_t6` composes it with the session offset (the head relative to the
calibration position; what the scanner sees). `move_volume` samples a volume as the scanner would
see the head moved, with scipy.ndimage, on purpose independent of the bridge's SimpleITK
registration, so the estimator is checked against a simulator that shares no code with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mindeye.motion import params_of, rigid_matrix, volume_centre_mm

WOBBLE_MM = 0.02  # per-volume random wobble around the drift (sd), in mm and (for rotations) in degrees
SPIKE_VOLUMES = (1, 3)  # a transient jerk lasts this many volumes (inclusive range)


@dataclass(frozen=True)
class MotionSpec:
    """Sizes of the simulated motion (configs/replay.yaml `motion`); all zero: a perfectly still head."""

    drift_mm_per_min: float = 0.0
    drift_deg_per_min: float = 0.0
    jerks_per_min: float = 0.0
    jerk_max_mm: float = 3.0
    jerk_max_deg: float = 3.0
    session_offset_mm: float = 0.0
    session_offset_deg: float = 0.0
    wobble: bool = False  # add the per-volume wobble (WOBBLE_MM) to the drift

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name != "wobble" and not (np.isfinite(value) and value >= 0):
                raise ValueError(f"motion.{name} must be a number >= 0, got {value!r}")

    @property
    def still(self) -> bool:
        """No motion at all: volumes can be written as they are."""
        return not self.wobble and not any((self.drift_mm_per_min, self.drift_deg_per_min, self.jerks_per_min,
                                            self.session_offset_mm, self.session_offset_deg))


@dataclass(frozen=True)
class Trajectory:
    """Motion of consecutive volumes: `within_t6` relative to today's first volume, `session_offset_6` of
    today relative to calibration, and their composition `calibration_t6` (the head relative to the
    calibration position: W(t) applied after the session offset S, M = W S)."""

    within_t6: np.ndarray
    session_offset_6: np.ndarray
    calibration_t6: np.ndarray


class HeadMotion:
    """One session's head, volume after volume: each call to `next_volumes` continues where the last
    one stopped (runs follow each other), and the whole sequence depends only on the seed."""

    def __init__(self, spec: MotionSpec, centre_mm, seed: int):
        self.spec, self.centre_mm = spec, np.asarray(centre_mm, dtype=float)
        self._rng = np.random.default_rng(seed)
        self.session_offset_6 = _displacement(self._rng, spec.session_offset_mm, spec.session_offset_deg)
        self._drift_per_min_6 = _displacement(self._rng, spec.drift_mm_per_min, spec.drift_deg_per_min)
        self._minutes = 0.0  # since the session's first volume
        self._settled_6 = np.zeros(6)  # jerks that stayed
        self._spikes: list[tuple[int, np.ndarray]] = []  # (volumes left, displacement) of transient jerks
        self._n_seen = 0

    def next_volumes(self, n_volumes: int, tr_s: float) -> Trajectory:
        within_t6 = np.stack([self._next(tr_s) for _ in range(n_volumes)]) if n_volumes else np.zeros((0, 6))
        offset_44 = rigid_matrix(self.session_offset_6, self.centre_mm)
        calibration_t6 = np.stack([params_of(rigid_matrix(params_6, self.centre_mm) @ offset_44, self.centre_mm)
                                   for params_6 in within_t6]) if n_volumes else np.zeros((0, 6))
        return Trajectory(within_t6, self.session_offset_6.copy(), calibration_t6)

    def _next(self, tr_s: float) -> np.ndarray:
        first = self._n_seen == 0  # today's reference: the head exactly at the session position
        if not first:
            self._minutes += tr_s / 60.0
            if self._rng.random() < self.spec.jerks_per_min * tr_s / 60.0:
                jerk_6 = _displacement(self._rng, self.spec.jerk_max_mm, self.spec.jerk_max_deg,
                                       scale=self._rng.uniform(0.3, 1.0))
                if self._rng.random() < 0.5:
                    self._settled_6 = self._settled_6 + jerk_6
                else:
                    self._spikes.append((int(self._rng.integers(SPIKE_VOLUMES[0], SPIKE_VOLUMES[1] + 1)), jerk_6))
        self._n_seen += 1
        params_6 = self._minutes * self._drift_per_min_6 + self._settled_6
        for _, jerk_6 in self._spikes:
            params_6 = params_6 + jerk_6
        self._spikes = [(left - 1, jerk_6) for left, jerk_6 in self._spikes if left > 1]
        if self.spec.wobble and not first:
            params_6 = params_6 + self._rng.normal(0.0, WOBBLE_MM, 6) * np.r_[1, 1, 1, [np.deg2rad(1.0)] * 3]
        return params_6


def session_trajectory(spec: MotionSpec, n_volumes: int, tr_s: float, centre_mm, seed: int) -> Trajectory:
    """The motion of a session's first `n_volumes` volumes (all runs, in acquisition order), from `seed`."""
    return HeadMotion(spec, centre_mm, seed).next_volumes(n_volumes, tr_s)


def move_volume(volume_xyz: np.ndarray, affine: np.ndarray, params_6, order: int = 3) -> np.ndarray:
    """`volume_xyz` with the head moved by `params_6` (about the volume centre): moved(x) = volume(M^-1 x),
    sampled by a cubic spline (order 3), zero outside the field of view; float32 (X, Y, Z)."""
    affine = np.asarray(affine, dtype=float)
    motion_44 = rigid_matrix(params_6, volume_centre_mm(volume_xyz.shape, affine))
    # output voxel v -> world A v -> where that point was in the reference M^-1 A v -> reference voxel
    voxel_map_44 = np.linalg.inv(affine) @ np.linalg.inv(motion_44) @ affine
    return ndimage.affine_transform(np.asarray(volume_xyz, dtype=np.float32), voxel_map_44[:3, :3],
                                    offset=voxel_map_44[:3, 3], order=order, mode="constant", cval=0.0)


def _displacement(rng: np.random.Generator, size_mm: float, size_deg: float, scale: float = 1.0) -> np.ndarray:
    """A rigid displacement of `size_mm` translation and `size_deg` rotation (times `scale`), each in a
    random direction (the rotation as a small rotation vector given as the 3 Euler angles)."""
    translation_3 = _unit(rng) * size_mm * scale
    rotation_3 = _unit(rng) * np.deg2rad(size_deg) * scale
    return np.concatenate([translation_3, rotation_3])


def _unit(rng: np.random.Generator) -> np.ndarray:
    direction_3 = rng.normal(size=3)
    return direction_3 / np.linalg.norm(direction_3)
