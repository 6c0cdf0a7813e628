"""One factory: `build_model` from a config, a dict or a config name in configs/model/."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mindeye.models.config import MindEyeConfig
from mindeye.models.mindeye2 import MindEye2

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def available_configs() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def load_config(config: MindEyeConfig | Mapping[str, Any] | str | Path, **overrides: Any) -> MindEyeConfig:
    """A MindEyeConfig from a config, a dict (or OmegaConf node), a name in configs/model/ or a .yaml path.

    `overrides` replace top-level fields (`voxels_per_subject=...` replaces the whole mapping) or merge
    into a sub-config when given as a dict (`prior={"depth": 2}`).
    """
    if isinstance(config, MindEyeConfig):
        data = config.to_dict()
    elif isinstance(config, (str, Path)):
        data = _read_yaml(config)
    elif isinstance(config, DictConfig):
        data = OmegaConf.to_container(config, resolve=True)
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise TypeError(f"config must be a MindEyeConfig, a mapping or a config name, got {type(config).__name__}")
    for key, value in overrides.items():
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if isinstance(value, Mapping) and isinstance(data.get(key), Mapping) and key != "voxels_per_subject":
            value = {**data[key], **value}
        data[key] = value
    return MindEyeConfig.from_dict(data)


def build_model(config: MindEyeConfig | Mapping[str, Any] | str | Path, *, device: str | torch.device = "cpu",
                **overrides: Any) -> MindEye2:
    """A freshly initialised MindEye2; `device="meta"` builds shapes only, allocating nothing."""
    resolved = load_config(config, **overrides)
    with torch.device(device):
        return MindEye2(resolved)


def count_parameters(model: MindEye2) -> dict[str, int]:
    """Parameters per part: aligner, backbone (blocks + token linear), retrieval, low_level, prior, total."""
    def n(module: nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    counts = {"aligner": n(model.aligner), "backbone": n(model.backbone), "retrieval": n(model.retrieval_head),
              "low_level": n(model.low_level_head), "prior": n(model.prior)}
    counts["total"] = n(model)
    return counts


def _read_yaml(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"no model config named {str(name_or_path)!r} in {MODEL_CONFIG_DIR}; "
                                    f"available: {available_configs()}")
    elif not path.is_file():
        raise FileNotFoundError(f"model config file {path} does not exist")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a model config must be a mapping of fields, got {type(data).__name__}")
    return data
