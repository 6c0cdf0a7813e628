"""Each subject's volume grid, brain mask and visual ROI ("nsdgeneral"), at NSD's proportions.

Grids keep the shape of the subject's real 1.8 mm NSD grid, scaled down; the brain is an
irregular ellipsoid and the ROI a contiguous posterior region of it, so subjects differ in
grid, voxel count and the spatial layout their encoding maps land on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

# REFERENCE.md section 1-2: nsdgeneral voxel counts and 1.8 mm grids of NSD subjects 1-8.
NSD_ROI_VOXELS = (15724, 14278, 15226, 13153, 13039, 17907, 12682, 14386)
NSD_GRIDS = ((81, 104, 83), (82, 106, 84), (81, 106, 82), (85, 99, 80),
             (79, 97, 78), (85, 113, 83), (78, 95, 81), (80, 103, 78))


@dataclass(frozen=True)
class Anatomy:
    affine: np.ndarray  # (4, 4) voxel -> mm, origin at the grid centre
    brain_xyz: np.ndarray  # bool (X, Y, Z)
    roi_xyz: np.ndarray  # bool (X, Y, Z), inside the brain

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.brain_xyz.shape


def make_anatomy(subject: int, brain_cfg, rng: np.random.Generator) -> Anatomy:
    n_roi = int(round(NSD_ROI_VOXELS[(subject - 1) % 8] * brain_cfg.roi_scale))
    n_brain = int(round(n_roi * brain_cfg.brain_per_roi))
    nsd_grid = np.array(NSD_GRIDS[(subject - 1) % 8], dtype=float)
    scale = (n_brain * brain_cfg.grid_per_brain / nsd_grid.prod()) ** (1 / 3)
    shape = tuple(int(v) for v in np.maximum(np.round(nsd_grid * scale), 6))

    # Normalised coordinates in [-1, 1] per axis; y runs posterior (-1) to anterior (+1), as RAS.
    coords = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    wobble = gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 6, mode="wrap")
    wobble /= np.abs(wobble).max()
    radius = np.sqrt((coords ** 2).sum(0)) * (1 + 0.15 * wobble)
    brain = _smallest(radius, n_brain)

    # The ROI: posterior and cortical (far from the centre), with a subject-specific smooth wobble.
    patch = gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 8, mode="wrap")
    patch /= np.abs(patch).max()
    score = -coords[1] + 0.6 * radius + 0.5 * patch
    roi = _smallest(np.where(brain, -score, np.inf), n_roi)

    voxel_mm = brain_cfg.voxel_mm
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -voxel_mm * (np.array(shape) - 1) / 2
    return Anatomy(affine=affine, brain_xyz=brain, roi_xyz=roi)


def _smallest(values: np.ndarray, n: int) -> np.ndarray:
    """bool mask of the n smallest entries (exactly n)."""
    flat = np.argsort(values, axis=None, kind="stable")[:n]
    mask = np.zeros(values.size, dtype=bool)
    mask[flat] = True
    return mask.reshape(values.shape)
