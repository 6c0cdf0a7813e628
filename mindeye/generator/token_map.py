"""`TokenMap`: CLIP patch tokens (B, L, D) -> a rough picture (B, C, S, S) that the UNet gets as extra input channels.

Why: cross-attention alone does not tell a UNet where a token's content belongs (its queries carry no
position), so a small generator trained on tens of thousands of scenes learns colours and textures
from the tokens but not their layout. Yet each patch token of the world's ViT holds its own patch almost
linearly: one linear read-out shared by all tokens, painted into each token's patch of the grid,
identifies the world's test images nearly perfectly (docs/generator.md has the figures). So the
world's generators get that read-out, trained with them (`mindeye-train-generator`, an auxiliary MSE
to the clean sample), as a spatial condition concatenated to the noisy sample, as InstructPix2Pix
conditions on an image. The read-out is a transposed convolution with kernel = stride = the patch side (the inverse of a ViT's
patch embedding); tokens are in the ViT's row-major grid order. Cross-attention on the tokens stays
as it is. MindEye2's own unCLIP (the `paper` config, the converter) has no token map.
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class TokenMap(ModelMixin, ConfigMixin):
    """A grid x grid of token_dim-wide tokens -> out_channels x sample_size x sample_size (sample_size = grid x patch)."""

    @register_to_config
    def __init__(self, n_tokens: int, token_dim: int, sample_size: int, out_channels: int = 3):
        super().__init__()
        grid = math.isqrt(n_tokens)
        if grid * grid != n_tokens or sample_size % grid:
            raise ValueError(f"a token map needs a square token grid that divides the sample size: {n_tokens} tokens, "
                             f"sample size {sample_size}")
        self.grid = grid
        patch = sample_size // grid
        self.unpatchify = torch.nn.ConvTranspose2d(token_dim, out_channels, kernel_size=patch, stride=patch)

    def forward(self, tokens_bld: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, dim = tokens_bld.shape
        if n_tokens != self.grid ** 2:
            raise ValueError(f"this token map takes {self.grid ** 2} tokens, got {n_tokens}")
        grid_bdhw = tokens_bld.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
        return self.unpatchify(grid_bdhw.to(self.unpatchify.weight.dtype))
