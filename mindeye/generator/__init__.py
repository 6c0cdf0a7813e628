"""The unCLIP image generator: CLIP image tokens -> images (diffusers UNet, schedulers, optional VAE).

`build_pipeline` makes one from a config (`configs/generator/<name>.yaml`: paper, small, tiny),
`load_pipeline` reads a saved folder (diffusers' format, local only), `convert` imports MindEye2's
published unCLIP checkpoint, `reconstruct` makes (blended) reconstructions from tokens in batches.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mindeye.config import CONFIG_DIR
from mindeye.errors import FormatError, MissingFileError
from mindeye.generator.pipeline import (GenerationSettings, MindEyeUnCLIPPipeline, UnCLIPOutput, blend_with_low_level,
                                       to_uint8)
from mindeye.generator.reconstruct import (EncoderMismatch, Refinement, blend_images, default_steps, reconstruct,
                                          refine, require_encoder)
from mindeye.generator.schedulers import SAMPLERS, make_scheduler, sampler_name
from mindeye.generator.token_map import TokenMap  # imported here too: from_pretrained finds the class in sys.modules
from mindeye.generator.unet import build_unet, count_parameters, micro_conditioning_ids

GENERATOR_CONFIG_DIR = CONFIG_DIR / "generator"

__all__ = ["SAMPLERS", "EncoderMismatch", "GenerationSettings", "MindEyeUnCLIPPipeline", "Refinement", "TokenMap",
           "UnCLIPOutput", "blend_images", "blend_with_low_level", "build_pipeline", "build_unet",
           "count_parameters", "default_steps", "generator_config", "load_pipeline", "make_scheduler",
           "micro_conditioning_ids", "reconstruct", "refine", "require_encoder", "sampler_name", "to_uint8"]


def generator_config(config: str | Path | Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """A generator config as a plain dict: a name in configs/generator/, a .yaml path, or a mapping."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.suffix not in (".yaml", ".yml"):
        path = GENERATOR_CONFIG_DIR / f"{config}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in GENERATOR_CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no generator config {str(config)!r} (known: {known}, or a .yaml path)")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def build_pipeline(config, *, clip_id: str, clip_tokens: int, sampler: str | None = None,
                   device: str | torch.device = "cpu") -> MindEyeUnCLIPPipeline:
    """A freshly initialised generator; `device="meta"` builds shapes only (the paper size's 2.6 B)."""
    cfg = generator_config(config)
    unet = build_unet(cfg["unet"], device=device)
    vae = None
    if cfg.get("vae"):
        from diffusers import AutoencoderKL

        vae_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["vae"].items()}
        with torch.device(device):
            vae = AutoencoderKL(**vae_cfg)
    token_map = None
    if cfg.get("token_map"):
        with torch.device(device):
            token_map = TokenMap(clip_tokens, unet.config.cross_attention_dim, unet.config.sample_size,
                                 **cfg["token_map"])
    micro = cfg.get("micro_conditioning", {})
    scheduler = make_scheduler(sampler or cfg["sampling"]["sampler"], cfg["schedule"])
    return MindEyeUnCLIPPipeline(unet, scheduler, vae, token_map, clip_id=clip_id, clip_tokens=clip_tokens,
                                 original_size=tuple(micro.get("original_size", (768, 768))),
                                 crop_coords=tuple(micro.get("crop_coords", (0, 0))))


def load_pipeline(path: str | Path, *, sampler: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, clip_id: str | None = None) -> MindEyeUnCLIPPipeline:
    """A saved generator folder (save_pretrained), optionally with another sampler; never downloads.
    With `clip_id` (`mindeye.clip.clip_identity` of the tokens' encoder), a generator trained on another
    encoder is refused (EncoderMismatch) before its weights are moved anywhere."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise MissingFileError(path / "model_index.json", "generator folder (diffusers format)",
                               hint="train one with mindeye-train-generator, distil one with mindeye-distill, "
                                    "or convert MindEye2's unCLIP with python -m mindeye.generator.convert")
    try:
        pipe = MindEyeUnCLIPPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise FormatError(path, "generator folder", "a MindEyeUnCLIPPipeline saved with save_pretrained",
                          f"{type(error).__name__}: {error}") from error
    if clip_id is not None:
        require_encoder(pipe, clip_id, generator=f"the generator in {path}")
    if sampler is not None:
        pipe.scheduler = make_scheduler(sampler, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
