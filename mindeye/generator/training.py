"""What generator training (offline_training) and distillation (export) share: batches of scenes as
tensors, resumable accelerate state, the loss plot and the preview grid."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from mindeye.errors import OutDirInUse
from mindeye.scenes import SceneBatches, paint_scene, sample_scene, save_grid

PROGRESS_FILE = "progress.json"


def to_unit(images_bhw3: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.as_tensor(images_bhw3).permute(0, 3, 1, 2).float() / 255.0


def scene_loader(seed: int, size: int, batch_size: int, first_batch: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches of fresh scenes (`SceneBatches`) from `first_batch` on, painted by `workers` processes beside
    the training step. The loader has a torch generator of its own: starting its iterator draws a seed,
    which from the global RNG would shift a resumed run's noise away from the uninterrupted run's."""
    return torch.utils.data.DataLoader(SceneBatches(seed, size, batch_size, first_batch), batch_size=None,
                                       num_workers=workers, prefetch_factor=4 if workers else None,
                                       generator=torch.Generator())


def preview_scenes(seed: int, size: int, n: int = 8) -> np.ndarray:
    """uint8 (n, size, size, 3): the held-out scenes of the sample grids (scenes 0..n-1 of `seed`)."""
    return np.stack([paint_scene(sample_scene(seed, i), size) for i in range(n)])


def save_state(accelerator, state_dir: Path, progress: dict) -> None:
    """accelerate's training state plus `progress`, through a temporary folder: an interruption leaves
    the previous state whole."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    (tmp / PROGRESS_FILE).write_text(json.dumps(progress))
    shutil.rmtree(state_dir, ignore_errors=True)
    tmp.rename(state_dir)


def load_state(accelerator, state_dir: Path) -> dict:
    """Restore what save_state wrote; returns its `progress`."""
    accelerator.load_state(str(state_dir))
    return json.loads((state_dir / PROGRESS_FILE).read_text())


def check_out_dir(out_dir: Path, state_dir: Path, resume: bool) -> None:
    if state_dir.is_dir() and not resume:
        raise OutDirInUse(f"{out_dir} holds a run; pass resume=true to continue it or choose another out_dir")


def plot_loss(records: list[dict], path: Path, *, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel=ylabel, yscale="log", title=title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def preview_grid(pipe, embedder, images_bhw3: np.ndarray, path: Path, *, steps: int, guidance_scale: float) -> Path:
    """A grid: scenes (top row) over what the generator makes of their CLIP tokens (bottom row)."""
    tokens = embedder(torch.from_numpy(images_bhw3).permute(0, 3, 1, 2))
    out = pipe(tokens, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=torch.Generator().manual_seed(0), output_size=images_bhw3.shape[1])
    return save_grid(np.concatenate([images_bhw3, out.images]), path, ncols=len(images_bhw3))


def save_generator_folder(pipe, path: Path, *, half: bool) -> Path:
    """`pipe` as a generator folder, its UNet in float16 when `half` (half the size; loads as float32)."""
    pipe.unet.eval()
    if pipe.token_map is not None:
        pipe.token_map.eval()
    if half:
        pipe.unet.half()
    pipe.save_pretrained(path, safe_serialization=True)
    pipe.unet.float()
    return path
