"""Readers and writers for each NSD file format, one pair per format.

The synthetic world writes through these writers and every stage reads through these
readers, so a format is defined in exactly one place. Each reader checks what it reads
(dimensions, dtype, TR, keys) and raises `FormatError` naming the file and the mismatch.

Voxel order: a masked volume's voxels are `volume[mask]` for the (X, Y, Z) array as nibabel
loads it, i.e. C order over (X, Y, Z). `RoiMask` is the only place that order is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import logging
import warnings

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from mindeye.errors import FormatError, MissingFileError

NSD_BETA_SCALE = 300  # NSD stores single-trial betas as int16 = percent signal change x 300
log = logging.getLogger(__name__)


def _require(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, what)
    return path


# -- ROI mask ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoiMask:
    """A boolean (X, Y, Z) mask and the voxel order every masked array follows."""

    mask_xyz: np.ndarray  # bool (X, Y, Z)
    affine: np.ndarray  # (4, 4) voxel -> scanner mm

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask_xyz.shape)

    @property
    def n_voxels(self) -> int:
        return int(self.mask_xyz.sum())

    @property
    def flat_index(self) -> np.ndarray:
        """(V,) indices into the C-order flattened (X, Y, Z) volume."""
        return np.flatnonzero(self.mask_xyz.ravel())

    def apply(self, volume_xyz_t: np.ndarray) -> np.ndarray:
        """(X, Y, Z[, T]) -> (V[, T]) in the one voxel order."""
        if volume_xyz_t.shape[:3] != self.shape:
            raise ValueError(f"volume of shape {volume_xyz_t.shape[:3]} does not match ROI mask {self.shape}")
        return volume_xyz_t[self.mask_xyz]

    def unmask(self, values_v: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(V[, T]) -> (X, Y, Z[, T]), `fill` outside the ROI."""
        if values_v.shape[0] != self.n_voxels:
            raise ValueError(f"{values_v.shape[0]} values for an ROI of {self.n_voxels} voxels")
        out = np.full(self.shape + values_v.shape[1:], fill, dtype=values_v.dtype)
        out[self.mask_xyz] = values_v
        return out


def read_roi(path: Path, what: str = "nsdgeneral ROI mask") -> RoiMask:
    """NSD ROI volumes hold -1 (outside the brain), 0 (not in the ROI) and positive labels."""
    img = nib.load(_require(path, what))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise FormatError(path, what, "a 3D volume", f"{data.ndim}D shape {data.shape}")
    mask = data > 0
    if not mask.any():
        raise FormatError(path, what, "at least one voxel > 0", "an empty mask")
    return RoiMask(mask_xyz=mask, affine=img.affine)


def write_roi(path: Path, mask_xyz: np.ndarray, affine: np.ndarray, brain_xyz: np.ndarray | None = None) -> None:
    """int16 volume: 1 in the ROI, 0 elsewhere in the brain, -1 outside it (as NSD)."""
    labels = np.where(mask_xyz, 1, 0).astype(np.int16)
    if brain_xyz is not None:
        labels[~brain_xyz] = -1
    _save_nifti(path, labels, affine)


# -- 4D time series --------------------------------------------------------------------------

@dataclass(frozen=True)
class TimeSeries:
    data_xyzt: np.ndarray  # (X, Y, Z, T), dtype as stored (int16 in NSD)
    tr: float  # seconds, from the header
    affine: np.ndarray

    @property
    def n_volumes(self) -> int:
        return self.data_xyzt.shape[3]


