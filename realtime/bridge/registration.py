"""Rigid head-motion correction with SimpleITK, and one resampling of each volume into the model's grid.

Three volumes and two rigid transforms, all in the mindeye.motion convention (6 parameters, RAS+ mm,
R = Rz Ry Rx about a volume centre; "a head point at p in the reference is at M(p) in the moved one"):

- the calibration reference: the mean EPI of the calibration session's first run, in the model grid
  (the grid of the subject's nsdgeneral ROI, which the model was trained on); made once per subject and
  stored beside the model (`CalibrationReference`: motion_reference_subjAA.nii.gz + .json);
- today's reference: one volume of today's session (the bridge takes the first), in the scanner's grid.
  `SessionAlignment` registers it to the calibration reference once (S: where the calibration head is
  today) and stores both beside the session, so a restarted bridge measures against the same volume;
- each volume t: `MotionCorrector` registers it to today's reference (M_t, the volume's reported
  motion), starting from the previous volume's estimate, then resamples it once, straight into the model
  grid: model voxel v -> world p = A_model v (calibration head) -> S(p) (today's reference) -> M_t(S(p))
  (volume t) -> voxel A_t^-1 M_t S A_model v. One interpolation per voxel, never two.

SimpleITK's registration maps points of the fixed image to points of the moving one, which is M with
fixed = reference. Its images get the nibabel RAS+ geometry (origin, spacing and direction of the voxel ->
RAS+ affine): SimpleITK computes in whatever frame its images' geometry states, and its LPS+ convention
only matters when it reads files itself, which the bridge never asks it to do. Euler3DTransform with
ComputeZYX on is R = Rz Ry Rx, the convention's order; parameters are read back through the 4x4 matrix
(`mindeye.motion.params_of`), and the tests check both against motion made with scipy.

Metric and optimiser: same modality, same contrast, so mean squares (cheapest) per volume; correlation
once per session, whose two sessions may differ in intensity scale. Levels from coarse to fine (a volume
shrunk by up to 4 while its grid stays 24 voxels wide: half resolution at NSD's 81 x 104 x 83 per
volume, down to full once per session), regular step gradient descent scaled by physical shift, with at
most a set number of steps a level, so a volume's cost is bounded. Why SimpleITK and not
ANTsPy: antspyx's wheels force numpy and scipy below this project's pins; SimpleITK's figures are in
benchmarks/results/bridge_motion.txt.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from mindeye.errors import FormatError, MissingFileError
from mindeye.motion import MOTION_PARAMS, params_of, rigid_matrix, volume_centre_mm
from mindeye.nsd import NSDLayout, read_roi, read_timeseries, subject_name

SESSION_ALIGNMENT = "session_alignment.json"
SESSION_REFERENCE = "session_reference.nii.gz"


@dataclass(frozen=True)
class RegistrationSettings:
    """How hard `register_rigid` works; the defaults were chosen with benchmarks/bridge_motion.py."""

    metric: str = "mean_squares"  # or "correlation" (insensitive to a global intensity scale)
    # Coarse to fine: (shrink factor, voxels the metric samples, most steps, first step in mm: a point's
    # largest move). The first level is cheap and walks far (a 3 mm jerk); the next one refines.
    levels: tuple[tuple[int, int, int, float], ...] = ((4, 3000, 100, 1.0), (2, 10000, 30, 0.25))
    min_step_mm: float = 0.001  # a level stops when its step falls below this (larger stops turns half-done)
    relaxation: float = 0.8  # the step shrinks by this on each turn; 0.5 stalls before the rotations converge
    min_level_voxels: int = 24  # a level shrinks less where its grid would be narrower than this


# Once per session: a larger offset from an unknown start, two sessions' intensity scales, time to spare
SESSION_SETTINGS = RegistrationSettings(
    metric="correlation", levels=((4, 5000, 200, 4.0), (2, 20000, 100, 1.0), (1, 50000, 100, 0.25)))


def sitk_image(volume_xyz: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A float32 SimpleITK image of `volume_xyz` whose geometry is the voxel -> RAS+ `affine`."""
    affine = np.asarray(affine, dtype=float)
    spacing_3 = np.linalg.norm(affine[:3, :3], axis=0)
    direction_33 = affine[:3, :3] / spacing_3
    if not np.allclose(direction_33.T @ direction_33, np.eye(3), atol=1e-4):
        raise ValueError(f"the volume's affine has shear (its axes are not orthogonal): {affine.round(4).tolist()}; "
                         "rigid registration needs an orthogonal voxel grid")
    image = sitk.GetImageFromArray(np.asarray(volume_xyz, dtype=np.float32).transpose(2, 1, 0))  # sitk wants z, y, x
    image.SetSpacing(spacing_3.tolist())
    image.SetDirection(direction_33.flatten().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return image


def register_rigid(moving_xyz: np.ndarray, moving_affine: np.ndarray, fixed_xyz: np.ndarray,
                   fixed_affine: np.ndarray, initial_params_6=None,
                   settings: RegistrationSettings = RegistrationSettings()) -> np.ndarray:
    """(6,) head position of `moving` relative to `fixed` (about `fixed`'s volume centre), in the
    mindeye.motion convention. Starts from `initial_params_6` if given, else from the two volumes'
    centres of mass (whatever the head's offset between them)."""
    return _Registration(sitk_image(fixed_xyz, fixed_affine), settings).run(
        sitk_image(moving_xyz, moving_affine), initial_params_6)


class _Registration:
    """A registration to one fixed image, set up once (its pyramid too) and run for many moving images.

    The pyramid is made here by bin-shrinking (averaging blocks, which also smooths) rather than by
    SimpleITK's multi-resolution, which would smooth and shrink the fixed image again on every run and
    rebuild its sample set at full size (most of a volume's cost at NSD size)."""

    def __init__(self, fixed: sitk.Image, settings: RegistrationSettings):
        self.fixed = fixed
        self.centre_mm = volume_centre_mm(fixed.GetSize(), _affine_of(fixed))
        self.levels = []
        for shrink, n_samples, max_steps, first_step_mm in settings.levels:
            while shrink > 1 and min(fixed.GetSize()) // shrink < settings.min_level_voxels:
                shrink //= 2
            fixed_level = _shrunk(fixed, shrink)
            fraction = n_samples / np.prod(fixed_level.GetSize())
            self.levels.append((shrink, fixed_level, _method(settings, shrink, fraction, max_steps, first_step_mm)))

    def run(self, moving: sitk.Image, initial_params_6=None) -> np.ndarray:
        transform = sitk.Euler3DTransform()
        transform.SetComputeZYX(True)  # R = Rz Ry Rx, as mindeye.motion
        transform.SetCenter(self.centre_mm.tolist())
        if initial_params_6 is None:
            moments = sitk.CenteredTransformInitializer(self.fixed, moving, sitk.Euler3DTransform(),
                                                        sitk.CenteredTransformInitializerFilter.MOMENTS)
            transform.SetTranslation(np.asarray(moments.TransformPoint(self.centre_mm.tolist())) - self.centre_mm)
        else:
            initial_params_6 = np.asarray(initial_params_6, dtype=float)
            transform.SetRotation(*initial_params_6[3:].tolist())
            transform.SetTranslation(initial_params_6[:3].tolist())
        for shrink, fixed, method in self.levels:
            method.SetInitialTransform(transform, inPlace=True)  # each level starts where the last stopped
            method.Execute(fixed, _shrunk(moving, shrink))
        return params_of(_matrix_of(transform), self.centre_mm)


def _method(settings: RegistrationSettings, shrink: int, sampling_fraction: float, max_steps: int,
            first_step_mm: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    if settings.metric == "mean_squares":
        method.SetMetricAsMeanSquares()
    elif settings.metric == "correlation":
        method.SetMetricAsCorrelation()
    else:
        raise ValueError(f"unknown registration metric {settings.metric!r}: use mean_squares or correlation")
    if sampling_fraction < 1:
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(sampling_fraction, 1)  # fixed seed: the same points every run
    method.SetInterpolator(sitk.sitkLinear)
    # At full resolution, image gradients at the sampled points only: filtering the whole images for them
    # costs more than the level's steps (~0.7 s at NSD size); on shrunk images filtering is the cheaper way.
    method.SetMetricUseFixedImageGradientFilter(shrink > 1)
    method.SetMetricUseMovingImageGradientFilter(shrink > 1)
    method.SetOptimizerAsRegularStepGradientDescent(  # stops on the step's size, never on a small gradient
        learningRate=first_step_mm, minStep=settings.min_step_mm, numberOfIterations=max_steps,
        relaxationFactor=settings.relaxation, gradientMagnitudeTolerance=1e-12)
    method.SetOptimizerScalesFromPhysicalShift()
    return method


def _shrunk(image: sitk.Image, shrink: int) -> sitk.Image:
    return sitk.BinShrink(image, [shrink] * 3) if shrink > 1 else image


@dataclass(frozen=True)
class CalibrationReference:
    """The calibration session's mean EPI in the model grid, and the time series it is the mean of."""

    volume_xyz: np.ndarray  # float32, the model grid's shape
    affine: np.ndarray  # (4, 4) the model grid's voxel -> RAS+ mm
    subject: int
    source: str

    @classmethod
    def make(cls, root: str | Path, subject: int, session: int, run: int = 1) -> CalibrationReference:
        """The mean over volumes of `session`'s `run` (NSD layout under `root`), which must lie in the grid
        of the subject's ROI mask (NSD's preprocessed time series do)."""
        layout = NSDLayout(root)
        roi = read_roi(layout.roi(subject))
        path = layout.timeseries(subject, session, run)
        series = read_timeseries(path, expected_shape=roi.shape)
        if not np.allclose(series.affine, roi.affine, atol=1e-3):
            raise FormatError(path, "calibration time series' affine", f"the ROI mask's {roi.affine.round(3).tolist()}",
                              f"{np.round(series.affine, 3).tolist()}")
        mean_xyz = series.data_xyzt.mean(axis=3, dtype=np.float64).astype(np.float32)
        return cls(mean_xyz, np.asarray(series.affine, dtype=float), subject, str(path))

    @staticmethod
    def paths(folder: str | Path, subject: int) -> tuple[Path, Path]:
        """(volume, sidecar) of `subject`'s reference in `folder` (beside the model: its checkpoint folder)."""
        stem = Path(folder) / f"motion_reference_{subject_name(subject)}"
        return stem.with_suffix(".nii.gz"), stem.with_suffix(".json")

    def save(self, folder: str | Path) -> Path:
        volume_path, sidecar_path = self.paths(folder, self.subject)
        volume_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(self.volume_xyz, self.affine), volume_path)
        sidecar_path.write_text(json.dumps({"subject": self.subject, "source": self.source,
                                            "what": "mean EPI of the calibration run, in the model grid"}, indent=1))
        return volume_path

    @classmethod
    def load(cls, folder: str | Path, subject: int) -> CalibrationReference:
        volume_path, sidecar_path = cls.paths(folder, subject)
        for path in (volume_path, sidecar_path):
            if not path.is_file():
                raise MissingFileError(path, f"calibration reference of {subject_name(subject)} (motion correction's "
                                             "target in the model grid)",
                                       hint="make it from the calibration session: "
                                            "CalibrationReference.make(root, subject, session).save(folder)")
        image = nib.load(volume_path)
        return cls(np.asarray(image.dataobj, dtype=np.float32), image.affine, subject,
                   _read_json(sidecar_path, "calibration reference's sidecar", ["source"])["source"])


@dataclass(frozen=True)
class SessionAlignment:
    """Where the calibration head is in today's reference: S(p) = R (p - c) + c + t, c the calibration
    reference's centre, `params_6` in the mindeye.motion convention; and today's reference itself."""

    params_6: np.ndarray
    centre_mm: np.ndarray
    reference_xyz: np.ndarray  # today's reference volume, float32, the scanner's grid
    reference_affine: np.ndarray
    calibration_source: str = ""

    @classmethod
    def create(cls, reference_xyz: np.ndarray, reference_affine: np.ndarray, calibration: CalibrationReference,
               settings: RegistrationSettings = SESSION_SETTINGS) -> SessionAlignment:
        """Register today's reference to the calibration reference, from their centres of mass."""
        params_6 = register_rigid(reference_xyz, reference_affine, calibration.volume_xyz, calibration.affine,
                                  settings=settings)
        return cls(params_6, volume_centre_mm(calibration.volume_xyz.shape, calibration.affine),
                   np.asarray(reference_xyz, dtype=np.float32), np.asarray(reference_affine, dtype=float),
                   calibration.source)

    def matrix(self) -> np.ndarray:
        """(4, 4) world matrix of S: a calibration-head point -> the same point in today's reference."""
        return rigid_matrix(self.params_6, self.centre_mm)

    def save(self, folder: str | Path) -> Path:
        """session_reference.nii.gz and session_alignment.json in `folder`; returns the JSON's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(self.reference_xyz, self.reference_affine), folder / SESSION_REFERENCE)
        record = {"params": dict(zip(MOTION_PARAMS, self.params_6.tolist())), "centre_mm": self.centre_mm.tolist(),
                  "reference": SESSION_REFERENCE, "calibration_source": self.calibration_source,
                  "what": "today's reference relative to the calibration reference (mindeye.motion convention)"}
        path = folder / SESSION_ALIGNMENT
        path.write_text(json.dumps(record, indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SessionAlignment:
        folder = Path(folder)
        for path, what in ((folder / SESSION_ALIGNMENT, "session alignment"),
                           (folder / SESSION_REFERENCE, "session's reference volume")):
            if not path.is_file():
                raise MissingFileError(path, what, hint="SessionAlignment.create(first volume, ...).save(folder) "
                                                        "makes it; the bridge does on a session's first volume")
        record = _read_json(folder / SESSION_ALIGNMENT, "session alignment", ["params", "centre_mm"])
        try:
            params_6 = np.array([record["params"][name] for name in MOTION_PARAMS], dtype=float)
            centre_mm = np.array(record["centre_mm"], dtype=float).reshape(3)
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(folder / SESSION_ALIGNMENT, "session alignment", f"params {MOTION_PARAMS} and "
                              "centre_mm (3 numbers)", repr(error)) from None
        image = nib.load(folder / SESSION_REFERENCE)
        return cls(params_6, centre_mm, np.asarray(image.dataobj, dtype=np.float32), image.affine,
                   record.get("calibration_source", ""))


@dataclass(frozen=True)
class CorrectedVolume:
    data_xyz: np.ndarray  # float32, the model grid
    params_6: np.ndarray  # head position relative to today's reference
    timings_ms: dict[str, float] = field(default_factory=dict)  # by stage: register, resample


class MotionCorrector:
    """Per volume: rigid registration to today's reference, then one resampling into the model grid.

    The resampling is linear (SimpleITK), except at the `roi_xyz` voxels of the model grid (those the model
    reads), which get a cubic B-spline (scipy): linear interpolation averages neighbouring voxels and so
    blurs single-voxel response patterns (benchmarks/bridge_motion.py: the motion-free run's betas come
    back with r 0.46 after linear resampling, 0.62 after cubic), and cubic over the whole NSD grid costs
    ~15x linear in SimpleITK. Each voxel is still interpolated once."""

    def __init__(self, reference_xyz: np.ndarray, reference_affine: np.ndarray, model_shape: tuple[int, int, int],
                 model_affine: np.ndarray, alignment: SessionAlignment,
                 settings: RegistrationSettings = RegistrationSettings(), roi_xyz: np.ndarray | None = None):
        self._registration = _Registration(sitk_image(reference_xyz, reference_affine), settings)
        self._model_shape = tuple(int(n) for n in model_shape)
        self._model_affine = np.asarray(model_affine, dtype=float)
        self._model_geometry = sitk_image(np.zeros((1, 1, 1), np.float32), model_affine)  # origin, spacing, direction
        self._session_44 = alignment.matrix()
        self._previous_6 = np.zeros(6)  # the first volume starts at today's reference
        self._roi_xyz = None
        if roi_xyz is not None:
            if tuple(roi_xyz.shape) != self._model_shape:
                raise ValueError(f"ROI mask of shape {roi_xyz.shape} for a model grid of shape {self._model_shape}")
            self._roi_xyz = np.asarray(roi_xyz, dtype=bool)
            self._roi_voxels_4n = np.r_[np.argwhere(self._roi_xyz).T, np.ones((1, self._roi_xyz.sum()))]

    def correct(self, volume_xyz: np.ndarray, affine: np.ndarray) -> CorrectedVolume:
        start = time.perf_counter()
        moving = sitk_image(volume_xyz, affine)
        params_6 = self._registration.run(moving, self._previous_6)
        registered = time.perf_counter()
        world_44 = rigid_matrix(params_6, self._registration.centre_mm) @ self._session_44  # model world -> volume t
        transform = sitk.AffineTransform(world_44[:3, :3].flatten().tolist(), world_44[:3, 3].tolist())
        geometry = self._model_geometry
        resampled = sitk.Resample(moving, self._model_shape, transform, sitk.sitkLinear, geometry.GetOrigin(),
                                  geometry.GetSpacing(), geometry.GetDirection(), 0.0, sitk.sitkFloat32)
        data_xyz = np.ascontiguousarray(sitk.GetArrayFromImage(resampled).transpose(2, 1, 0))
        if self._roi_xyz is not None:
            voxel_44 = np.linalg.inv(affine) @ world_44 @ self._model_affine  # model voxel -> volume t's voxel
            data_xyz[self._roi_xyz] = _cubic_at(volume_xyz, (voxel_44 @ self._roi_voxels_4n)[:3])
        done = time.perf_counter()
        self._previous_6 = params_6
        return CorrectedVolume(data_xyz, params_6, {"register": 1e3 * (registered - start),
                                                    "resample": 1e3 * (done - registered)})


def _cubic_at(volume_xyz: np.ndarray, voxels_3n: np.ndarray) -> np.ndarray:
    """(n,) cubic B-spline values of `volume_xyz` at voxel coordinates `voxels_3n`; zero outside, as
    SimpleITK's resampling."""
    coefficients_xyz = ndimage.spline_filter(np.asarray(volume_xyz, dtype=np.float32), order=3, output=np.float32,
                                             mode="grid-constant")
    return ndimage.map_coordinates(coefficients_xyz, voxels_3n, order=3, prefilter=False, mode="grid-constant")


def _read_json(path: Path, what: str, keys: list[str]) -> dict:
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(path, what, "JSON", f"unreadable content ({error})") from None
    if not isinstance(record, dict) or not all(key in record for key in keys):
        raise FormatError(path, what, f"a JSON object with {keys}", f"{str(record)[:80]}")
    return record


def _affine_of(image: sitk.Image) -> np.ndarray:
    """(4, 4) voxel -> world matrix of a SimpleITK image (RAS+ for images made by `sitk_image`)."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def _matrix_of(transform: sitk.Euler3DTransform) -> np.ndarray:
    """(4, 4) world matrix of a SimpleITK rigid transform: x -> R (x - c) + c + t."""
    matrix_44 = np.eye(4)
    rotation_33 = np.array(transform.GetMatrix()).reshape(3, 3)
    centre_3 = np.array(transform.GetCenter())
    matrix_44[:3, :3] = rotation_33
    matrix_44[:3, 3] = centre_3 + np.array(transform.GetTranslation()) - rotation_33 @ centre_3
    return matrix_44
