"""A subject's linear token readout: backbone tokens -> CLIP image tokens by ridge regression, fitted in closed
form on the subject's training trials when a run is saved; a token source for the generator beside the prior.

Why it exists: with one session of a new subject, the diffusion prior's sampled tokens lose more of the seen
image's identity than a linear map of the same backbone tokens (small world, held-out folds of subject 8's
session: docs/training.md), and the generator's pictures follow its tokens. The readout is that linear map.

Kernel (dual) form, because at paper size the backbone tokens have p = 256 x 1664 features and the primal
weights would be p x p: with Z (n, p) the z-scored training features and Y (n, q) the seen images' tokens,
C = (Z Z^T + alpha I)^-1 (Y - mean Y) (n, q), and a new trial's tokens are ((x - mean) / std) Z^T C + mean Y.
alpha is chosen among `alphas` by leave-one-out squared error, in closed form from one eigendecomposition of
Z Z^T (the efficient LOO scikit-learn's RidgeCV uses; its estimator stores the primal weights).

Each predicted token is then scaled to the mean norm of the training targets' tokens at its position. The
generator was trained on the encoder's own tokens, whose norms its final LayerNorm fixes (the world's: all
sqrt(D)); ridge shrinks its predictions toward the mean, and the generator draws blander pictures from tokens
of norms it never saw (docs/training.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mindeye.errors import ConfigValueError, FormatError, MissingFileError

READOUT_FILE = "readout.safetensors"
TOKEN_SOURCES = ("prior", "readout")  # what the generator draws from: the diffusion prior's samples, or this
DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)  # on z-scored features: alpha / p is the shrinkage per feature
PARTS = ("feature_mean", "feature_std", "train_features", "coef", "target_mean", "token_norm")


class TokenReadout(nn.Module):
    """Ridge readout in kernel form; `forward` maps backbone tokens (B, L, D) to image tokens (B, L', D'), each
    at its position's norm (`ridge`: before that)."""

    def __init__(self, feature_mean: torch.Tensor, feature_std: torch.Tensor, train_features: torch.Tensor,
                 coef: torch.Tensor, target_mean: torch.Tensor, token_norm: torch.Tensor, token_shape: Sequence[int],
                 alpha: float):
        super().__init__()
        self.register_buffer("feature_mean", feature_mean)  # (p,)
        self.register_buffer("feature_std", feature_std)  # (p,)
        self.register_buffer("train_features", train_features)  # (n, p) z-scored
        self.register_buffer("coef", coef)  # (n, q)
        self.register_buffer("target_mean", target_mean)  # (q,)
        self.register_buffer("token_norm", token_norm)  # (L',) mean norm of the training targets' tokens
        self.token_shape, self.alpha = tuple(int(s) for s in token_shape), float(alpha)

    @property
    def n_trials(self) -> int:
        return len(self.train_features)

    def forward(self, backbone_bld: torch.Tensor) -> torch.Tensor:
        tokens_bld = self.ridge(backbone_bld)
        return tokens_bld * (self.token_norm[:, None] / tokens_bld.norm(dim=-1, keepdim=True).clamp(min=1e-12))

    def ridge(self, backbone_bld: torch.Tensor) -> torch.Tensor:
        flat_bp = backbone_bld.reshape(len(backbone_bld), -1).to(self.coef)
        if flat_bp.shape[1] != len(self.feature_mean):
            raise ValueError(f"the readout takes {len(self.feature_mean)} backbone features a trial, got "
                             f"{tuple(backbone_bld.shape[1:])}")
        kernel_bn = ((flat_bp - self.feature_mean) / self.feature_std) @ self.train_features.T
        return (kernel_bn @ self.coef + self.target_mean).reshape(len(backbone_bld), *self.token_shape)


