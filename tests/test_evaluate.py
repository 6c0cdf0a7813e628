"""The evaluation command: outputs averaged over repeats, the paper's table, the image grid."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from omegaconf import OmegaConf

from mindeye.models import build_model, save_checkpoint
from offline_training.data import load_subject
from offline_training.evaluate import predict_test_set

TINY_WORLD_GRID = {"clip_tokens": 16, "clip_dim": 64, "low_level": {"latent_channels": 3, "latent_size": 16}}


def test_outputs_are_averaged_over_each_images_repeats(tiny_world, one_thread):
    root, _, _ = tiny_world
    data = load_subject(OmegaConf.create({"root": str(root), "betas": "nifti"}), 8, train_sessions=[1])
    torch.manual_seed(0)
    model = build_model("tiny", voxels_per_subject={"subj08": data.n_voxels}, **TINY_WORLD_GRID).eval()
    outputs = predict_test_set(model, data, batch_size=7)  # batches that split an image's repeats
    assert outputs.retrieval_tokens.shape == (30, 16, 64) and outputs.low_level.shape == (30, 3, 16, 16)
    image = outputs.image_ids[4]
    with torch.no_grad():
        direct = model(torch.from_numpy(data.test_voxels[data.test_image_ids == image]), "subj08")
    np.testing.assert_allclose(outputs.retrieval_tokens[4], direct.retrieval_tokens.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(outputs.low_level[4], direct.low_level_latent.mean(0).numpy(), atol=1e-5)


def test_command_writes_table_and_grid(tiny_world, tmp_path, one_thread):
    root, _, _ = tiny_world
    torch.manual_seed(0)
    with_head = build_model("tiny", voxels_per_subject={"subj08": 360}, **TINY_WORLD_GRID)
    without_head = build_model("tiny", voxels_per_subject={"subj08": 360}, clip_tokens=16, clip_dim=64,
                               low_level={"enabled": False})
    save_checkpoint(with_head, tmp_path / "a")
    save_checkpoint(without_head, tmp_path / "b")
    out = tmp_path / "eval"
    subprocess.run([sys.executable, "-m", "offline_training.evaluate", f"data.root={root}",
                    f"checkpoints={{untrained: {tmp_path / 'a'}, no_head: {tmp_path / 'b'}}}", f"out_dir={out}"],
                   check=True, capture_output=True, text=True)
    rows = json.loads((out / "eval.json").read_text())
    assert set(rows) >= {"untrained (blurry)", "no_head"}
    untrained = rows["untrained (blurry)"]
    # An untrained model retrieves at chance (30-way: 1/30); its blurry images still get PixCorr and SSIM.
    assert untrained["Image retrieval"] <= 3 / 30 and untrained["Brain retrieval"] <= 3 / 30
    assert -1 <= untrained["PixCorr"] <= 1 and 0 < untrained["SSIM"] <= 1
    assert untrained["Alex(2)"] is None  # no AlexNet weights here: reported as unavailable, not invented
    md = (out / "eval.md").read_text()
    assert "| untrained (blurry) |" in md and "alexnet-owt-7be5be79.pth" in md
    assert (out / "grid.png").stat().st_size > 1000
