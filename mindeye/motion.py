"""Rigid head motion: the 6 parameters, their 4x4 matrix, and framewise displacement.

One convention for everything that simulates, estimates or reports head motion (the replayer's
scanner-folder sink, the bridge's registration, the wire protocol, the viewer):

- `params_6` = (trans_x_mm, trans_y_mm, trans_z_mm, rot_x_rad, rot_y_rad, rot_z_rad), in scanner
  world coordinates (RAS+ millimetres, as nibabel affines give them).
- The rotation is R = Rz @ Ry @ Rx (about x first), applied about `centre_mm` (the volume's centre),
  then the translation: M(p) = R (p - c) + c + t. SimpleITK's Euler3DTransform matches this with
  ComputeZYX on, after converting RAS+ to its LPS+ world.
- Direction: the parameters say where the head went. A point of the head at world position p in the
  reference volume is at M(p) in the moved volume, so moved(x) = reference(M^-1(x)).

Framewise displacement is Power et al. (2012): the sum of absolute backward differences of the three
translations and of the three rotations turned into arc length on a 50 mm sphere.
"""
from __future__ import annotations

import numpy as np

MOTION_PARAMS = ("trans_x_mm", "trans_y_mm", "trans_z_mm", "rot_x_rad", "rot_y_rad", "rot_z_rad")
HEAD_RADIUS_MM = 50.0  # Power et al. (2012): rotations as arc length on a sphere of this radius


def rotation_matrix(rot_xyz_rad) -> np.ndarray:
    """(3, 3) R = Rz @ Ry @ Rx for rotations (rx, ry, rz) in radians about the world axes."""
    rx, ry, rz = (float(a) for a in rot_xyz_rad)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def rigid_matrix(params_6, centre_mm) -> np.ndarray:
    """(4, 4) world-to-world matrix of M(p) = R (p - c) + c + t."""
    params_6, centre_3 = _params(params_6), np.asarray(centre_mm, dtype=float).reshape(3)
    rotation_33 = rotation_matrix(params_6[3:])
    matrix_44 = np.eye(4)
    matrix_44[:3, :3] = rotation_33
    matrix_44[:3, 3] = centre_3 + params_6[:3] - rotation_33 @ centre_3
    return matrix_44


def params_of(matrix_44, centre_mm) -> np.ndarray:
    """The 6 parameters of a rigid world matrix (inverse of `rigid_matrix`; |rot_y| < 90 degrees)."""
    matrix_44 = np.asarray(matrix_44, dtype=float)
    rotation_33, centre_3 = matrix_44[:3, :3], np.asarray(centre_mm, dtype=float).reshape(3)
    if matrix_44.shape != (4, 4) or not np.allclose(rotation_33 @ rotation_33.T, np.eye(3), atol=1e-6):
        raise ValueError(f"not a rigid 4x4 matrix: {matrix_44.tolist()}")
    rot_x = np.arctan2(rotation_33[2, 1], rotation_33[2, 2])
    rot_y = np.arcsin(np.clip(-rotation_33[2, 0], -1.0, 1.0))
    rot_z = np.arctan2(rotation_33[1, 0], rotation_33[0, 0])
    translation_3 = matrix_44[:3, 3] - centre_3 + rotation_33 @ centre_3
    return np.concatenate([translation_3, [rot_x, rot_y, rot_z]])


def volume_centre_mm(shape_xyz, affine_44) -> np.ndarray:
    """World position (mm) of the centre of a volume's voxel grid."""
    centre_vox = (np.asarray(shape_xyz[:3], dtype=float) - 1) / 2
    return (np.asarray(affine_44, dtype=float) @ np.append(centre_vox, 1.0))[:3]


def framewise_displacement(params_t6, radius_mm: float = HEAD_RADIUS_MM) -> np.ndarray:
    """(T,) FD in mm of a motion time series (T, 6); the first volume's FD is 0."""
    params_t6 = np.asarray(params_t6, dtype=float)
    if params_t6.ndim != 2 or params_t6.shape[1] != 6:
        raise ValueError(f"motion parameters must be (T, 6), got {params_t6.shape}")
    step_t6 = np.abs(np.diff(params_t6, axis=0))
    fd_t = step_t6[:, :3].sum(axis=1) + radius_mm * step_t6[:, 3:].sum(axis=1)
    return np.concatenate([[0.0], fd_t])


def _params(params_6) -> np.ndarray:
    params_6 = np.asarray(params_6, dtype=float).reshape(-1)
    if params_6.shape != (6,) or not np.isfinite(params_6).all():
        raise ValueError(f"motion parameters must be 6 finite numbers {MOTION_PARAMS}, got {params_6.tolist()}")
    return params_6
