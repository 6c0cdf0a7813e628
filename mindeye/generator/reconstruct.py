"""Reconstructions from CLIP image tokens: what offline evaluation and the realtime service ask of a generator.

`require_encoder` refuses a generator trained on another CLIP encoder's tokens than the data's (one
message, before any work); `reconstruct` turns tokens (N, L, D) into images as a `GenerationSettings`
says, in batches from one seeded torch generator, each blended with its low-level (blurry) image as
MindEye2's final images are.
"""
from __future__ import annotations

import numpy as np
import torch

from mindeye.generator.pipeline import GenerationSettings, MindEyeUnCLIPPipeline, UnCLIPOutput

TEACHER_STEPS, STUDENT_STEPS = 38, 4  # the configs' sampling.steps (MindEye2: 38 Euler steps) / a distilled student's


class EncoderMismatch(ValueError):
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
        low = None
        if low_level_nhwc is not None:
            low = torch.as_tensor(np.asarray(low_level_nhwc[start:start + batch_size])).permute(0, 3, 1, 2)
            low = low.float() / 255.0 if low.dtype == torch.uint8 else low.float()
        out = pipe(tokens_nld[start:start + batch_size], num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, generator=generator, low_level_images=low,
                   lowlevel_blend=settings.lowlevel_blend if low is not None else 0.0,
                   strength=settings.img2img_strength if low is not None else 1.0, output_size=output_size)
        images.append(out.images)
        generated.append(out.generated)
    return UnCLIPOutput(images=np.concatenate(images), generated=np.concatenate(generated))
