"""`MindEyeUnCLIPPipeline`: CLIP image tokens (B, L, D) -> images, the diffusers way.

Components: `unet` (a `UNet2DConditionModel`, `mindeye.generator.unet`), `scheduler` (any diffusers
sampler, `mindeye.generator.schedulers`), an optional `vae` (`AutoencoderKL`) and an optional
`token_map` (`mindeye.generator.token_map`: the tokens read out into a rough picture that the UNet
gets as extra input channels; the world's generators have one, MindEye2's unCLIP does not). Without
a VAE the UNet works in pixel space ([-1, 1], 3 channels), which is what the synthetic world's small
generators do; with one it works on the VAE's scaled latents, as SDXL does. The folder format is diffusers'
own (`save_pretrained` / `from_pretrained`, local folders only), and the pipeline config records
which CLIP encoder the tokens must come from (`clip_id`), so a generator refuses another encoder's.

Sampling as MindEye2 samples its unCLIP:
- classifier-free guidance whose unconditional input is random tokens, torch.randn of the tokens'
  shape (not a learned null): eps = eps_u + g (eps_c - eps_u), skipped when g <= 1;
- a few-step student distilled with guidance folded in (a UNet with `time_cond_proj_dim`) takes the
  guidance scale as an embedding and runs one UNet call a step;
- micro-conditioning: original size and crop coordinates (default 768 x 768 at (0, 0), the official);
- optionally the low-level (blurry) image as the img2img start (`strength` < 1), and a final blend
  with it (`lowlevel_blend`, 0.25 in MindEye2's final images).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from mindeye.generator.unet import micro_conditioning_ids


@dataclass
class UnCLIPOutput(BaseOutput):
    """`images`: final images, blended with the low-level image when one was given and lowlevel_blend > 0;
    `generated`: the generator's images before blending. uint8 (B, H, W, 3) arrays for output_type="np",
    float (B, 3, H, W) tensors in [0, 1] for "pt", and for "latent" both are what the UNet denoised
    (B, C, H, W), undecoded and unblended."""

    images: np.ndarray | torch.Tensor
    generated: np.ndarray | torch.Tensor


@dataclass(frozen=True)
class GenerationSettings:
    """How a reconstruction is made from its tokens: sampler steps, guidance scale (folded into a student),
    the weight of the low-level image in the final blend, and the img2img start (1.0: from pure noise)."""

    steps: int = 4
    guidance_scale: float = 3.0
    lowlevel_blend: float = 0.25
    img2img_strength: float = 1.0

    def check(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"generation steps must be an integer >= 1, got {self.steps!r}")
        if not 0.0 <= self.lowlevel_blend <= 1.0 or not 0.0 < self.img2img_strength <= 1.0:
            raise ValueError(f"lowlevel_blend must be in [0, 1] and img2img_strength in (0, 1], got "
                             f"{self.lowlevel_blend} and {self.img2img_strength}")


def guidance_embedding(scale_b: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of guidance scales w, the student's `timestep_cond` (as LCM: of (w - 1) * 1000)."""
    w_b = (scale_b.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w_b.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles_bh = w_b[:, None] * freqs[None, :]
    embedding = torch.cat((angles_bh.sin(), angles_bh.cos()), dim=1)
    return F.pad(embedding, (0, dim % 2))


class MindEyeUnCLIPPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "token_map->unet->vae"
    _optional_components = ["vae", "token_map"]

    def __init__(self, unet, scheduler, vae=None, token_map=None, clip_id: str = "unknown",
                 clip_tokens: int | None = None, original_size: tuple[int, int] | list[int] = (768, 768),
                 crop_coords: tuple[int, int] | list[int] = (0, 0)):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, token_map=token_map)
        self.register_to_config(clip_id=clip_id, clip_tokens=clip_tokens, original_size=list(original_size),
                                crop_coords=list(crop_coords))
        sample = vae.config.latent_channels if vae is not None else 3
        extra = token_map.config.out_channels if token_map is not None else 0
        if unet.config.out_channels != sample or unet.config.in_channels != sample + extra:
            raise ValueError(f"the UNet takes {unet.config.in_channels} channels and gives {unet.config.out_channels}; "
                             f"this pipeline denoises {sample} ({'VAE latents' if vae is not None else 'pixels'}) "
                             f"and adds {extra} token-map channels: it needs {sample + extra} in, {sample} out")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def token_shape(self) -> tuple[int | None, int]:
        return self.config.clip_tokens, self.unet.config.cross_attention_dim

    @property
    def is_student(self) -> bool:
        """Distilled with guidance folded in: takes the guidance scale as an embedding, one UNet call a step."""
        return self.unet.config.time_cond_proj_dim is not None

    @property
    def sample_channels(self) -> int:
        """Channels of what the UNet denoises (its input adds the token map's)."""
        return self.unet.config.out_channels

    def denoiser_input(self, x_bchw: torch.Tensor, tokens_bld: torch.Tensor) -> torch.Tensor:
        """The UNet's input for samples x and their tokens: x, then the tokens' map when there is a token map."""
        if self.token_map is None:
            return x_bchw
        return torch.cat((x_bchw, self.token_map(tokens_bld).to(x_bchw.dtype)), dim=1)

    def check_tokens(self, image_tokens_bld: torch.Tensor, clip_id: str | None = None) -> None:
        n_tokens, dim = self.token_shape
        if image_tokens_bld.ndim != 3 or image_tokens_bld.shape[-1] != dim or (
                n_tokens is not None and image_tokens_bld.shape[1] != n_tokens):
            raise ValueError(f"this generator takes CLIP tokens (batch, {n_tokens}, {dim}), got "
                             f"{tuple(image_tokens_bld.shape)}")
        if clip_id is not None and clip_id != self.config.clip_id:
            raise ValueError(f"these tokens come from CLIP encoder {clip_id!r}, this generator was trained on "
                             f"{self.config.clip_id!r}'s: use a generator trained on the same encoder")
        if not torch.isfinite(image_tokens_bld).all():
            raise ValueError("the CLIP tokens hold NaN/inf values")

    def encode_images(self, images_b3hw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> what the UNet denoises (pixels in [-1, 1], or scaled VAE latents)."""
        x = F.interpolate(images_b3hw.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          antialias=True, align_corners=False) * 2 - 1
        x = x.to(self.unet.device, self.unet.dtype)
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample(generator) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """What the UNet denoised -> images (B, 3, H, W) in [0, 1]."""
        if self.vae is not None:
            latents = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, image_tokens: torch.Tensor, num_inference_steps: int = 38, guidance_scale: float = 5.0,
                 generator: torch.Generator | None = None, low_level_images: torch.Tensor | None = None,
                 strength: float = 1.0, lowlevel_blend: float = 0.0, output_size: int | None = None,
                 output_type: str = "np", clip_id: str | None = None, latents: torch.Tensor | None = None,
                 return_dict: bool = True):
        """Images from CLIP image tokens (B, L, D).

        `low_level_images` (B, 3, h, w) in [0, 1]: the blurry images, used as the img2img start when
        `strength` < 1 (only the last `strength` of the schedule runs) and blended into the final images
        with weight `lowlevel_blend`. `output_size` resizes the outputs (pixels); `clip_id`, when given,
        must be the encoder this generator was trained on. `latents`: the starting noise (B, C, H, W) in
        place of a draw from `generator`; output_type="latent" returns what the UNet denoised, undecoded."""
        self.check_tokens(image_tokens, clip_id)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if not 0.0 <= lowlevel_blend <= 1.0:
            raise ValueError(f"lowlevel_blend must be in [0, 1], got {lowlevel_blend}")
        if low_level_images is None and (strength < 1.0 or lowlevel_blend > 0.0):
            raise ValueError("strength < 1 and lowlevel_blend > 0 need low_level_images")
        device, dtype = self.unet.device, self.unet.dtype
        batch = image_tokens.shape[0]
        tokens_bld = image_tokens.to(device, dtype)
        use_cfg = guidance_scale > 1.0 and not self.is_student
        if use_cfg:  # MindEye2's unconditional input: random tokens
            random_bld = torch.randn(tokens_bld.shape, generator=generator, device=device, dtype=dtype)
            tokens_bld = torch.cat((random_bld, tokens_bld))
        added = micro_conditioning_ids(len(tokens_bld), tuple(self.config.original_size),
                                       tuple(self.config.crop_coords), device=device, dtype=dtype)
        timestep_cond = None
        if self.is_student:
            timestep_cond = guidance_embedding(torch.full((batch,), guidance_scale, device=device),
                                               self.unet.config.time_cond_proj_dim).to(dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (batch, self.sample_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must be {shape}, got {tuple(latents.shape)}")
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype) if latents is None \
            else latents.to(device, dtype)
        if strength < 1.0:
            skip = min(int(round(num_inference_steps * (1 - strength))), num_inference_steps - 1)
            timesteps = timesteps[skip * self.scheduler.order:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(skip * self.scheduler.order)
            start = self.encode_images(low_level_images, generator)
            latents = self.scheduler.add_noise(start, noise, timesteps[:1].repeat(batch))
        else:
            latents = noise * self.scheduler.init_noise_sigma

        for t in self.progress_bar(timesteps):
            model_in = torch.cat((latents, latents)) if use_cfg else latents
            model_in = self.denoiser_input(self.scheduler.scale_model_input(model_in, t), tokens_bld)
            predicted = self.unet(model_in, t, encoder_hidden_states=tokens_bld, added_cond_kwargs=added,
                                  timestep_cond=timestep_cond).sample
            if use_cfg:
                uncond, cond = predicted.chunk(2)
                predicted = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(predicted, t, latents, generator=generator).prev_sample

        if output_type == "latent":
            self.maybe_free_model_hooks()
            return UnCLIPOutput(images=latents, generated=latents) if return_dict else (latents, latents)
        generated_b3hw = self.decode_latents(latents)
        if output_size is not None and output_size != generated_b3hw.shape[-1]:
            generated_b3hw = F.interpolate(generated_b3hw, size=(output_size, output_size), mode="bilinear",
                                           antialias=True, align_corners=False).clamp(0, 1)
        images_b3hw = generated_b3hw
        if lowlevel_blend > 0.0:
            images_b3hw = blend_with_low_level(generated_b3hw, low_level_images, lowlevel_blend)
        images, generated = (to_uint8(images_b3hw), to_uint8(generated_b3hw)) if output_type == "np" else (
            images_b3hw, generated_b3hw)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, generated
        return UnCLIPOutput(images=images, generated=generated)


def blend_with_low_level(generated_b3hw: torch.Tensor, low_level_b3hw: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) x generated + weight x low-level (resized to the generated images), both in [0, 1]."""
    low = F.interpolate(low_level_b3hw.float().to(generated_b3hw.device), size=generated_b3hw.shape[-2:],
                        mode="bilinear", antialias=True, align_corners=False)
    return ((1 - weight) * generated_b3hw + weight * low).clamp(0, 1)


def to_uint8(images_b3hw: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    return (images_b3hw.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
