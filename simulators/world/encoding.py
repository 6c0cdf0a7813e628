"""The ground-truth encoding model: one shared nonlinear code of the image, read out by each
subject through a linear map of its own into its own voxels.

This is the assumption MindEye2 relies on (a per-subject linear aligner into a shared space,
then shared nonlinear layers), made explicit and tunable:

    pcs(image)    = whitened top-K principal components of the image's CLIP tokens
    code(image)   = standardise((1 - a) * rotation(pcs) + a * mlp(pcs))           (n_images, K)
    response_s    = signal_pct * gain_v * (code @ maps_s.T)                       (n_images, V_s)
    trial_s       = response_s[image of trial] + N(0, trial_noise_pct)            (n_trials, V_s)

`a` = code.nonlinearity. The maps are smooth random fields over the subject's grid (its
spatial smoothness), gains are log-normal (per-voxel SNR) and a fraction of voxels is pure noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from simulators.world.anatomy import Anatomy
from simulators.world.stats import standardise


def principal_scores(x_nf: np.ndarray, k: int, rng: np.random.Generator, power_iterations: int = 4) -> np.ndarray:
    """Whitened scores (n, k) on the top-k principal components of the rows of `x_nf`
    (randomised SVD: exact for the leading components, and cheap at the small world's size)."""
    centred = x_nf - x_nf.mean(0)
    basis = np.linalg.qr(centred @ rng.standard_normal((centred.shape[1], k + 10)))[0]
    for _ in range(power_iterations):
        basis = np.linalg.qr(centred @ (centred.T @ basis))[0]
    u_small, _, _ = np.linalg.svd(basis.T @ centred, full_matrices=False)
    return (basis @ u_small[:, :k]) * np.sqrt(len(x_nf))


def shared_code(tokens_nld: np.ndarray, code_cfg, rng: np.random.Generator) -> np.ndarray:
    """(n_images, n_tokens, dim) CLIP tokens -> (n_images, K) standardised code.

    The code reads the tokens' top-K principal components (what dominates the image's
    representation, as salient content dominates a visual cortex response), once linearly
    (a random rotation) and once through a fixed random two-layer tanh network whose gain
    of 2 puts it well past its linear range.
    """
    k, hidden = code_cfg.dim, code_cfg.hidden
    pcs_nk = principal_scores(tokens_nld.reshape(len(tokens_nld), -1).astype(np.float64), k, rng)
    rotation_kk = np.linalg.qr(rng.standard_normal((k, k)))[0]
    hidden_1 = np.tanh(pcs_nk @ rng.standard_normal((k, hidden)) * 2.0 / np.sqrt(k))
    hidden_2 = np.tanh(hidden_1 @ rng.standard_normal((hidden, hidden)) * 2.0 / np.sqrt(hidden))
    nonlinear_nk = hidden_2 @ rng.standard_normal((hidden, k))
    a = code_cfg.nonlinearity
    return standardise((1 - a) * standardise(pcs_nk @ rotation_kk) + a * standardise(nonlinear_nk))


@dataclass(frozen=True)
class SubjectEncoding:
    maps_vk: np.ndarray  # (V, K) unit-norm rows: how each ROI voxel reads the code
    gain_v: np.ndarray  # (V,) signal gain, 0 for the noise-only voxels
    hrf_shift_v: np.ndarray  # (V,) seconds by which the voxel's HRF lags the canonical one

    def response_pct(self, code_nk: np.ndarray, signal_pct: float) -> np.ndarray:
        """(n_images, V) noiseless response in percent signal change."""
        return signal_pct * self.gain_v * (code_nk @ self.maps_vk.T)


def subject_encoding(anatomy: Anatomy, code_dim: int, smoothness_vox: float, snr_cfg,
                     rng: np.random.Generator) -> SubjectEncoding:
    n_voxels = int(anatomy.roi_xyz.sum())
    fields = np.stack([gaussian_filter(rng.standard_normal(anatomy.shape), sigma=smoothness_vox, mode="wrap")
                       for _ in range(code_dim)], axis=-1)  # (X, Y, Z, K)
    maps_vk = fields[anatomy.roi_xyz]
    maps_vk /= np.linalg.norm(maps_vk, axis=1, keepdims=True)
    gain_v = rng.lognormal(0.0, snr_cfg.gain_sigma, n_voxels)
    gain_v /= gain_v.mean()
    gain_v[rng.random(n_voxels) < snr_cfg.noisy_voxel_fraction] = 0.0
    hrf_shift_v = rng.uniform(-snr_cfg.hrf_peak_jitter_s, snr_cfg.hrf_peak_jitter_s, n_voxels)
    return SubjectEncoding(maps_vk=maps_vk, gain_v=gain_v, hrf_shift_v=hrf_shift_v)