def fit_token_readout(features_nld: torch.Tensor, targets_nld: torch.Tensor,
                      alphas: Sequence[float] = DEFAULT_ALPHAS) -> tuple[TokenReadout, dict[float, float]]:
    """The readout with the alpha of least leave-one-out error, and {alpha: mean LOO squared error per target}."""
    n = len(features_nld)
    if n < 3 or len(targets_nld) != n:
        raise ValueError(f"a readout needs >= 3 trials with one target each, got {n} trials and {len(targets_nld)} "
                         "targets")
    if not alphas or min(alphas) <= 0:
        raise ValueError(f"alphas must be positive, got {list(alphas)}")
    x_np = features_nld.reshape(n, -1).double()
    y_nq = targets_nld.reshape(n, -1).double()
    feature_mean, feature_std = x_np.mean(0), x_np.std(0, correction=0) + 1e-6
    z_np = (x_np - feature_mean) / feature_std
    target_mean = y_nq.mean(0)
    eigenvalues_n, eigenvectors_nn = torch.linalg.eigh(z_np @ z_np.T)
    projected_nq = eigenvectors_nn.T @ (y_nq - target_mean)
    loo_errors, best = {}, None
    for alpha in alphas:
        inverse_n = 1.0 / (eigenvalues_n.clamp(min=0) + alpha)
        coef_nq = eigenvectors_nn @ (inverse_n[:, None] * projected_nq)
        # Residuals are alpha C; the hat matrix K (K + alpha I)^-1 + 11^T / n (the intercept, unpenalised: Z is
        # centred, so K 1 = 0) has diagonal 1 + 1/n - alpha G_ii with G = (K + alpha I)^-1.
        inverse_diag_n = (eigenvectors_nn ** 2) @ inverse_n
        loo_residual_nq = alpha * coef_nq / (alpha * inverse_diag_n - 1.0 / n)[:, None]
        loo_errors[float(alpha)] = float((loo_residual_nq ** 2).mean())
        if best is None or loo_errors[float(alpha)] < loo_errors[best[0]]:
            best = (float(alpha), coef_nq)
    token_norm = targets_nld.double().norm(dim=-1).mean(0)
    readout = TokenReadout(*(t.float() for t in (feature_mean, feature_std, z_np, best[1], target_mean, token_norm)),
                           token_shape=targets_nld.shape[1:], alpha=best[0])
    return readout, loo_errors


def save_readouts(path_dir: str | Path, readouts: dict[str, TokenReadout]) -> Path | None:
    """`readouts` (subject -> readout) into path_dir/readout.safetensors; an existing file is replaced, and
    removed when there are none (a checkpoint's readouts belong to its weights)."""
    path = Path(path_dir) / READOUT_FILE
    if not readouts:
        path.unlink(missing_ok=True)
        return None
    tensors = {f"{subject}.{part}": getattr(readout, part).detach().cpu().contiguous()
               for subject, readout in readouts.items() for part in PARTS}
    metadata = {f"{subject}.{key}": str(value) for subject, readout in readouts.items()
                for key, value in (("alpha", readout.alpha), ("token_shape", ",".join(map(str, readout.token_shape))))}
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"what": "per-subject ridge readouts, backbone -> image tokens",
                                                 **metadata})
    temporary.replace(path)
    return path


def load_readouts(path_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, TokenReadout]:
    """subject -> readout, as `save_readouts` wrote them; {} when the checkpoint has none."""
    path = Path(path_dir) / READOUT_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path), device=str(device))
    readouts = {}
    for subject in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        try:
            parts = [tensors[f"{subject}.{part}"] for part in PARTS]
            shape = [int(s) for s in metadata[f"{subject}.token_shape"].split(",")]
            readouts[subject] = TokenReadout(*parts, token_shape=shape, alpha=float(metadata[f"{subject}.alpha"]))
        except (KeyError, ValueError) as error:
            raise FormatError(path, "readout", f"{', '.join(PARTS)}, alpha and token_shape per subject",
                              f"{subject}: {error}") from None
    return readouts


def check_token_source(source: str, setting: str, choices: Sequence[str] = TOKEN_SOURCES) -> None:
    if source not in choices:
        raise ConfigValueError(f"{setting} must be one of {', '.join(choices)}, got {source!r}")


def how_to_get_readouts(setting: str) -> str:
    return (f"mindeye-train fits one when a run ends, for each subject with at most readout.max_trials training "
            f"trials; or draw from the prior ({setting}=prior)")


def require_readout(checkpoint_dir: str | Path, subject: str, device: str | torch.device = "cpu") -> TokenReadout:
    """`subject`'s readout in the checkpoint, or an error saying how to get one."""
    readouts = load_readouts(checkpoint_dir, device)
    if subject in readouts:
        return readouts[subject]
    if not readouts:
        raise MissingFileError(Path(checkpoint_dir) / READOUT_FILE, "token readouts", how_to_get_readouts("tokens"))
    raise ConfigValueError(f"{checkpoint_dir} has token readouts for {sorted(readouts)}, not {subject}: "
                           f"{how_to_get_readouts('tokens')}")
