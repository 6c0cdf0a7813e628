"""The generator pipeline over a bundle's graphs: diffusers' sampling loop, the UNet and VAE decoder replaced.

`MindEyeUnCLIPPipeline` keeps its scheduler, token map and sampling loop in the runtime (steps, guidance
and img2img stay runtime choices); only its UNet and VAE decoder calls go to the graphs. `GraphUNet` and
`GraphVAE` answer the calls the pipeline makes of them (`unet(sample, t, encoder_hidden_states=...)
.sample`, `vae.decode(z).sample`, their `.config`, `.device`, `.dtype`), so the pipeline runs unchanged
and its weights never load into torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from torch import nn

from mindeye.bundle.graphs import GraphSet
from mindeye.bundle.manifest import GENERATOR_DECODER, GENERATOR_UNET
from mindeye.generator import MindEyeUnCLIPPipeline, TokenMap


class GraphUNet(nn.Module):
    """The pipeline's `unet`: its config, and calls that run the `generator_unet` graph."""

    def __init__(self, graphs: GraphSet, config: FrozenDict):
        super().__init__()
        self.graphs, self.config = graphs, config

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # the sampling loop's tensors; the runner moves them to its own device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, sample_bchw, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond=None):
        batch = sample_bchw.shape[0]
        timestep_b = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        conditions = (timestep_cond,) if self.config.time_cond_proj_dim is not None else ()
        (prediction,) = self.graphs(GENERATOR_UNET, sample_bchw, timestep_b, encoder_hidden_states,
                                    added_cond_kwargs["time_ids"], *conditions)
        return SimpleNamespace(sample=prediction.cpu())


class GraphVAE(nn.Module):
    """The pipeline's `vae`: its config, and decode calls that run the `generator_decoder` graph. Encoding
    (img2img from the low-level image) is not exported: such a generator needs img2img_strength = 1."""

    def __init__(self, graphs: GraphSet, config: FrozenDict):
        super().__init__()
        self.graphs, self.config = graphs, config

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def decode(self, latents_bchw: torch.Tensor):
        (pixels,) = self.graphs(GENERATOR_DECODER, latents_bchw)
        return SimpleNamespace(sample=pixels.cpu())

    def encode(self, _):
        raise ValueError("the bundle exports the generator's VAE decoder only: img2img from the low-level image "
                         "(generate.img2img_strength < 1) needs decode.backend=eager or compile")


def graph_pipeline(generator_dir: str | Path, graphs: GraphSet) -> MindEyeUnCLIPPipeline:
    """The bundle's generator with its UNet (and VAE decoder) running on `graphs`; the token map and the
    scheduler load from the folder as they are (small, and run once per image or in Python)."""
    folder = Path(generator_dir)
    index = json.loads((folder / "model_index.json").read_text())
    scheduler_class = getattr(__import__("diffusers", fromlist=[index["scheduler"][1]]), index["scheduler"][1])
    scheduler: SchedulerMixin = scheduler_class.from_pretrained(folder / "scheduler")
    unet = GraphUNet(graphs, FrozenDict(UNet2DConditionModel.load_config(folder / "unet")))
    vae = None
    if index.get("vae", [None])[0]:
        vae = GraphVAE(graphs, FrozenDict(AutoencoderKL.load_config(folder / "vae")))
    token_map = TokenMap.from_pretrained(folder / "token_map") if index.get("token_map", [None])[0] else None
    pipe = MindEyeUnCLIPPipeline(unet, scheduler, vae, token_map, clip_id=index["clip_id"],
                                 clip_tokens=index["clip_tokens"], original_size=index["original_size"],
                                 crop_coords=index["crop_coords"])
    pipe.set_progress_bar_config(disable=True)
    return pipe