def read_tr(img: nib.Nifti1Image) -> float:
    """TR in seconds from a NIfTI header (pixdim[4], honouring its time unit)."""
    zooms = img.header.get_zooms()
    if len(zooms) < 4:
        return float("nan")
    unit = img.header.get_xyzt_units()[1]
    scale = {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    return float(zooms[3]) * scale


def read_timeseries(path: Path, expected_tr: float | None = None, tr_tolerance: float = 0.01,
                    expected_shape: tuple[int, int, int] | None = None) -> TimeSeries:
    what = "pre-processed fMRI time series (4D NIfTI)"
    img = nib.load(_require(path, what))
    if len(img.shape) != 4:
        raise FormatError(path, what, "4D (X, Y, Z, T)", f"{len(img.shape)}D shape {img.shape}")
    if expected_shape is not None and tuple(img.shape[:3]) != tuple(expected_shape):
        raise FormatError(path, "volume grid", f"{tuple(expected_shape)} (the ROI mask's grid)", f"{img.shape[:3]}")
    tr = read_tr(img)
    if expected_tr is not None and not abs(tr - expected_tr) <= tr_tolerance:
        raise FormatError(path, "TR in the header", f"{expected_tr:.4f} s (+/- {tr_tolerance})", f"{tr:.4f} s")
    return TimeSeries(data_xyzt=np.asanyarray(img.dataobj), tr=tr, affine=img.affine)


def write_timeseries(path: Path, data_xyzt: np.ndarray, affine: np.ndarray, tr: float) -> None:
    if data_xyzt.ndim != 4 or data_xyzt.dtype != np.int16:
        raise ValueError(f"time series must be int16 (X, Y, Z, T), got {data_xyzt.dtype} {data_xyzt.shape}")
    _save_nifti(path, data_xyzt, affine, tr=tr)


# -- per-run design file ---------------------------------------------------------------------

def read_design(path: Path, n_volumes: int | None = None) -> np.ndarray:
    """(T,) int: 0-based image id shown at each volume's onset, -1 where none.

    The file has one row per volume holding the 1-based 73k id of the image whose trial
    starts at that volume, 0 otherwise. NSD's data manual describes it one row shorter than the
    time series (225 rows for 226 volumes): with `n_volumes` given, such a file reads as
    `n_volumes` rows, the last volume without an event, and a note says so.
    """
    what = "per-run design file (one row per volume: 1-based image id or 0)"
    _require(path, what)
    try:
        ids = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as err:
        raise FormatError(path, what, "one integer per row", f"unparsable content ({err})") from err
    if ids.ndim != 1:
        raise FormatError(path, what, "a single column", f"{ids.shape[1]} columns")
    if (ids < 0).any():
        raise FormatError(path, what, "ids >= 0", f"negative id {ids.min()}")
    if n_volumes is not None and len(ids) == n_volumes - 1:
        log.info("%s: %d rows for %d volumes (NSD's manual: no row for the last volume); read it as no event",
                 path, len(ids), n_volumes)
        ids = np.append(ids, 0)
    if n_volumes is not None and len(ids) != n_volumes:
        raise FormatError(path, "number of rows", f"{n_volumes} or {n_volumes - 1} (volumes in the run's time "
                          "series, or one fewer as NSD's manual describes)", f"{len(ids)}")
    return ids - 1


def write_design(path: Path, image_id_t: np.ndarray) -> None:
    """`image_id_t`: (T,) 0-based image id at each onset volume, -1 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, np.asarray(image_id_t, dtype=np.int64) + 1, fmt="%d")


# -- single-trial betas (NSD NIfTI, int16 x300) -----------------------------------------------

def read_betas(path: Path, roi: RoiMask) -> np.ndarray:
    """(n_trials, V) float32 percent signal change, in the ROI's voxel order."""
    what = "single-trial betas (4D NIfTI, int16 = % signal change x 300)"
    img = nib.load(_require(path, what))
    if len(img.shape) != 4:
        raise FormatError(path, what, "4D (X, Y, Z, trials)", f"{len(img.shape)}D shape {img.shape}")
    if tuple(img.shape[:3]) != roi.shape:
        raise FormatError(path, "volume grid", f"{roi.shape} (the ROI mask's grid)", f"{img.shape[:3]}")
    if img.get_data_dtype() != np.int16:
        raise FormatError(path, "stored dtype", "int16", str(img.get_data_dtype()))
    return np.ascontiguousarray(from_nsd_int16(roi.apply(np.asanyarray(img.dataobj))).T)


def write_betas(path: Path, betas_nv_pct: np.ndarray, roi: RoiMask) -> None:
    _save_nifti(path, roi.unmask(to_nsd_int16(betas_nv_pct).T), roi.affine)


def to_nsd_int16(betas_pct: np.ndarray) -> np.ndarray:
    """Percent signal change -> NSD's int16 storage, round(pct * 300).

    The resolution is 1/300 % (a round trip errs by at most 1/600 %); the range is +-109.2 %,
    and values beyond it are clipped with a RuntimeWarning that counts them.
    """
    pct = np.asarray(betas_pct, dtype=float)
    if not np.isfinite(pct).all():
        raise ValueError(f"to_nsd_int16: {int((~np.isfinite(pct)).sum())} NaN or inf values cannot be stored as int16")
    scaled = np.rint(pct * NSD_BETA_SCALE)
    limits = np.iinfo(np.int16)
    n_clipped = int(((scaled < limits.min) | (scaled > limits.max)).sum())
    if n_clipped:
        warnings.warn(
            f"to_nsd_int16: {n_clipped} of {scaled.size} values lie beyond +-{limits.max / NSD_BETA_SCALE:.1f} % "
            "and were clipped",
            RuntimeWarning,
            stacklevel=2,
        )
    return np.clip(scaled, limits.min, limits.max).astype(np.int16)


def from_nsd_int16(betas_int16: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """NSD's int16 storage -> percent signal change (value / 300) as `dtype`."""
    stored = np.asarray(betas_int16)
    if stored.dtype != np.int16:
        raise TypeError(f"from_nsd_int16 expects int16 (NSD's storage), got {stored.dtype}")
    return stored.astype(dtype) / dtype(NSD_BETA_SCALE)


# -- MindEye2's released betas (hdf5, float32, ROI voxels, global trial index) ------------------

def read_mindeye_betas(path: Path, trials: np.ndarray | None = None, n_voxels: int | None = None) -> np.ndarray:
    """(n, V) float32 rows of dataset `betas`, indexed by global trial (session-1)*750 + trial."""
    what = "MindEye2 betas (hdf5 dataset 'betas': trials x voxels)"
    with h5py.File(_require(path, what), "r") as f:
        if "betas" not in f:
            raise FormatError(path, "datasets", "a dataset 'betas'", f"{sorted(f.keys())}")
        dset = f["betas"]
        if dset.ndim != 2:
            raise FormatError(path, "'betas' shape", "2D (trials, voxels)", f"{dset.shape}")
        if n_voxels is not None and dset.shape[1] != n_voxels:
            raise FormatError(path, "'betas' voxels", f"{n_voxels} (the ROI mask)", f"{dset.shape[1]}")
        if trials is None:
            return dset[:].astype(np.float32)
        trials = np.asarray(trials)
        if trials.size and (trials.min() < 0 or trials.max() >= dset.shape[0]):
            raise FormatError(path, "trial indices", f"within [0, {dset.shape[0]})", f"[{trials.min()}, {trials.max()}]")
        return read_rows(dset, trials).astype(np.float32)


def write_mindeye_betas(path: Path, betas_nv: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=betas_nv.astype(np.float32), chunks=(1, betas_nv.shape[1]))


# -- experiment design (nsd_expdesign.mat) ----------------------------------------------------

EXPDESIGN_KEYS = ("subjectim", "masterordering", "sharedix", "stimpattern")


def read_expdesign_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of nsd_expdesign.mat as int64 (1-based, as MATLAB stores them)."""
    what = "NSD experiment design (nsd_expdesign.mat)"
    mat = scipy.io.loadmat(_require(path, what))
    missing = [k for k in EXPDESIGN_KEYS if k not in mat]
    if missing:
        raise FormatError(path, "variables", f"{list(EXPDESIGN_KEYS)}", f"missing {missing}")
    return {k: _integers(path, k, np.asarray(mat[k])) for k in EXPDESIGN_KEYS}


def _integers(path: Path, key: str, values: np.ndarray) -> np.ndarray:
    """`values` as int64. NSD's file stores MATLAB doubles: integral ones convert, others are refused
    (a silent cast would truncate a corrupt 12.5 to image 12)."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise FormatError(path, f"'{key}'", "numbers", f"dtype {values.dtype}")
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        raise FormatError(path, f"'{key}'", "integral values (ids, indices, 0/1)",
                          f"{int(bad.sum())} non-integral, e.g. {values[bad].flat[0]!r}")
    return values.astype(np.int64)


def write_expdesign_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {k: arrays[k] for k in EXPDESIGN_KEYS}, do_compression=True)


# -- stimuli (nsd_stimuli.hdf5 'imgBrick', uint8 N x H x W x 3) --------------------------------

class StimulusBrick:
    """Lazy access to `imgBrick`: `brick[ids]` -> uint8 (n, H, W, 3), any id order."""

    def __init__(self, path: Path):
        what = "NSD stimuli (hdf5 dataset 'imgBrick': images x H x W x 3, uint8)"
        self.path = _require(path, what)
        with h5py.File(self.path, "r") as f:
            if "imgBrick" not in f:
                raise FormatError(path, "datasets", "a dataset 'imgBrick'", f"{sorted(f.keys())}")
            d = f["imgBrick"]
            if d.ndim != 4 or d.shape[3] != 3 or d.dtype != np.uint8:
                raise FormatError(path, "'imgBrick'", "uint8 (N, H, W, 3)", f"{d.dtype} {d.shape}")
            self.shape = tuple(d.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.atleast_1d(np.asarray(ids))
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"{self.path}: image ids must be in [0, {len(self)}), got [{ids.min()}, {ids.max()}]")
        with h5py.File(self.path, "r") as f:
            return read_rows(f["imgBrick"], ids)


def write_stimuli(path: Path, images_nhwc: np.ndarray) -> None:
    if images_nhwc.dtype != np.uint8 or images_nhwc.ndim != 4 or images_nhwc.shape[3] != 3:
        raise ValueError(f"stimuli must be uint8 (N, H, W, 3), got {images_nhwc.dtype} {images_nhwc.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images_nhwc, chunks=(1,) + images_nhwc.shape[1:])


def read_rows(dset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """dset[rows] for any row order and repeats (h5py itself needs increasing, unique rows)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    return dset[unique][inverse.reshape(-1)]


# -- NIfTI writing ---------------------------------------------------------------------------------

def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, tr: float | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    if tr is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
    nib.save(img, path)
