"""MindEye2's training losses: the contrastive pair (BiMixCo, then SoftCLIP), low-level L1 and the prior's.

Contrastive losses compare brain embeddings with CLIP image embeddings, both flattened over the token
grid and L2-normalised to unit rows (b, n_tokens * dim). Definitions follow the official MindEyeV2
code (src/utils.py `mixco`, `mixco_nce`, `soft_clip_loss`, `cosine_anneal`; src/Train.ipynb):

- BiMixCo (first `fraction` of the epochs): each brain row is, with probability `prob`, mixed with a
  random partner row, lambda ~ Beta(0.15, 0.15); the label of row i is lambda_i on its own image and
  1 - lambda_i on its partner's. Cross-entropy against those labels, brain->image and image->brain,
  averaged; temperature 0.006.
- SoftCLIP (the rest): labels are softmax(image . image^T / T) instead of the identity, both
  directions; T cosine-annealed from 0.004 to 0.0075 over the SoftCLIP epochs.

One deliberate difference: where the official code builds mixup labels with an assignment, a row
drawn as its own partner gets label 1 - lambda on itself; here the two weights add up to 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F



def unit_rows(tokens_bnd: torch.Tensor) -> torch.Tensor:
    """(b, n, d) tokens -> (b, n * d) rows of unit L2 norm, in float32 (small temperatures need it)."""
    return F.normalize(tokens_bnd.flatten(1).float(), dim=-1)


def soft_clip_loss(brain_bk: torch.Tensor, image_bk: torch.Tensor, temperature: float) -> torch.Tensor:
    """SoftCLIP on unit rows (b, k): soft labels from image-image similarity, both directions averaged."""
    labels_bb = (image_bk @ image_bk.T / temperature).softmax(dim=-1).detach()  # symmetric logits
    logits_bb = brain_bk @ image_bk.T / temperature  # (brain, image)
    brain_to_image = -(labels_bb * logits_bb.log_softmax(dim=-1)).sum(-1).mean()
    image_to_brain = -(labels_bb * logits_bb.T.log_softmax(dim=-1)).sum(-1).mean()
    return (brain_to_image + image_to_brain) / 2


@dataclass(frozen=True)
class Mixup:
    """Which rows of a batch are mixed with which: row i becomes lam_i * row_i + (1 - lam_i) * row_partner_i."""

    partner_b: torch.Tensor  # int64 (b,): the row each row is mixed with
    lam_b: torch.Tensor  # float32 (b,): the row's own weight; 1 where it is not mixed

    def mix(self, x_b: torch.Tensor) -> torch.Tensor:
        """Mixed copy of `x_b` (b, ...)."""
        lam = self.lam_b.to(x_b.device, x_b.dtype).reshape((-1,) + (1,) * (x_b.ndim - 1))
        return lam * x_b + (1 - lam) * x_b[self.partner_b.to(x_b.device)]

    def rows(self, start: int, stop: int) -> Mixup:
        """The mixup of rows [start, stop), when those rows are only mixed among themselves (one subject)."""
        partner = self.partner_b[start:stop] - start
        if partner.numel() and (partner.min() < 0 or partner.max() >= stop - start):
            raise ValueError(f"rows [{start}, {stop}) are mixed with rows outside that block")
        return Mixup(partner, self.lam_b[start:stop])

    def labels(self) -> torch.Tensor:
        """(b, b) soft labels: lam_i at (i, i), 1 - lam_i at (i, partner_i); rows sum to 1."""
        b = len(self.lam_b)
        labels_bb = torch.diag(self.lam_b.float())
        return labels_bb.index_put((torch.arange(b), self.partner_b), 1 - self.lam_b.float(), accumulate=True)


def sample_mixup(block_sizes: list[int], beta: float, prob: float, rng: np.random.Generator) -> Mixup:
    """Mixup of a batch made of consecutive blocks (one per subject); partners are drawn within each block,
    since different subjects' voxels cannot be mixed. lam ~ Beta(beta, beta) with probability `prob`, else 1."""
    partners, offset = [], 0
    for size in block_sizes:
        partners.append(offset + rng.permutation(size))
        offset += size
    mixed = rng.random(offset) < prob
    lam = np.where(mixed, rng.beta(beta, beta, size=offset), 1.0)
    return Mixup(torch.from_numpy(np.concatenate(partners)).long(), torch.from_numpy(lam).float())


def mixco_loss(brain_bk: torch.Tensor, image_bk: torch.Tensor, temperature: float, mixup: Mixup) -> torch.Tensor:
    """BiMixCo on unit rows (b, k): brain rows come from mixed voxels, image rows are the unmixed targets."""
    labels_bb = mixup.labels().to(brain_bk.device)
    logits_bb = brain_bk @ image_bk.T / temperature
    brain_to_image = -(labels_bb * logits_bb.log_softmax(dim=-1)).sum(-1).mean()
    image_to_brain = -(labels_bb.T * logits_bb.T.log_softmax(dim=-1)).sum(-1).mean()
    return (brain_to_image + image_to_brain) / 2


@dataclass(frozen=True)
class ContrastiveSchedule:
    """Which contrastive loss and temperature each (0-based) epoch uses."""

    epochs: int
    mixup_fraction: float = 0.33  # the official `mixup_pct`
    mixup_temperature: float = 0.006
    soft_temperature_start: float = 0.004
    soft_temperature_end: float = 0.0075

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.mixup_fraction <= 1.0:
            raise ValueError(f"mixup fraction must be in [0, 1], got {self.mixup_fraction}")

    @property
    def mixup_epochs(self) -> int:
        return int(self.mixup_fraction * self.epochs)

    def uses_mixup(self, epoch: int) -> bool:
        return epoch < self.mixup_epochs

    def temperature(self, epoch: int) -> float:
        """BiMixCo's fixed temperature, or SoftCLIP's, cosine-annealed from start (first) to end (last epoch)."""
        if self.uses_mixup(epoch):
            return self.mixup_temperature
        soft_epochs = self.epochs - self.mixup_epochs
        progress = (epoch - self.mixup_epochs) / (soft_epochs - 1) if soft_epochs > 1 else 0.0
        start, end = self.soft_temperature_start, self.soft_temperature_end
        return end + (start - end) / 2 * (1 + math.cos(math.pi * progress))


def low_level_loss(predicted_bcss: torch.Tensor, target_bcss: torch.Tensor) -> torch.Tensor:
    """Mean absolute error against the low-level latent (SD-VAE latent, or pixels in the synthetic world)."""
    return F.l1_loss(predicted_bcss.float(), target_bcss.float())
