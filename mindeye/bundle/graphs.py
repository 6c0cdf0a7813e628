"""The bundle's graphs: what each one computes (as a torch module), its inputs and outputs, and runners.

Four kinds of graph, each a plain function of tensors so that every backend runs the same thing:
- `heads.<subject>`: z-scored voxels (B, V) -> backbone tokens, retrieval tokens (B, L, D) and, when the
  model has one, the low-level head's latent (B, C, S, S): aligner + backbone + heads in one call;
- `prior_denoiser`: noisy image tokens (B, L, D), timestep (B,) int64, brain tokens -> x_start (B, L, D),
  one call per step of the runtime's sampler (`mindeye.bundle.sampling`);
- `generator_unet`: the student UNet, one call per generator step: sample (B, C_in, H, W) (the token
  map's channels already concatenated), timestep (B,), CLIP tokens, micro-conditioning ids (B, 4),
  guidance embedding (B, G) (folded-in guidance; a teacher's graph has none) -> prediction (B, C, H, W);
- `generator_decoder`: the generator's VAE decoder, latents (B, 4, h, w) -> pixels (B, 3, 8h, 8w) in
  [-1, 1]; a pixel-space generator (the world's) has none.

A runner (`GraphSet`) maps a graph's name and input tensors to its output tensors. `TorchGraphs` runs
the modules eagerly or through torch.compile; the ONNX Runtime and TensorRT runners live beside it
(`mindeye.bundle.onnxruntime`, `mindeye.bundle.tensorrt`) and load the exported files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from mindeye.bundle.manifest import (BATCH, GENERATOR_DECODER, GENERATOR_UNET, PRIOR_DENOISER, heads_graph)
from mindeye.models import MindEye2
from mindeye.models.prior import DiffusionPrior


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, with BATCH ("batch") first
    dtype: str  # numpy's name: float32, int64

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, spec: dict) -> TensorSpec:
        return cls(spec["name"], tuple(spec["shape"]), spec["dtype"])

    def example(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random input of this spec with `batch` rows (timesteps: integers in [0, 1000))."""
        shape = tuple(batch if size == BATCH else size for size in self.shape)
        if self.dtype == "int64":
            return torch.randint(0, 100, shape, generator=generator)
        if self.name == "timestep":
            return torch.randint(0, 1000, shape, generator=generator).float()
        return torch.randn(shape, generator=generator)


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, graph: dict) -> GraphSpec:
        return cls(tuple(map(TensorSpec.from_json, graph["inputs"])),
                   tuple(map(TensorSpec.from_json, graph["outputs"])))


