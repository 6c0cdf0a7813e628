"""Image-reconstruction metrics as the MindEye2 paper computes them (Table 1).

Definitions follow the official evaluation, MedARC-AI/MindEyeV2 `src/final_evaluations.ipynb`:

- PixCorr: both images bilinearly resized to 425 x 425, flattened over all channels, Pearson r
  per (reconstruction, seen image) pair, mean over pairs.
- SSIM: the same 425 px images converted to grey (`skimage.color.rgb2gray`), then
  `skimage.metrics.structural_similarity` with a Gaussian window (sigma 1.5), population
  covariance and data range 1, mean over pairs. The notebook also passes `multichannel=True`;
  scikit-image removed that argument in 0.20 and its pinned 0.22 swallows it unused, so the
  paper's score is plain 2-D SSIM of the grey images, which is what is computed here.
- 2-way identification: features flattened per image; reconstruction i scores the fraction of
  the other seen images j for which corr(recon_i, seen_i) > corr(recon_i, seen_j) (strictly;
  ties count as failures); mean over i. Chance is 0.5.
- Correlation distance (EfficientNet-B1, SwAV): mean over pairs of 1 - Pearson r between the
  flattened features (`scipy.spatial.distance.correlation`). Lower is better.

The paper feeds these functions 256 px images (see `report.evaluate_reconstructions`), so the
425 px resize only ever upsamples, where antialiasing changes nothing.
Images are (N, H, W, 3), uint8 or float in [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

PIXEL_METRIC_SIZE = 425  # px, both sides, for PixCorr and SSIM
# The official evaluation ran torchvision 0.16, whose tensor Resize did not antialias: its
# downsamplings (reconstructions to 256 px, 256 px images to the networks' 224/255 px inputs)
# were aliased. Those resizes here do the same, so scores compare with the paper's.
PAPER_DOWNSAMPLE_ANTIALIAS = False


def images_to_nchw(images_nhwc: np.ndarray, what: str = "images") -> torch.Tensor:
    """uint8 or [0, 1] float (N, H, W, 3) -> float32 tensor (N, 3, H, W) in [0, 1]."""
    images_nhwc = np.asarray(images_nhwc)
    if images_nhwc.ndim != 4 or images_nhwc.shape[-1] != 3:
        raise ValueError(f"{what}: expected (N, H, W, 3) RGB images, got shape {images_nhwc.shape}")
    if images_nhwc.dtype == np.uint8:
        images = images_nhwc.astype(np.float32) / 255.0
    elif np.issubdtype(images_nhwc.dtype, np.floating):
        low, high = float(images_nhwc.min()), float(images_nhwc.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{what}: float images must lie in [0, 1], found values in [{low:.4g}, {high:.4g}]")
        images = images_nhwc.astype(np.float32)
    else:
        raise ValueError(f"{what}: expected uint8 or float images, got dtype {images_nhwc.dtype}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def resize_nchw(images_nchw: torch.Tensor, size: int, *, antialias: bool = True) -> torch.Tensor:
    """Bilinear resize to size x size (a no-op on images already that size)."""
    if images_nchw.shape[-2:] == (size, size):
        return images_nchw
    return F.interpolate(images_nchw, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def _check_pairs(recon: np.ndarray, target: np.ndarray) -> None:
    if len(recon) != len(target):
        raise ValueError(f"{len(recon)} reconstructions for {len(target)} seen images")
    if len(recon) == 0:
        raise ValueError("no images to compare")


def _pearson_rows(a_nf: np.ndarray, b_nf: np.ndarray, what: str) -> np.ndarray:
    """Pearson r between row i of `a_nf` and row i of `b_nf`, for every i -> (N,)."""
    a_z, b_z = _zscore_rows(a_nf, what), _zscore_rows(b_nf, what)
    return np.einsum("nf,nf->n", a_z, b_z) / a_z.shape[1]


def _zscore_rows(x_nf: np.ndarray, what: str) -> np.ndarray:
    """Each row centred and scaled to unit (population) standard deviation, float64."""
    z_nf = np.array(x_nf, dtype=np.float64).reshape(len(x_nf), -1)  # a copy, normalised in place:
    z_nf -= z_nf.mean(axis=1, keepdims=True)  # AlexNet features.4 is ~1.5 GB per 1000 images
    std_n = np.sqrt(np.einsum("nf,nf->n", z_nf, z_nf) / z_nf.shape[1])
    constant = np.flatnonzero(std_n == 0)
    if constant.size:
        raise ValueError(f"{what}: rows {constant[:10].tolist()} are constant; their correlation is undefined")
    z_nf /= std_n[:, None]
    return z_nf


def pixcorr(recon_nhwc: np.ndarray, target_nhwc: np.ndarray) -> float:
    """Mean per-pair Pearson r of the 425 px images, flattened over all channels."""
    _check_pairs(recon_nhwc, target_nhwc)
    recon = resize_nchw(images_to_nchw(recon_nhwc, "reconstructions"), PIXEL_METRIC_SIZE)
    target = resize_nchw(images_to_nchw(target_nhwc, "seen images"), PIXEL_METRIC_SIZE)
    r_n = _pearson_rows(recon.flatten(1).numpy(), target.flatten(1).numpy(), "pixcorr images")
    return float(r_n.mean())


def grey_425(images_nhwc: np.ndarray, what: str = "images") -> np.ndarray:
    """(N, H, W, 3) -> (N, 425, 425) float32 grey images in [0, 1], as SSIM sees them."""
    images = resize_nchw(images_to_nchw(images_nhwc, what), PIXEL_METRIC_SIZE)
    return rgb2gray(images.permute(0, 2, 3, 1).numpy())


def ssim(recon_nhwc: np.ndarray, target_nhwc: np.ndarray) -> float:
    """Mean per-pair SSIM of the grey 425 px images (Gaussian window, sigma 1.5)."""
    _check_pairs(recon_nhwc, target_nhwc)
    recon_grey = grey_425(recon_nhwc, "reconstructions")
    target_grey = grey_425(target_nhwc, "seen images")
    scores = [structural_similarity(r, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0)
              for r, t in zip(recon_grey, target_grey)]
    return float(np.mean(scores))


def two_way_wins(pred_feats_nf: np.ndarray, target_feats_nf: np.ndarray) -> np.ndarray:
    """(n,): for each reconstruction i, the fraction of j != i with r(pred_i, target_i) > r(pred_i, target_j).

    Features are flattened per image; 0.5 is chance, 1.0 perfect.
    """
    _check_pairs(pred_feats_nf, target_feats_nf)
    n = len(pred_feats_nf)
    if n < 2:
        raise ValueError("2-way identification needs at least 2 images")
    pred_z = _zscore_rows(pred_feats_nf, "reconstruction features")
    target_z = _zscore_rows(target_feats_nf, "seen-image features")
    if pred_z.shape != target_z.shape:
        raise ValueError(f"feature sizes differ: {pred_z.shape[1]} (reconstructions) vs {target_z.shape[1]} (seen)")
    r_nn = pred_z @ target_z.T / pred_z.shape[1]  # r_nn[i, j] = corr(pred_i, target_j)
    wins_n = np.sum(r_nn < np.diag(r_nn)[:, None], axis=1)  # the diagonal never beats itself
    return wins_n / (n - 1)


def two_way_identification(pred_feats_nf: np.ndarray, target_feats_nf: np.ndarray) -> float:
    """Mean over reconstructions of `two_way_wins`: the paper's 2-way identification (0.5 chance)."""
    return float(np.mean(two_way_wins(pred_feats_nf, target_feats_nf)))


