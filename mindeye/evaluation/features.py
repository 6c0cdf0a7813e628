"""The frozen networks behind the paper's perceptual metrics, built from local weight files only.

One recipe per Table 1 column, as the official evaluation (MedARC-AI/MindEyeV2
`src/final_evaluations.ipynb`) builds it: the layer read out, the input size (a plain resize of
the square 256 px images, no centre crop, so AlexNet's features.4 is 192 x 31 x 31) and the
normalisation (ImageNet's; OpenAI's for CLIP). Features are computed in float32.

| name         | network (weights)                           | output read     | input  | metric   |
| ------------ | ------------------------------------------- | --------------- | ------ | -------- |
| alexnet2     | AlexNet (torchvision IMAGENET1K_V1)         | features.4      | 256 px | two_way  |
| alexnet5     | AlexNet (torchvision IMAGENET1K_V1)         | features.11     | 256 px | two_way  |
| inception    | InceptionV3 (torchvision IMAGENET1K_V1)     | avgpool         | 342 px | two_way  |
| clip         | CLIP ViT-L/14 (OpenAI)                      | image embedding | 224 px | two_way  |
| efficientnet | EfficientNet-B1 (torchvision IMAGENET1K_V2) | avgpool         | 255 px | distance |
| swav         | ResNet-50 (SwAV, 800 epochs)                | avgpool         | 224 px | distance |

Weights are looked up, in order, in `weights_dir`, in the torch hub cache
(`torch.hub.get_dir()/checkpoints`, where torchvision and `torch.hub` keep them) and, for CLIP, in
the Hugging Face cache (open_clip's copy of the OpenAI weights). Nothing is downloaded: a missing
file raises `MetricUnavailable` naming where it was expected.

A synthetic world has two more 2-way columns that need no downloaded weights
(`world_feature_extractors`, WORLD_FEATURE_EXTRACTORS):

| name           | network (weights)                               | output read              | input            |
| -------------- | ----------------------------------------------- | ------------------------ | ---------------- |
| world_clip     | the data's own CLIP encoder (`mindeye.clip`)    | patch tokens, flattened  | its own (tiny: 64 px) |
| random_alexnet | AlexNet, random weights drawn from a fixed seed | features.11 (conv5 ReLU) | 256 px           |
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import huggingface_hub
import numpy as np
import open_clip
import torch
from torch import nn
from torchvision import models

from mindeye.clip import ClipImageEmbedder
from mindeye.errors import FormatError
from mindeye.evaluation.image_metrics import PAPER_DOWNSAMPLE_ANTIALIAS, images_to_nchw, resize_nchw

MetricKind = Literal["two_way", "distance"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"  # facebookresearch/swav hubconf
CLIP_MODEL, CLIP_TAG = "ViT-L-14", "openai"


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here, e.g. its network's weights are not on this machine."""

    def __init__(self, name: str, reason: str, expected_path: Path | None = None):
        self.name, self.reason, self.expected_path = name, reason, expected_path
        super().__init__(f"metric '{name}' unavailable: {reason}")


class FeatureExtractor(ABC):
    """Images -> one feature row per image, for a 2-way identification or correlation-distance metric."""

    name: str
    metric: MetricKind

    @abstractmethod
    def __call__(self, images_nhwc: np.ndarray) -> np.ndarray:
        """uint8 or [0, 1] float (N, H, W, 3) -> float32 (N, F)."""


class TorchFeatureExtractor(FeatureExtractor):
    """Resize to `input_size` (square, bilinear, no antialiasing as in the paper), normalise, run, flatten."""

    def __init__(self, name: str, metric: MetricKind, network: nn.Module, input_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 device: str | torch.device = "cpu", batch_size: int = 32):
        self.name, self.metric, self.input_size, self.batch_size = name, metric, input_size, batch_size
        self.device = torch.device(device)
        self.network = network.eval().requires_grad_(False).to(self.device)
        self.mean_c11 = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self.std_c11 = torch.tensor(std, device=self.device).view(3, 1, 1)

    @torch.no_grad()
    def __call__(self, images_nhwc: np.ndarray) -> np.ndarray:
        images_nchw = images_to_nchw(images_nhwc, f"{self.name} input")
        rows = []
        for start in range(0, len(images_nchw), self.batch_size):
            batch = resize_nchw(images_nchw[start:start + self.batch_size].to(self.device), self.input_size,
                                antialias=PAPER_DOWNSAMPLE_ANTIALIAS)
            rows.append(self.network((batch - self.mean_c11) / self.std_c11).flatten(1).float().cpu().numpy())
        return np.concatenate(rows)


