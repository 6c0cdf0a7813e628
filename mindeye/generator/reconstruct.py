"""Reconstructions from CLIP image tokens: what offline evaluation and the realtime service ask of a generator.

`require_encoder` refuses a generator trained on another CLIP encoder's tokens than the data's (one
message, before any work); `reconstruct` turns tokens (N, L, D) into images as a `GenerationSettings`
says, in batches from one seeded torch generator, each blended with its low-level (blurry) image as
MindEye2's final images are; `refine` is the optional img2img refinement stage after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mindeye.errors import ConfigValueError
from mindeye.generator.pipeline import (GenerationSettings, MindEyeUnCLIPPipeline, UnCLIPOutput, blend_with_low_level,
                                       to_uint8)

TEACHER_STEPS, STUDENT_STEPS = 38, 4  # the configs' sampling.steps (MindEye2: 38 Euler steps) / a distilled student's


class EncoderMismatch(ConfigValueError):
    """A generator was trained on tokens of another CLIP encoder than the one the tokens come from."""


def require_encoder(pipe: MindEyeUnCLIPPipeline, clip_id: str, *, generator: str = "this generator",
                    tokens: str = "the data's tokens") -> None:
    """Raise EncoderMismatch unless `pipe` was trained on the encoder `clip_id` (`mindeye.clip.clip_identity`)."""
    if pipe.config.clip_id != clip_id:
        raise EncoderMismatch(f"{generator} was trained on tokens of CLIP encoder {pipe.config.clip_id!r}, but "
                              f"{tokens} come from {clip_id!r}; use a generator trained on the same encoder "
                              "(mindeye-train-generator world=<the data's world>)")


def default_steps(pipe: MindEyeUnCLIPPipeline) -> int:
    """Sampling steps when none are asked for: 4 for a distilled student, 38 for a teacher."""
    return STUDENT_STEPS if pipe.is_student else TEACHER_STEPS


@torch.no_grad()
def reconstruct(pipe: MindEyeUnCLIPPipeline, image_tokens_nld: np.ndarray | torch.Tensor, *,
                low_level_nhwc: np.ndarray | None = None, settings: GenerationSettings = GenerationSettings(),
                seed: int = 0, output_size: int | None = None, batch_size: int = 32) -> UnCLIPOutput:
    """Images from CLIP tokens (N, L, D), made as `settings` says: `.generated` the generator's, `.images`
    those blended with `low_level_nhwc` ((N, h, w, 3) uint8 or [0, 1] float; also the img2img start when
    settings.img2img_strength < 1), or the generated ones again without low-level images. Both uint8
    (N, S, S, 3), S = `output_size` or the generator's own.

    All noise comes from one torch generator seeded with `seed`, drawn batch after batch, so equal seeds
    and batch sizes give equal images.
    """
    settings.check()
    tokens_nld = torch.as_tensor(image_tokens_nld).float()
    if low_level_nhwc is not None and len(low_level_nhwc) != len(tokens_nld):
        raise ValueError(f"{len(low_level_nhwc)} low-level images for {len(tokens_nld)} token sets")
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images, generated = [], []
    for start in range(0, len(tokens_nld), batch_size):
        low = None if low_level_nhwc is None else _unit_nchw(low_level_nhwc[start:start + batch_size])
        out = pipe(tokens_nld[start:start + batch_size], num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, generator=generator, low_level_images=low,
                   lowlevel_blend=settings.lowlevel_blend if low is not None else 0.0,
                   strength=settings.img2img_strength if low is not None else 1.0, output_size=output_size)
        images.append(out.images)
        generated.append(out.generated)
    return UnCLIPOutput(images=np.concatenate(images), generated=np.concatenate(generated))


@dataclass(frozen=True)
class Refinement:
    """MindEye2's optional last stage: the base model's img2img over a reconstruction. `pipe` re-runs the
    last `settings.img2img_strength` of its schedule from the (blended) reconstruction, conditioned on
    the same tokens; the result is blended with the low-level image again (`settings.lowlevel_blend`).
    MindEye2 refines with SDXL base and a caption; a world has no base model but its full-step teacher."""

    pipe: MindEyeUnCLIPPipeline
    settings: GenerationSettings


@torch.no_grad()
def refine(refinement: Refinement, image_tokens_nld: np.ndarray | torch.Tensor, images_nhwc: np.ndarray, *,
           low_level_nhwc: np.ndarray | None = None, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """Refined images, uint8 (N, S, S, 3) at the size of `images_nhwc`."""
    settings = refinement.settings
    settings.check()
    if settings.img2img_strength >= 1.0:
        raise ValueError("refinement is img2img: its img2img_strength must be < 1 (the part of the schedule re-run)")
    tokens_nld = torch.as_tensor(image_tokens_nld).float()
    generator = torch.Generator(refinement.pipe.device).manual_seed(seed)
    refined = []
    for start in range(0, len(tokens_nld), batch_size):
        batch = slice(start, start + batch_size)
        out = refinement.pipe(tokens_nld[batch], num_inference_steps=settings.steps,
                              guidance_scale=settings.guidance_scale, generator=generator,
                              low_level_images=_unit_nchw(images_nhwc[batch]), strength=settings.img2img_strength,
                              output_size=images_nhwc.shape[1], output_type="pt")
        images = out.generated
        if low_level_nhwc is not None and settings.lowlevel_blend > 0:
            images = blend_with_low_level(images, _unit_nchw(low_level_nhwc[batch]), settings.lowlevel_blend)
        refined.append(to_uint8(images))
    return np.concatenate(refined)


def blend_images(images_nhwc: np.ndarray, low_level_nhwc: np.ndarray, weight: float) -> np.ndarray:
    """Finished uint8 pictures (N, S, S, 3) blended with low-level images at `weight` afterwards, as `reconstruct`
    blends them inside (to one grey level): other weights scored without generating again."""
    return to_uint8(blend_with_low_level(_unit_nchw(images_nhwc), _unit_nchw(low_level_nhwc), weight))


def _unit_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 or [0, 1] float (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images_nhwc)).permute(0, 3, 1, 2)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
