"""The evaluation command: outputs averaged over repeats, the paper's table, the image grid; reconstructions
with a generator (rows, grid, refusal of another encoder's generator) and the world's weightless 2-way metrics."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from omegaconf import OmegaConf

from PIL import Image

from mindeye.clip import clip_identity
from mindeye.config import load_config
from mindeye.evaluation import WORLD_COLUMNS, two_way_identification, world_feature_extractors
from mindeye.generator import GenerationSettings, build_pipeline, reconstruct
from mindeye.models import build_model, save_checkpoint
from mindeye.models.readout import fit_token_readout, save_readouts
from mindeye.nsd import ExpDesign, NSDLayout, StimulusBrick
from mindeye.targets import build_target_cache, target_clip_config
from offline_training.data import load_subject
from offline_training.evaluate import Generation, predict_test_set

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


def world_data_cfg(root):
    return load_config("evaluate", [f"data.root={root}"]).data


def save_generator(path, small_generator_cfg, clip_id: str):
    """A ~65 k-parameter generator (8 px) for the tiny world's 16 x 64 tokens, random weights."""
    torch.manual_seed(0)
    pipe = build_pipeline(small_generator_cfg(cross_attention_dim=64), clip_id=clip_id, clip_tokens=16)
    pipe.save_pretrained(path)
    return pipe


def run_evaluate(root, checkpoint, generator, out, **extra):
    return subprocess.run([sys.executable, "-m", "offline_training.evaluate", f"data.root={root}",
                           f"checkpoints={{untrained: {checkpoint}}}", f"generator.path={generator}", f"out_dir={out}",
                           *(f"{key}={value}" for key, value in extra.items())],
                          capture_output=True, text=True)


def test_command_with_a_generator_adds_generated_blend_refined_and_true_token_rows(tiny_world, tmp_path,
                                                                                  small_generator_cfg):
    root, _, _ = tiny_world
    save_generator(tmp_path / "generator", small_generator_cfg, clip_identity(target_clip_config(world_data_cfg(root))))
    torch.manual_seed(0)
    save_checkpoint(build_model("tiny", voxels_per_subject={"subj08": 360}, **TINY_WORLD_GRID), tmp_path / "a")
    out = tmp_path / "eval"
    done = run_evaluate(root, tmp_path / "a", tmp_path / "generator", out,
                        **{"generator.steps": 2, "grid_images": 5, "generator.refine.path": tmp_path / "generator",
                           "generator.refine.steps": 2})
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "eval.json").read_text())
    assert list(rows) == ["untrained (blurry)", "untrained (generated)", "untrained (blend)", "untrained (refined)",
                          "true tokens (generated)"]
    for name, row in rows.items():
        for column in ("PixCorr", "SSIM", *WORLD_COLUMNS):  # the world's 2-way columns need no downloaded weights
            assert np.isfinite(row[column]), (name, column)
        assert 0 <= row["World CLIP"] <= 1 and 0 <= row["Rand. AlexNet"] <= 1
        assert row["Alex(2)"] is None  # the paper's columns stay as they are: n/a without weights
    assert rows["untrained (blend)"]["Image retrieval"] == rows["untrained (blurry)"]["Image retrieval"]
    assert rows["true tokens (generated)"]["Image retrieval"] is None
    md = (out / "eval.md").read_text()
    assert "| true tokens (generated) |" in md and "World CLIP ↑ | Rand. AlexNet ↑ |" in md
    with Image.open(out / "grid.png") as grid:  # seen, blurry, generated, blend, refined, true tokens; 5 images a row
        assert grid.size == (160 + 5 * (128 + 4) + 4, 6 * (128 + 4) + 4)


