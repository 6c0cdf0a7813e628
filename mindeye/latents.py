"""Low-level targets: what the blurry-image head predicts, and how its prediction becomes pixels.

The paper's head predicts the Stable Diffusion VAE latent of the 224 px image (4 x 28 x 28,
scaled by 0.18215) and decodes it with the same VAE. `build_latent_codec` is the one factory:
- `sd_vae`: a diffusers `AutoencoderKL` from a local folder or the local Hugging Face cache
  (never downloaded); missing weights are an error.
- `pixels`: the image itself, area-downsampled to the latent grid (3 x S x S in [-1, 1]),
  decoded by bilinear upsampling. The synthetic world uses it: with no trained VAE here, a
  random one would make the low-level target meaningless, while pixels are the honest analogue.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mindeye.errors import MissingFileError


class PixelCodec:
    """uint8 (N, H, W, 3) <-> (N, 3, S, S) in [-1, 1]."""

    def __init__(self, latent_size: int):
        self.latent_size = latent_size
        self.channels = 3

    def encode(self, images_nhwc: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return F.interpolate(x, size=(self.latent_size, self.latent_size), mode="area").numpy()

    def decode(self, latents_ncss: torch.Tensor, image_size: int) -> torch.Tensor:
        """-> (N, 3, image_size, image_size) in [0, 1]."""
        x = F.interpolate(latents_ncss.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
        return ((x + 1.0) / 2.0).clamp(0, 1)


class VAECodec:
    """The Stable Diffusion VAE: 224 px image -> (4, 28, 28) latent x scaling factor, and back."""

    def __init__(self, vae, image_size: int = 224):
        self.vae = vae.eval().requires_grad_(False)
        self.image_size = image_size
        self.channels = vae.config.latent_channels
        self.latent_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale = vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, images_nhwc: np.ndarray, batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(images_nhwc), batch_size):
            x = torch.from_numpy(images_nhwc[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
            out.append((self.vae.encode(x).latent_dist.mode() * self.scale).numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def decode(self, latents_ncss: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        x = self.vae.decode(latents_ncss.float() / self.scale).sample
        if image_size is not None and image_size != x.shape[-1]:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
        return ((x + 1.0) / 2.0).clamp(0, 1)


def build_latent_codec(cfg):
    kind = cfg["kind"]
    if kind == "pixels":
        return PixelCodec(int(cfg["latent_size"]))
    if kind == "sd_vae":
        from diffusers import AutoencoderKL  # only this codec needs diffusers at import

        source = str(cfg["weights"])
        local = Path(source).expanduser()
        try:
            if local.is_dir():
                vae = AutoencoderKL.from_pretrained(local, subfolder=cfg.get("subfolder"))
            else:
                vae = AutoencoderKL.from_pretrained(source, subfolder=cfg.get("subfolder"), local_files_only=True)
        except (OSError, EnvironmentError) as err:
            raise MissingFileError(source, "Stable Diffusion VAE weights (diffusers AutoencoderKL)",
                                   hint="give a local folder with config.json and the weights, or a Hugging Face "
                                        f"repo id already in the local cache ({err.__class__.__name__})") from err
        return VAECodec(vae, image_size=int(cfg.get("image_size", 224)))
    raise ValueError(f"unknown low-level codec kind '{kind}' (known: pixels, sd_vae)")