class NodeOutput(nn.Module):
    """Runs `model` and returns what its submodule `node` (e.g. 'features.4') produced."""

    def __init__(self, model: nn.Module, node: str):
        super().__init__()
        self.model, self.node = model, node
        self._captured: torch.Tensor | None = None
        model.get_submodule(node).register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._captured = output

    def forward(self, images_nchw: torch.Tensor) -> torch.Tensor:
        self.model(images_nchw)
        captured, self._captured = self._captured, None
        return captured


class ClipImageEmbedding(nn.Module):
    """CLIP's projected image embedding (`encode_image`), unnormalised as in the official evaluation."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip_model = clip_model

    def forward(self, images_nchw: torch.Tensor) -> torch.Tensor:
        return self.clip_model.encode_image(images_nchw)


@dataclass(frozen=True)
class _Recipe:
    metric: MetricKind
    input_size: int  # px: the official evaluation's Resize(size) of square images
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: str
    load: Callable[[Path], nn.Module]  # weights file -> network returning the features
    hf_hub: str | None = None  # a Hugging Face repo whose cached open_clip weights also serve


def _url_filename(url: str) -> str:
    return Path(urlparse(url).path).name


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise FormatError(path, "weights file", "a state dict", type(state).__name__)
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise FormatError(path, "state dict", f"the keys and shapes of {type(model).__name__}",
                          str(error).splitlines()[0] + " ...") from error


def _torchvision(builder: Callable[..., nn.Module], node: str, path: Path, **build_kwargs) -> nn.Module:
    model = builder(weights=None, **build_kwargs)
    _load_strict(model, _torch_state_dict(path), path)
    return NodeOutput(model, node)


def _swav_resnet50(path: Path) -> nn.Module:
    model = models.resnet50(weights=None)
    state = {key.removeprefix("module."): value for key, value in _torch_state_dict(path).items()}
    # The checkpoint also holds SwAV's projection head and prototypes, and no classifier: as in
    # SwAV's own hub loader those are left out, but every backbone weight must be there.
    missing = set(model.load_state_dict(state, strict=False).missing_keys) - {"fc.weight", "fc.bias"}
    if missing:
        raise FormatError(path, "SwAV ResNet-50 checkpoint", "every backbone weight",
                          f"{len(missing)} missing, e.g. {sorted(missing)[:3]}")
    return NodeOutput(model, "avgpool")


def _clip_vit_l14(path: Path) -> nn.Module:
    if path.suffix == ".pt":  # OpenAI's own TorchScript archive
        model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    else:  # open_clip's copy of the same weights; they were trained with QuickGELU
        model = open_clip.create_model(CLIP_MODEL, pretrained=str(path), force_quick_gelu=True)
    if model.visual.output_dim != 768:
        raise FormatError(path, "CLIP weights", "ViT-L/14 (768-d image embedding)",
                          f"a {model.visual.output_dim}-d image embedding")
    return ClipImageEmbedding(model)


_RECIPES: dict[str, _Recipe] = {
    "alexnet2": _Recipe("two_way", 256, IMAGENET_MEAN, IMAGENET_STD,
                        _url_filename(models.AlexNet_Weights.IMAGENET1K_V1.url),
                        partial(_torchvision, models.alexnet, "features.4")),
    "alexnet5": _Recipe("two_way", 256, IMAGENET_MEAN, IMAGENET_STD,
                        _url_filename(models.AlexNet_Weights.IMAGENET1K_V1.url),
                        partial(_torchvision, models.alexnet, "features.11")),
    # torchvision builds the pretrained InceptionV3 with transform_input=True (its weights expect
    # inputs in [-1, 1]; the flag converts from ImageNet normalisation) and the auxiliary head.
    "inception": _Recipe("two_way", 342, IMAGENET_MEAN, IMAGENET_STD,
                         _url_filename(models.Inception_V3_Weights.IMAGENET1K_V1.url),
                         partial(_torchvision, models.inception_v3, "avgpool", aux_logits=True,
                                 transform_input=True, init_weights=False)),
    "clip": _Recipe("two_way", 224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                    _url_filename(open_clip.get_pretrained_cfg(CLIP_MODEL, CLIP_TAG)["url"]), _clip_vit_l14,
                    hf_hub=open_clip.get_pretrained_cfg(CLIP_MODEL, CLIP_TAG)["hf_hub"].strip("/")),
    "efficientnet": _Recipe("distance", 255, IMAGENET_MEAN, IMAGENET_STD,
                            _url_filename(models.EfficientNet_B1_Weights.IMAGENET1K_V2.url),
                            partial(_torchvision, models.efficientnet_b1, "avgpool")),
    "swav": _Recipe("distance", 224, IMAGENET_MEAN, IMAGENET_STD, _url_filename(SWAV_URL), _swav_resnet50),
}
FEATURE_EXTRACTORS: tuple[str, ...] = tuple(_RECIPES)


def weights_candidates(name: str, weights_dir: Path | None = None) -> list[Path]:
    """Where the weights of `name` are looked for, in order (hub-cache paths are resolved now)."""
    recipe = _recipe(name)
    places = [Path(weights_dir)] if weights_dir is not None else []
    places.append(Path(torch.hub.get_dir()) / "checkpoints")
    candidates = [place / recipe.weights_file for place in places]
    if recipe.hf_hub is not None:
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            cached = huggingface_hub.try_to_load_from_cache(recipe.hf_hub, filename)
            if isinstance(cached, str):
                candidates.append(Path(cached))
    return candidates


def build_feature_extractor(name: str, weights_dir: Path | None = None, *, device: str | torch.device = "cpu",
                            batch_size: int = 32) -> FeatureExtractor:
    """The extractor for one Table 1 column; `MetricUnavailable` if its weights are not on disk."""
    recipe = _recipe(name)
    candidates = weights_candidates(name, weights_dir)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        places = ", ".join(str(path.parent) for path in candidates)
        hub = f" or the Hugging Face cache of {recipe.hf_hub}" if recipe.hf_hub else ""
        raise MetricUnavailable(name, f"weights {recipe.weights_file} not found in {places}{hub}",
                                expected_path=candidates[0])
    return TorchFeatureExtractor(name, recipe.metric, recipe.load(found), recipe.input_size, recipe.mean,
                                 recipe.std, device=device, batch_size=batch_size)


class ClipTokenFeatures(FeatureExtractor):
    """The flattened patch tokens of a CLIP image encoder (a `mindeye.clip.ClipImageEmbedder`, which resizes
    the images to its own input size and normalises them itself), in float32."""

    metric: MetricKind = "two_way"

    def __init__(self, embedder: ClipImageEmbedder, name: str = "world_clip", batch_size: int = 64):
        self.embedder, self.name, self.batch_size = embedder, name, batch_size

    @torch.no_grad()
    def __call__(self, images_nhwc: np.ndarray) -> np.ndarray:
        images_nchw = images_to_nchw(images_nhwc, f"{self.name} input")
        device = self.embedder.mean.device
        return np.concatenate([self.embedder(images_nchw[start:start + self.batch_size].to(device))
                               .flatten(1).float().cpu().numpy()
                               for start in range(0, len(images_nchw), self.batch_size)])


RANDOM_ALEXNET_SEED = 1


def random_alexnet_features(seed: int = RANDOM_ALEXNET_SEED, *, device: str | torch.device = "cpu",
                            batch_size: int = 32) -> FeatureExtractor:
    """AlexNet with torchvision's random initialisation drawn from `seed` (the global RNG is left as it was),
    read at features.11 (Alex(5)'s layer), fed as Alex(5) is (256 px, ImageNet normalisation).

    Why this network: the world's generator is conditioned on the world's CLIP tokens, so a generator that
    only reproduces those tokens scores on `world_clip` without having to reproduce the image. This
    metric shares neither weights nor architecture family with that encoder (a ViT): local convolutions
    and pooling, five layers deep. A ViT with another seed (e.g. configs/clip/small_vit.yaml) would share
    the family, and on the small world, whose encoder *is* small_vit, the architecture too. Untrained
    convolutional features still carry colour, texture and layout (texture synthesis works from random-weight
    CNNs, Ustyuzhaninov et al. 2017); features.11 is the deepest, least pixel-like of AlexNet's.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = models.alexnet(weights=None)
    return TorchFeatureExtractor("random_alexnet", "two_way", NodeOutput(network, "features.11"), 256,
                                 IMAGENET_MEAN, IMAGENET_STD, device=device, batch_size=batch_size)


WORLD_FEATURE_EXTRACTORS: tuple[str, ...] = ("world_clip", "random_alexnet")


def world_feature_extractors(embedder: ClipImageEmbedder, *, device: str | torch.device = "cpu"
                             ) -> tuple[FeatureExtractor, ...]:
    """The weightless 2-way extractors of a synthetic world, in WORLD_FEATURE_EXTRACTORS order: its own CLIP
    encoder `embedder` (e.g. `build_target_cache(data_cfg).embedder`) and the random AlexNet."""
    return ClipTokenFeatures(embedder), random_alexnet_features(device=device)


def _recipe(name: str) -> _Recipe:
    if name not in _RECIPES:
        raise ValueError(f"unknown feature extractor '{name}'; known: {', '.join(_RECIPES)}")
    return _RECIPES[name]