def test_generation_draws_from_the_checkpoint_s_readout_and_says_in_one_line_when_it_has_none(
        tiny_world, tmp_path, small_generator_cfg):
    root, _, _ = tiny_world
    pipe = save_generator(tmp_path / "generator", small_generator_cfg,
                          clip_identity(target_clip_config(world_data_cfg(root))))
    model = build_model("tiny", voxels_per_subject={"subj08": 360}, **TINY_WORLD_GRID).eval()
    save_checkpoint(model, tmp_path / "a")
    rng = np.random.default_rng(0)
    readout, _ = fit_token_readout(torch.from_numpy(rng.normal(size=(20, 16, 64))),
                                   torch.from_numpy(rng.normal(size=(20, 16, 64))))
    save_readouts(tmp_path / "a", {"subj08": readout})
    backbone = rng.normal(size=(4, 16, 64)).astype(np.float32)
    generation = Generation(pipe, GenerationSettings(2, 2.0, 0.25), tokens="readout")
    with torch.no_grad():
        want = readout(torch.from_numpy(backbone)).numpy()
    np.testing.assert_array_equal(generation.image_tokens(model, tmp_path / "a", "subj08", backbone), want)
    save_checkpoint(model, tmp_path / "b")
    done = run_evaluate(root, tmp_path / "b", tmp_path / "generator", tmp_path / "eval",
                        **{"generator.tokens": "readout"})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("mindeye-evaluate: missing token readouts") and "mindeye-train fits one" in message


def test_a_generator_trained_on_another_encoder_is_refused_with_one_message(tiny_world, tmp_path,
                                                                            small_generator_cfg):
    root, _, _ = tiny_world
    save_generator(tmp_path / "generator", small_generator_cfg, "tiny_vit:random:000000000000")
    torch.manual_seed(0)
    save_checkpoint(build_model("tiny", voxels_per_subject={"subj08": 360}, **TINY_WORLD_GRID), tmp_path / "a")
    done = run_evaluate(root, tmp_path / "a", tmp_path / "generator", tmp_path / "eval")
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("mindeye-evaluate: the generator in") and "'tiny_vit:random:000000000000'" in message
    assert clip_identity(target_clip_config(world_data_cfg(root))) in message
    assert "Traceback" not in done.stderr and not (tmp_path / "eval" / "eval.json").exists()


def test_world_feature_metrics_identify_the_seen_images_among_themselves(tiny_world, one_thread):
    root, _, _ = tiny_world
    layout = NSDLayout(root)
    ids = np.sort(ExpDesign.read(layout.expdesign()).shared_images)
    seen = StimulusBrick(layout.stimuli())[ids]
    targets = build_target_cache(world_data_cfg(root))
    world_clip, random_alexnet = world_feature_extractors(targets.embedder)
    clip_features = world_clip(seen)
    # world_clip is the data's own encoder: its features are the target tokens, flattened
    np.testing.assert_allclose(clip_features, targets.get(ids)[0].reshape(len(ids), -1), atol=2e-2, rtol=1e-2)
    assert two_way_identification(clip_features, clip_features) == 1.0
    assert two_way_identification(random_alexnet(seen), random_alexnet(seen)) == 1.0
    # the random AlexNet is the same network every time, whatever the global RNG did
    torch.manual_seed(123)
    np.testing.assert_array_equal(world_feature_extractors(targets.embedder)[1](seen[:2]), random_alexnet(seen[:2]))


def test_reconstruct_blends_with_the_low_level_images_and_repeats_with_its_seed(small_generator_cfg, one_thread):
    torch.manual_seed(0)
    pipe = build_pipeline(small_generator_cfg(cross_attention_dim=64), clip_id="x", clip_tokens=16)
    pipe.set_progress_bar_config(disable=True)
    tokens = torch.randn(5, 16, 64, generator=torch.Generator().manual_seed(1))
    low = np.random.default_rng(2).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    settings = GenerationSettings(steps=2, guidance_scale=2.0, lowlevel_blend=0.25)
    out = reconstruct(pipe, tokens, low_level_nhwc=low, settings=settings, seed=3, batch_size=2)
    assert out.images.shape == out.generated.shape == (5, 8, 8, 3) and out.images.dtype == np.uint8
    expected = 0.75 * out.generated.astype(float) + 0.25 * low.astype(float)
    assert np.abs(out.images.astype(float) - expected).max() <= 1.0  # uint8 rounding of each term
    again = reconstruct(pipe, tokens, low_level_nhwc=low, settings=settings, seed=3, batch_size=2)
    np.testing.assert_array_equal(again.images, out.images)
    other_seed = reconstruct(pipe, tokens, settings=settings, seed=4, batch_size=2, output_size=16)
    assert other_seed.images.shape == (5, 16, 16, 3) and (other_seed.images == other_seed.generated).all()
