"""An untrained tiny model shaped for a world subject: what tests and service benchmarks decode with when
the path matters, not the decoding quality (random weights, a seeded random calibration)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def untrained_checkpoint(root: Path, directory: Path, subject: int = 1, seed: int = 0) -> Path:
    """The tiny config with an aligner for `subject`'s ROI in the world at `root`, its heads shaped like
    the world's CLIP and low-level targets, saved with a calibration into `directory`; returns the path."""
    import torch

    from mindeye.config import load_config
    from mindeye.models import build_model, save_calibration, save_checkpoint
    from mindeye.nsd import NSDLayout, read_roi, subject_name
    from mindeye.targets import build_target_cache

    n_voxels = read_roi(NSDLayout(root).roi(subject)).n_voxels
    targets = build_target_cache(load_config("realtime", [f"data.root={root}"]).data)
    (clip_tokens, clip_dim), (channels, size, _) = targets.token_shape, targets.low_level_shape
    torch.manual_seed(seed)
    name = subject_name(subject)
    model = build_model("tiny", voxels_per_subject={name: n_voxels}, clip_tokens=clip_tokens, clip_dim=clip_dim,
                        low_level={"latent_channels": channels, "latent_size": size})
    path = save_checkpoint(model, directory)
    rng = np.random.default_rng(seed)
    save_calibration(path, {name: (rng.normal(0, 0.1, n_voxels).astype(np.float32),
                                   rng.uniform(1, 2, n_voxels).astype(np.float32))},
                     units="percent_signal_change", estimator="random")  # stands in for a live one
    return path
