"""Evaluate checkpoints as the MindEye2 paper does and write its table and an image grid.

For each test image, the model's outputs on its repeats are averaged (as the paper does);
retrieval compares the averaged retrieval tokens with the images' CLIP tokens (300-way x 30,
or k-way with fewer test images); the low-level head's averaged latent is decoded into the
blurry reconstruction, scored with PixCorr, SSIM and the feature metrics (reported as
unavailable where their weights are absent). Full reconstructions need the unCLIP generator,
which is not part of this stage yet.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from mindeye.config import CONFIG_DIR
from mindeye.evaluation import evaluate_reconstructions, save_image_grid, write_table
from mindeye.metrics import RetrievalScore, retrieval_top1
from mindeye.models import MindEyeOutput, load_checkpoint
from mindeye.nsd import NSDLayout, StimulusBrick
from mindeye.targets import build_target_cache
from offline_training.data import SubjectData, average_by_image, load_subject


@dataclass(frozen=True)
class TestOutputs:
    """Model outputs on a subject's test set, averaged over each image's repeats."""

    image_ids: np.ndarray  # (n_images,)
    retrieval_tokens: np.ndarray  # (n_images, L, D)
    backbone_tokens: np.ndarray  # (n_images, L, D)
    low_level: np.ndarray | None  # (n_images, C, S, S)


Encoder = Callable[[torch.Tensor, str], MindEyeOutput]


@torch.no_grad()
def predict_test_set(encode: Encoder, data: SubjectData, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> TestOutputs:
    """`encode` maps (voxels, subject) to a MindEyeOutput: a MindEye2 in eval mode, or a training wrapper."""
    parts: dict[str, list[np.ndarray]] = {"retrieval": [], "backbone": [], "low": []}
    for start in range(0, len(data.test_voxels), batch_size):
        out = encode(torch.from_numpy(data.test_voxels[start:start + batch_size]).to(device), data.name)
        parts["retrieval"].append(out.retrieval_tokens.float().cpu().numpy())
        parts["backbone"].append(out.backbone_tokens.float().cpu().numpy())
        if out.low_level_latent is not None:
            parts["low"].append(out.low_level_latent.float().cpu().numpy())
    ids, retrieval = average_by_image(np.concatenate(parts["retrieval"]), data.test_image_ids)
    _, backbone = average_by_image(np.concatenate(parts["backbone"]), data.test_image_ids)
    low = average_by_image(np.concatenate(parts["low"]), data.test_image_ids)[1] if parts["low"] else None
    return TestOutputs(ids, retrieval, backbone, low)


def test_retrieval(outputs: TestOutputs, targets, seed: int = 0) -> RetrievalScore:
    """Top-1 retrieval of the averaged retrieval tokens against the test images' CLIP tokens."""
    tokens, _ = targets.get(outputs.image_ids)
    return retrieval_top1(outputs.retrieval_tokens, tokens, seed=seed)


def evaluate_checkpoint(checkpoint: Path, data: SubjectData, targets, codec, stimuli: StimulusBrick, *,
                        weights_dir: Path | None = None, seed: int = 0) -> tuple[dict, TestOutputs, np.ndarray | None]:
    """One table row, the averaged outputs, and the blurry reconstructions (uint8 (n, H, W, 3); None
    without a low-level head)."""
    model = load_checkpoint(checkpoint)
    outputs = predict_test_set(model, data)
    retrieval = test_retrieval(outputs, targets, seed=seed)
    seen = stimuli[outputs.image_ids]
    if outputs.low_level is None:
        return {"Image retrieval": retrieval.image_top1, "Brain retrieval": retrieval.brain_top1}, outputs, None
    blurry = codec.decode(torch.from_numpy(outputs.low_level), image_size=seen.shape[1])
    blurry = (blurry.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    row = evaluate_reconstructions(blurry, seen, weights_dir=weights_dir, retrieval=retrieval)
    return row, outputs, blurry


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    checkpoints = cfg.checkpoints if isinstance(cfg.checkpoints, DictConfig) else {"model": cfg.checkpoints}
    data = load_subject(cfg.data, cfg.subject)
    targets = build_target_cache(cfg.data)
    stimuli = StimulusBrick(NSDLayout(Path(cfg.data.root)).stimuli())
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, grid_rows, grid_labels = {}, [], []
    for name, path in checkpoints.items():
        row, outputs, blurry = evaluate_checkpoint(Path(path), data, targets, targets.codec, stimuli,
                                                   weights_dir=cfg.weights_dir, seed=cfg.seed)
        rows[f"{name} (blurry)" if blurry is not None else name] = row
        if not grid_rows:
            grid_rows.append(stimuli[outputs.image_ids[:cfg.grid_images]])
            grid_labels.append("seen")
        if blurry is not None:
            grid_rows.append(blurry[:cfg.grid_images])
            grid_labels.append(f"{name}: blurry")
    write_table(rows, out_dir / "eval.md", out_dir / "eval.json")
    save_image_grid(grid_rows, grid_labels, out_dir / "grid.png")
    print((out_dir / "eval.md").read_text())
    print(f"wrote {out_dir / 'eval.md'}, {out_dir / 'eval.json'} and {out_dir / 'grid.png'}")


if __name__ == "__main__":
    main()
