"""Model checkpoints: a folder with `model.safetensors` and `config.json`, loadable without training code.

config.json holds the resolved MindEyeConfig, the format version, the weights file's sha256 and an
optional `extra` mapping (e.g. the training run that made it). Training state (optimizer, scheduler,
epoch) does not belong here; training code saves it beside. Weights are written before config.json,
each through a temporary file, so a folder with a config.json holds a complete checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from mindeye.errors import FormatError, MissingFileError, read_format_json
from mindeye.models.config import MindEyeConfig
from mindeye.models.mindeye2 import MindEye2

FORMAT = "mindeye2-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
NULL_BRAIN_TOKENS = "prior.null_brain_tokens"  # the prior's unconditional input, which guided sampling reads alone
CONFIG_FILE = "config.json"


def save_checkpoint(model: MindEye2, path_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write the model's weights and resolved config into `path_dir` (created if needed); returns the folder."""
    path_dir = Path(path_dir)
    if model.aligner.voxels_per_subject != model.config.voxels_per_subject:
        raise ValueError(f"model.config.voxels_per_subject {model.config.voxels_per_subject} does not match the "
                         f"aligner's {model.aligner.voxels_per_subject}; add subjects with MindEye2.add_subject")
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except TypeError as error:
        raise TypeError(f"checkpoint `extra` must be JSON-serialisable: {error}") from error
    path_dir.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    _atomic_write(path_dir / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha256_file(path_dir / WEIGHTS_FILE), "config": model.config.to_dict(),
            "extra": extra_json}
    _atomic_write(path_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return path_dir


def read_checkpoint_config(path_dir: str | Path) -> tuple[MindEyeConfig, dict[str, Any]]:
    """The checkpoint's MindEyeConfig and its full config.json content (hash, format version, extra)."""
    config_path = Path(path_dir) / CONFIG_FILE
    meta = read_format_json(config_path, "checkpoint config", FORMAT, FORMAT_VERSION,
                            missing_hint=f"a checkpoint folder holds config.json and {WEIGHTS_FILE}, written by "
                                         "save_checkpoint")
    try:
        config = MindEyeConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(config_path, "model config", "a valid MindEyeConfig", str(error)) from error
    return config, meta


def load_checkpoint(path_dir: str | Path, *, device: str | torch.device = "cpu", verify_hash: bool = True) -> MindEye2:
    """The saved MindEye2, in eval mode, with the saved dtype; the weights must match the config exactly."""
    path_dir = Path(path_dir)
    config, meta = read_checkpoint_config(path_dir)
    weights_path = path_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise MissingFileError(weights_path, "checkpoint weights", f"{CONFIG_FILE} is there but its weights are not")
    if verify_hash and (found := sha256_file(weights_path)) != meta.get("weights_sha256"):
        raise FormatError(weights_path, "sha256", f"{meta.get('weights_sha256')} (recorded in {CONFIG_FILE})",
                          f"{found}: the file is truncated, modified or from another checkpoint")
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise FormatError(weights_path, "content", "a safetensors file", f"unreadable ({error})") from error
    with torch.device("meta"):  # shapes only; the loaded tensors become the parameters
        model = MindEye2(config)
    _check_state_matches(model, state, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _check_state_matches(model: MindEye2, state: dict[str, torch.Tensor], weights_path: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{name}: file {tuple(state[name].shape)}, config {shape}"
             for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    if missing or unexpected or wrong:
        problems = [f"missing {_listing(missing)}"] if missing else []
        problems += [f"unexpected {_listing(unexpected)}"] if unexpected else []
        problems += [f"wrong shapes {_listing(wrong)}"] if wrong else []
        raise FormatError(weights_path, "weights", f"the tensors of the model in {CONFIG_FILE}", "; ".join(problems))


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# -- calibration statistics: how each subject's betas were z-scored in training ---------------------------

CALIBRATION_FILE = "calibration.safetensors"


# What a calibration's betas are in. The live service feeds percent signal change from its realtime GLM;
# MindEye2's released hdf5 betas are z-scored per session, which no live estimate is.
BETA_UNITS = ("percent_signal_change", "zscored_per_session")
UNKNOWN = "unknown"  # a calibration written before units were recorded


def save_calibration(path_dir: str | Path, stats: dict[str, tuple[np.ndarray, np.ndarray]], *, units: str,
                     estimator: str) -> Path:
    """`stats`: subject name -> (mean (V,), std (V,)) of its betas, beside the model's weights.

    The realtime service z-scores live betas with these, so they must describe betas in the live units:
    `units` (one of BETA_UNITS) and `estimator` (what fitted the betas: "realtime_glm", "offline_glm",
    "glmsingle"...) are recorded, and the live backend refuses units other than its own.
    """
    if units not in BETA_UNITS:
        raise ValueError(f"units must be one of {BETA_UNITS}, got {units!r}")
    if not estimator:
        raise ValueError("estimator must name what fitted the betas (e.g. realtime_glm, glmsingle)")
    tensors = {}
    for subject, (mean_v, std_v) in stats.items():
        if mean_v.shape != std_v.shape or mean_v.ndim != 1:
            raise ValueError(f"{subject}: mean {mean_v.shape} and std {std_v.shape} must be equal 1-D shapes")
        if not (np.isfinite(std_v).all() and (std_v > 0).all()):
            raise ValueError(f"{subject}: std must be finite and positive")
        tensors[f"{subject}.mean"] = np.ascontiguousarray(mean_v, dtype=np.float32)
        tensors[f"{subject}.std"] = np.ascontiguousarray(std_v, dtype=np.float32)
    path = Path(path_dir) / CALIBRATION_FILE
    save_numpy(tensors, str(path), metadata={"what": "per-voxel z-score statistics of the subjects' betas",
                                             "units": units, "estimator": estimator})
    return path


def calibration_units(path_dir: str | Path) -> tuple[str, str]:
    """(units, estimator) of the betas the calibration describes; UNKNOWN for a file that does not say."""
    path = Path(path_dir) / CALIBRATION_FILE
    if not path.is_file():
        raise MissingFileError(path, "calibration statistics (per-voxel z-scoring of each subject's betas)")
    with safe_open(str(path), "np") as f:
        metadata = f.metadata() or {}
    return metadata.get("units", UNKNOWN), metadata.get("estimator", UNKNOWN)


def load_calibration(path_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """subject name -> (mean (V,), std (V,)), as `save_calibration` wrote them."""
    path = Path(path_dir) / CALIBRATION_FILE
    if not path.is_file():
        raise MissingFileError(path, "calibration statistics (per-voxel z-scoring of each subject's betas)")
    tensors = load_numpy(str(path))
    subjects = sorted({key.rsplit(".", 1)[0] for key in tensors})
    missing = [f"{s}.{part}" for s in subjects for part in ("mean", "std") if f"{s}.{part}" not in tensors]
    if missing:
        raise FormatError(path, "tensors", "a mean and a std per subject", f"missing {missing}")
    return {s: (tensors[f"{s}.mean"], tensors[f"{s}.std"]) for s in subjects}
