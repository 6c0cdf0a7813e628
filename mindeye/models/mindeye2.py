"""MindEye2: subject aligner -> shared backbone -> retrieval / low-level heads, plus the diffusion prior."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from mindeye.models.aligner import SubjectAligner
from mindeye.models.backbone import Backbone, LowLevelHead, retrieval_head
from mindeye.models.config import MindEyeConfig
from mindeye.models.prior import DiffusionPrior


@dataclass
class MindEyeOutput:
    backbone_tokens: torch.Tensor  # (b, clip_tokens, clip_dim): what the prior is conditioned on
    retrieval_tokens: torch.Tensor  # (b, clip_tokens, clip_dim): contrastive target space
    low_level_latent: torch.Tensor | None  # (b, latent_channels, latent_size, latent_size), or None if disabled


class MindEye2(nn.Module):
    """Voxels of one subject -> CLIP-token-shaped brain representations; `prior` turns them into image tokens."""

    def __init__(self, config: MindEyeConfig):
        super().__init__()
        self.config = config
        self.aligner = SubjectAligner(config.voxels_per_subject, config.hidden_dim)
        self.backbone = Backbone(config)
        self.retrieval_head = retrieval_head(config.clip_dim, config.retrieval.depth)
        self.low_level_head = LowLevelHead(config.hidden_dim, config.low_level) if config.low_level.enabled else None
        self.prior = DiffusionPrior(config.clip_tokens, config.clip_dim, config.prior)

    def encode_latent(self, voxels_bv: torch.Tensor, subject: str) -> torch.Tensor:
        """(b, voxels) -> the shared latent (b, hidden_dim) after the residual blocks."""
        return self.backbone.encode(self.aligner(voxels_bv, subject))

    def forward(self, voxels_bv: torch.Tensor, subject: str) -> MindEyeOutput:
        latent_bh, tokens_bnd = self.backbone(self.aligner(voxels_bv, subject))
        low_level = self.low_level_head(latent_bh) if self.low_level_head is not None else None
        return MindEyeOutput(tokens_bnd, self.retrieval_head(tokens_bnd), low_level)

    def add_subject(self, name: str, n_voxels: int) -> None:
        """A new subject's aligner (fresh weights) for fine-tuning; the config follows so checkpoints stay valid."""
        voxels = {**self.config.voxels_per_subject, name: n_voxels}
        config = dataclasses.replace(self.config, voxels_per_subject=voxels)  # validates name and count
        self.aligner.add_subject(name, n_voxels)
        self.config = config