def paired_difference(a_n: np.ndarray, b_n: np.ndarray, *, resamples: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over images, with a percentile bootstrap interval that resamples the images.

    For per-image scores of two methods on the same images (e.g. `two_way_wins`): the interval says
    whether a beats b beyond which images happened to be in the test set (the distractors stay fixed).
    Returns (mean, low, high).
    """
    a_n, b_n = np.asarray(a_n, dtype=np.float64), np.asarray(b_n, dtype=np.float64)
    if a_n.shape != b_n.shape or a_n.ndim != 1 or len(a_n) < 2:
        raise ValueError(f"need two equal-length score vectors of 2+ images, got {a_n.shape} and {b_n.shape}")
    diff_n = a_n - b_n
    picks_rn = np.random.default_rng(seed).integers(0, len(diff_n), size=(resamples, len(diff_n)))
    low, high = np.quantile(diff_n[picks_rn].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(diff_n.mean()), float(low), float(high)


def correlation_distance(pred_feats_nf: np.ndarray, target_feats_nf: np.ndarray) -> float:
    """Mean over pairs of 1 - Pearson r between flattened features (0 = identical up to scale and offset)."""
    _check_pairs(pred_feats_nf, target_feats_nf)
    pred = np.asarray(pred_feats_nf).reshape(len(pred_feats_nf), -1)
    target = np.asarray(target_feats_nf).reshape(len(target_feats_nf), -1)
    if pred.shape != target.shape:
        raise ValueError(f"feature sizes differ: {pred.shape[1]} (reconstructions) vs {target.shape[1]} (seen)")
    return float(np.mean(1.0 - _pearson_rows(pred, target, "features")))
