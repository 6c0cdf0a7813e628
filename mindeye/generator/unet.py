"""The unCLIP generator's denoiser: a diffusers `UNet2DConditionModel` conditioned on CLIP image tokens.

MindEye2's unCLIP is SDXL base whose cross-attention reads the 256 x 1664 ViT-bigG/14 image tokens
instead of text, and whose added ("vector") conditioning is the micro-conditioning alone: original
size and crop coordinates, each number Fourier-embedded to 256 features, 4 x 256 = 1024 (SDXL adds a
pooled text embedding and a target size; the unCLIP has neither). diffusers' `text_time` addition
embedding computes exactly that when its pooled-text input is empty, so the UNet is diffusers' own
and the official weights map onto it key for key (`mindeye.generator.convert`).

`build_unet(cfg)` takes a UNet config mapping (`configs/generator/*.yaml`, key `unet`); the
micro-conditioning values come from `micro_conditioning_ids`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf

MICRO_CONDITIONS = 4  # original height, original width, crop top, crop left
NO_POOLED_TEXT = 0  # width of the pooled-text input of diffusers' text_time embedding: none


def build_unet(cfg: Mapping[str, Any] | DictConfig, *, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """A freshly initialised UNet from a config mapping; `device="meta"` builds shapes only."""
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    time_dim = config.get("addition_time_embed_dim")
    expected = MICRO_CONDITIONS * time_dim if time_dim else None
    added_width = config.get("projection_class_embeddings_input_dim")
    if config.get("addition_embed_type") != "text_time" or added_width != expected:
        raise ValueError("the unCLIP UNet's added conditioning is the micro-conditioning only: it needs "
                         "addition_embed_type: text_time and projection_class_embeddings_input_dim = "
                         f"{MICRO_CONDITIONS} x addition_time_embed_dim, got {config.get('addition_embed_type')!r} "
                         f"and {config.get('projection_class_embeddings_input_dim')!r}")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                "transformer_layers_per_block"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    with torch.device(device):
        return UNet2DConditionModel(**config)


def micro_conditioning_ids(batch: int, original_size: tuple[int, int], crop_coords: tuple[int, int],
                           *, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """`added_cond_kwargs` for the UNet: time_ids (batch, 4) = original (h, w) + crop (top, left), no pooled text."""
    ids = torch.tensor([*original_size, *crop_coords], device=device, dtype=dtype)
    return {"text_embeds": torch.zeros(batch, NO_POOLED_TEXT, device=device, dtype=dtype),
            "time_ids": ids.expand(batch, MICRO_CONDITIONS)}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