class HeadsGraph(nn.Module):
    """One subject's aligner + backbone + retrieval head (+ low-level head)."""

    def __init__(self, model: MindEye2, subject: str):
        super().__init__()
        self.model, self.subject = model, subject

    def forward(self, voxels_bv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(voxels_bv, self.subject)
        if out.low_level_latent is None:
            return out.backbone_tokens, out.retrieval_tokens
        return out.backbone_tokens, out.retrieval_tokens, out.low_level_latent

    def spec(self) -> GraphSpec:
        config = self.model.config
        tokens = (BATCH, config.clip_tokens, config.clip_dim)
        outputs = [TensorSpec("backbone_tokens", tokens, "float32"), TensorSpec("retrieval_tokens", tokens, "float32")]
        if self.model.low_level_head is not None:
            low = config.low_level
            outputs.append(TensorSpec("low_level_latent", (BATCH, low.latent_channels, low.latent_size,
                                                           low.latent_size), "float32"))
        n_voxels = self.model.aligner.voxels_per_subject[self.subject]
        return GraphSpec((TensorSpec("voxels", (BATCH, n_voxels), "float32"),), tuple(outputs))


class PriorDenoiserGraph(nn.Module):
    """The diffusion prior's denoiser, conditional (guidance: the runtime calls it again on the null brain tokens)."""

    def __init__(self, prior: DiffusionPrior):
        super().__init__()
        self.prior = prior

    def forward(self, noisy_tokens_bld: torch.Tensor, timestep_b: torch.Tensor, brain_tokens_bld: torch.Tensor
                ) -> tuple[torch.Tensor]:
        return (self.prior(noisy_tokens_bld, timestep_b, brain_tokens_bld),)

    def spec(self) -> GraphSpec:
        tokens = (BATCH, self.prior.n_tokens, self.prior.dim)
        return GraphSpec((TensorSpec("noisy_tokens", tokens, "float32"), TensorSpec("timestep", (BATCH,), "int64"),
                          TensorSpec("brain_tokens", tokens, "float32")), (TensorSpec("x_start", tokens, "float32"),))


class UNetGraph(nn.Module):
    """The generator's UNet with its micro-conditioning; the pooled-text input it does not use is made inside."""

    def __init__(self, unet: nn.Module, clip_tokens: int):
        super().__init__()
        self.unet, self.clip_tokens = unet, clip_tokens

    def forward(self, sample_bchw: torch.Tensor, timestep_b: torch.Tensor, tokens_bld: torch.Tensor,
                time_ids_b4: torch.Tensor, guidance_bg: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        added = {"text_embeds": sample_bchw.new_zeros(sample_bchw.shape[0], 0), "time_ids": time_ids_b4}
        return (self.unet(sample_bchw, timestep_b, encoder_hidden_states=tokens_bld, timestep_cond=guidance_bg,
                          added_cond_kwargs=added, return_dict=False)[0],)

    def spec(self) -> GraphSpec:
        config = self.unet.config
        side = config.sample_size
        inputs = [TensorSpec("sample", (BATCH, config.in_channels, side, side), "float32"),
                  TensorSpec("timestep", (BATCH,), "float32"),
                  TensorSpec("tokens", (BATCH, self.clip_tokens, config.cross_attention_dim), "float32"),
                  TensorSpec("time_ids", (BATCH, 4), "float32")]
        if config.time_cond_proj_dim is not None:
            inputs.append(TensorSpec("guidance_embedding", (BATCH, config.time_cond_proj_dim), "float32"))
        return GraphSpec(tuple(inputs), (TensorSpec("prediction", (BATCH, config.out_channels, side, side),
                                                    "float32"),))


class DecoderGraph(nn.Module):
    """The generator's VAE decoder: unscaled latents -> pixels in [-1, 1]."""

    def __init__(self, vae: nn.Module, latent_size: int):
        super().__init__()
        self.vae, self.latent_size = vae, latent_size

    def forward(self, latents_bchw: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latents_bchw, return_dict=False)[0],)

    def spec(self) -> GraphSpec:
        config, side = self.vae.config, self.latent_size
        scale = 2 ** (len(config.block_out_channels) - 1)
        return GraphSpec((TensorSpec("latents", (BATCH, config.latent_channels, side, side), "float32"),),
                         (TensorSpec("pixels", (BATCH, config.out_channels, side * scale, side * scale),
                                     "float32"),))


def model_graphs(model: MindEye2, subjects: list[str]) -> dict[str, nn.Module]:
    """The model's graphs by name: one heads graph per subject and the prior's denoiser."""
    graphs: dict[str, nn.Module] = {heads_graph(subject): HeadsGraph(model, subject) for subject in subjects}
    graphs[PRIOR_DENOISER] = PriorDenoiserGraph(model.prior)
    return graphs


def generator_graphs(pipe) -> dict[str, nn.Module]:
    """A generator pipeline's graphs by name: its UNet, and its VAE decoder when it has one."""
    graphs: dict[str, nn.Module] = {GENERATOR_UNET: UNetGraph(pipe.unet, pipe.config.clip_tokens)}
    if pipe.vae is not None:
        graphs[GENERATOR_DECODER] = DecoderGraph(pipe.vae, pipe.unet.config.sample_size)
    return graphs


class GraphSet(Protocol):
    """Named graphs on one backend."""

    backend: str
    device: torch.device

    def __call__(self, name: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def __contains__(self, name: str) -> bool: ...


class TorchGraphs:
    """The graphs as torch modules, run eagerly or compiled (`compile=True`: torch.compile, CUDA graphs on a
    GPU through mode="reduce-overhead"; each graph compiles on its first call and for each new batch size)."""

    def __init__(self, modules: dict[str, nn.Module], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False):
        self.device, self.dtype = torch.device(device), dtype
        self.backend = "compile" if compile else "eager"
        self.modules = {name: module.to(device=self.device, dtype=dtype).eval() for name, module in modules.items()}
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.calls = {name: torch.compile(module, mode=mode, dynamic=False) if compile else module
                      for name, module in self.modules.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.calls

    @torch.inference_mode()
    def __call__(self, name: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tuple(x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device) for x in inputs)
        outputs = self.calls[name](*inputs)
        if self.backend == "compile":  # CUDA graphs overwrite their outputs on the next replay
            outputs = tuple(y.clone() for y in outputs)
        return tuple(y.float() for y in outputs)
