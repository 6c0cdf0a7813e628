"""Per-subject linear aligner ("ridge" in the official code): each brain's voxels -> one shared space."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class SubjectAligner(nn.Module):
    """One `Linear(voxels_s, hidden_dim)` per subject; subjects differ in voxel count, not in output."""

    def __init__(self, voxels_per_subject: Mapping[str, int], hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.linears = nn.ModuleDict({name: nn.Linear(n, hidden_dim) for name, n in voxels_per_subject.items()})

    @property
    def voxels_per_subject(self) -> dict[str, int]:
        return {name: linear.in_features for name, linear in self.linears.items()}

    def forward(self, voxels_bv: torch.Tensor, subject: str) -> torch.Tensor:
        """(batch, voxels of `subject`) -> (batch, hidden_dim)."""
        if subject not in self.linears:
            raise KeyError(f"unknown subject {subject!r}; this model knows {list(self.linears)}")
        linear = self.linears[subject]
        if voxels_bv.ndim != 2 or voxels_bv.shape[1] != linear.in_features:
            raise ValueError(f"subject {subject!r} has {linear.in_features} voxels: expected input of shape "
                             f"(batch, {linear.in_features}), got {tuple(voxels_bv.shape)}")
        return linear(voxels_bv)

    def add_subject(self, name: str, n_voxels: int) -> nn.Linear:
        """Add a freshly initialised linear for a new subject (fine-tuning), on the existing device and dtype."""
        if name in self.linears:
            raise ValueError(f"subject {name!r} already has an aligner ({self.linears[name].in_features} voxels)")
        reference = next(iter(self.linears.values())).weight
        self.linears[name] = nn.Linear(n_voxels, self.hidden_dim, device=reference.device, dtype=reference.dtype)
        return self.linears[name]
