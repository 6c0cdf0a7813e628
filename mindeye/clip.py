"""The frozen CLIP image encoder whose patch tokens MindEye2 learns to predict.

The paper's targets are OpenCLIP ViT-bigG/14 (laion2b_s39b_b160k) patch tokens after the
final LayerNorm: 256 x 1664 for a 224 px image, no CLS token. `build_clip_embedder` is the
one factory: a named open_clip model with its pretrained weights (a hub tag resolved from the
local cache, or a local file), or a small ViT from a config with seeded random weights
(the synthetic world's default, chosen explicitly with `weights: random`). Missing weights
are an error, never a silent fall back to random ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from tqdm.auto import tqdm

from mindeye.errors import MissingFileError


@dataclass(frozen=True)
class ClipSpec:
    """`weights`: 'random' (needs `vision`), an open_clip pretrained tag, or a local weights file."""

    name: str
    weights: str
    seed: int = 0
    vision: dict | None = None  # image_size, patch_size, width, layers, heads, mlp_ratio

    @classmethod
    def from_config(cls, cfg) -> "ClipSpec":
        vision = dict(cfg["vision"]) if cfg.get("vision") else None
        return cls(name=str(cfg["name"]), weights=str(cfg["weights"]), seed=int(cfg.get("seed", 0)), vision=vision)


class ClipImageEmbedder(torch.nn.Module):
    """uint8 or [0, 1] images (B, 3, H, W) -> patch tokens (B, n_tokens, width), frozen."""

    def __init__(self, visual: VisionTransformer, spec: ClipSpec):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"CLIP '{spec.name}' has a {type(visual).__name__} image tower; MindEye2's targets "
                             "are a ViT's patch tokens")
        self.visual = visual.eval().requires_grad_(False)
        self.visual.output_tokens = True
        self.spec = spec
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        grid = visual.grid_size
        self.n_tokens = int(grid[0] * grid[1])
        self.dim = int(visual.transformer.width)
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "ClipImageEmbedder":
        return super().train(False)  # frozen: stays in inference mode whatever a training loop asks

    @torch.no_grad()
    def forward(self, images_bchw: torch.Tensor) -> torch.Tensor:
        x = images_bchw.float() / 255.0 if images_bchw.dtype == torch.uint8 else images_bchw.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        _, tokens_bnd = self.visual((x - self.mean) / self.std)
        return tokens_bnd

    @torch.no_grad()
    def embed_array(self, images_nhwc: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float16 (N, n_tokens, width), in batches."""
        out = np.empty((len(images_nhwc), self.n_tokens, self.dim), dtype=np.float16)
        starts = range(0, len(images_nhwc), batch_size)
        for start in tqdm(starts, desc=f"CLIP {self.spec.name}", disable=not progress):
            batch = torch.from_numpy(images_nhwc[start:start + batch_size]).permute(0, 3, 1, 2)
            out[start:start + batch_size] = self(batch.to(self.mean.device)).cpu().numpy()
        return out


def build_clip_embedder(cfg, device: str = "cpu") -> ClipImageEmbedder:
    spec = cfg if isinstance(cfg, ClipSpec) else ClipSpec.from_config(cfg)
    if spec.weights == "random":
        if spec.vision is None:
            raise ValueError(f"CLIP '{spec.name}': weights: random needs a `vision` config (a small ViT)")
        torch.manual_seed(spec.seed)  # the frozen random encoder is part of the world's ground truth
        v = spec.vision
        visual = VisionTransformer(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                                   layers=v["layers"], heads=v["heads"], mlp_ratio=v.get("mlp_ratio", 4.0),
                                   output_dim=v.get("output_dim", v["width"]), output_tokens=True)
    else:
        visual = _load_pretrained(spec).visual
    return ClipImageEmbedder(visual, spec).to(device)


def _load_pretrained(spec: ClipSpec) -> torch.nn.Module:
    if spec.name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model '{spec.name}'")
    weights_file = _resolve_weights(spec)
    return open_clip.create_model(spec.name, pretrained=str(weights_file))


def _resolve_weights(spec: ClipSpec) -> Path:
    """A local weights file for `spec.weights` (a path, or a tag found in the Hugging Face cache).

    Checked before the model is built: bigG alone is ~10 GB in fp32.
    """
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if spec.weights not in tags:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise MissingFileError(path, f"{spec.name} weights file",
                                   hint=f"`weights` is neither a file nor one of the tags {tags}")
        return path
    repo_id = open_clip.get_pretrained_cfg(spec.name, spec.weights)["hf_hub"].strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    raise MissingFileError(
        Path(huggingface_hub.constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")),
        f"{spec.name} pretrained weights '{spec.weights}' (Hugging Face repo {repo_id})",
        hint="download them on a connected machine with `huggingface-cli download "
             f"{repo_id} open_clip_pytorch_model.bin`, or set `weights` to a local file")


def clip_identity(cfg) -> str:
    """A short name for one frozen encoder: `<name>:<weights>:<sha256 of its spec>`. A generator records
    the identity of the encoder whose tokens it was trained on and refuses tokens from any other."""
    spec = cfg if isinstance(cfg, ClipSpec) else ClipSpec.from_config(cfg)
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str).encode()).hexdigest()
    return f"{spec.name}:{Path(spec.weights).name}:{digest[:12]}"
