"""The rigid-motion convention every stage shares: matrix, inverse, framewise displacement."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mindeye.motion import framewise_displacement, params_of, rigid_matrix, rotation_matrix, volume_centre_mm


def test_rotation_is_z_after_y_after_x_as_scipy_composes_extrinsic_xyz():
    angles = np.array([0.1, -0.2, 0.3])
    expected = Rotation.from_euler("xyz", angles).as_matrix()  # extrinsic x, then y, then z
    np.testing.assert_allclose(rotation_matrix(angles), expected, atol=1e-12)


def test_matrix_rotates_about_the_centre_then_translates():
    centre = np.array([10.0, -20.0, 5.0])
    params = np.array([1.0, 2.0, -3.0, 0.0, 0.0, np.pi / 2])
    matrix = rigid_matrix(params, centre)
    np.testing.assert_allclose(matrix @ np.append(centre, 1), np.append(centre + params[:3], 1), atol=1e-12)
    # a point 1 mm along +x from the centre turns to +y by 90 degrees about z
    np.testing.assert_allclose((matrix @ np.append(centre + [1, 0, 0], 1))[:3], centre + params[:3] + [0, 1, 0],
                               atol=1e-12)


def test_params_round_trip_through_the_matrix():
    rng = np.random.default_rng(0)
    for _ in range(50):
        params = np.concatenate([rng.uniform(-5, 5, 3), rng.uniform(-0.5, 0.5, 3)])
        centre = rng.uniform(-50, 50, 3)
        np.testing.assert_allclose(params_of(rigid_matrix(params, centre), centre), params, atol=1e-10)


def test_params_of_refuses_a_non_rigid_matrix():
    with pytest.raises(ValueError, match="not a rigid"):
        params_of(np.diag([2.0, 1, 1, 1]), [0, 0, 0])


def test_framewise_displacement_is_power_2012():
    params = np.zeros((3, 6))
    params[1] = [1.0, -1.0, 0.5, 0.0, 0.0, 0.0]  # 2.5 mm of translation
    params[2] = params[1] + [0, 0, 0, 0.01, 0, -0.01]  # 0.02 rad -> 1 mm on a 50 mm sphere
    np.testing.assert_allclose(framewise_displacement(params), [0.0, 2.5, 1.0])
    with pytest.raises(ValueError, match=r"\(T, 6\)"):
        framewise_displacement(np.zeros((3, 5)))


def test_volume_centre_is_the_grid_middle_in_world_mm():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -20, -30]
    np.testing.assert_allclose(volume_centre_mm((11, 21, 31), affine), [0.0, 0.0, 0.0])
