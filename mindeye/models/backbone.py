"""Shared backbone (residual MLP + token linear) and the two heads that read it.

The official `BrainNetwork` runs its input, a sequence of length 1, through mixer blocks whose
second half normalises over that length-1 axis: a LayerNorm over one element returns its bias,
so each block adds a constant and throws the first half's output away (whose weights then get
no gradient beyond float rounding). Its effective model is aligner -> one linear. Here the blocks are pre-norm residual
MLPs over the feature axis, so they compute something; `residual_blocks=False` removes them to
measure what they add.
"""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from mindeye.models.config import LowLevelConfig, MindEyeConfig


class ResidualBlock(nn.Module):
    """x + Dropout(Linear(GELU(Linear(LayerNorm(x))))) over the feature axis."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_bh: torch.Tensor) -> torch.Tensor:
        return x_bh + self.dropout(self.fc2(nn.functional.gelu(self.fc1(self.norm(x_bh)))))


class Backbone(nn.Module):
    """Aligned brain vector (b, h) -> latent (b, h) -> backbone tokens (b, clip_tokens, clip_dim)."""

    def __init__(self, config: MindEyeConfig):
        super().__init__()
        n_blocks = config.n_blocks if config.residual_blocks else 0
        self.blocks = nn.ModuleList([ResidualBlock(config.hidden_dim, config.dropout) for _ in range(n_blocks)])
        self.to_tokens = nn.Linear(config.hidden_dim, config.clip_tokens * config.clip_dim)
        self.token_shape = (config.clip_tokens, config.clip_dim)

    def encode(self, aligned_bh: torch.Tensor) -> torch.Tensor:
        latent_bh = aligned_bh
        for block in self.blocks:
            latent_bh = block(latent_bh)
        return latent_bh

    def forward(self, aligned_bh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (latent (b, h), tokens (b, clip_tokens, clip_dim))."""
        latent_bh = self.encode(aligned_bh)
        tokens_bnd = self.to_tokens(latent_bh).unflatten(-1, self.token_shape)  # (b, n*d) -> (b, n, d)
        return latent_bh, tokens_bnd


def retrieval_head(dim: int, depth: int) -> nn.Sequential:
    """`depth` x [LayerNorm, GELU, Linear(dim, dim)], applied to each token: (b, n, d) -> (b, n, d)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim)]
    return nn.Sequential(*layers)


class LowLevelHead(nn.Module):
    """Latent (b, h) -> SD-VAE latent (b, latent_channels, latent_size, latent_size) for the blurry image.

    Paper sizes: Linear(h, 64*7*7) -> (b, 64, 7, 7) -> GroupNorm -> VAE-style decoder (a ResNet + attention
    mid block, then ResNet blocks with 2x upsampling: 7 -> 14 -> 28) -> (b, 4, 28, 28). The decoder is
    diffusers' `Decoder`, the one the official head uses, so official weights load unchanged.
    """

    def __init__(self, hidden_dim: int, config: LowLevelConfig):
        super().__init__()
        size = config.feature_size
        self.feature_shape = (config.feature_channels, size, size)
        self.to_features = nn.Linear(hidden_dim, config.feature_channels * size * size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.GroupNorm(1, config.feature_channels)
        self.upsampler = Decoder(
            in_channels=config.feature_channels,
            out_channels=config.latent_channels,
            up_block_types=("UpDecoderBlock2D",) * len(config.decoder_channels),
            block_out_channels=tuple(config.decoder_channels),
            layers_per_block=1,
            norm_num_groups=config.norm_groups,
        )

    def forward(self, latent_bh: torch.Tensor) -> torch.Tensor:
        features_bcss = self.dropout(self.to_features(latent_bh)).unflatten(-1, self.feature_shape)  # (b, c, s, s)
        return self.upsampler(self.norm(features_bcss))  # (b, latent_channels, latent_size, latent_size)
