"""The training data layer: subjects' betas and splits, the target cache and the low-level codecs."""
from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mindeye.errors import MissingFileError
from mindeye.latents import PixelCodec, build_latent_codec
from mindeye.nsd import ExpDesign, NSDLayout
from mindeye.nsd.files import read_rows
from mindeye.targets import build_target_cache, target_clip_config
from offline_training.data import average_by_image, load_subject


def data_cfg(root, **over):
    return OmegaConf.create({"root": str(root), "betas": "nifti", "cache_dir": str(root / "cache"), "clip": "world",
                             "low_level": {"kind": "pixels", "latent_size": 16}, **over})


def test_one_session_split_and_test_set(tiny_world):
    root, _, cfg = tiny_world
    data = load_subject(data_cfg(root), 8, train_sessions=[1])
    design = ExpDesign.read(NSDLayout(root).expdesign())
    first = design.trials(8, [1])
    assert data.name == "subj08" and data.n_voxels == 360
    # Training: session 1's trials of non-shared images only ("1 hour", test trials removed).
    assert len(data.train_image_ids) == (~first.is_test).sum()
    assert not np.isin(data.train_image_ids, design.shared_images).any()
    # Test: every repeat of every shared image, from all sessions.
    ids, counts = np.unique(data.test_image_ids, return_counts=True)
    np.testing.assert_array_equal(ids, design.shared_images)
    assert (counts == 3).all()
    # z-scored with the training trials' statistics of each session.
    np.testing.assert_allclose(data.train_voxels.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(data.train_voxels.std(0), 1, atol=1e-3)
    assert data.zscore_mean.shape == data.zscore_std.shape == (360,)


def test_nifti_and_released_hdf5_agree(tiny_world):
    root, _, _ = tiny_world
    a = load_subject(data_cfg(root), 2)
    b = load_subject(data_cfg(root, betas="mindeye_hdf5"), 2)
    np.testing.assert_array_equal(a.train_image_ids, b.train_image_ids)
    np.testing.assert_allclose(a.train_voxels, b.train_voxels, atol=0.01)  # int16 rounding of the NIfTI
    assert len(a.train_image_ids) == 360


def test_irregular_world_loads(irregular_world):
    """Rest-run sessions and a subject with fewer sessions, whose shared images are not all seen 3 times."""
    root, _, _ = irregular_world
    design = ExpDesign.read(NSDLayout(root).expdesign())
    short = load_subject(data_cfg(root), 2)
    assert len(short.train_image_ids) == (~design.trials(2, [1]).is_test).sum()
    ids, counts = np.unique(short.test_image_ids, return_counts=True)
    assert np.isin(ids, design.shared_images).all() and counts.min() < 3
    rested = load_subject(data_cfg(root, betas="mindeye_hdf5"), 1)  # session 2 has rest runs
    assert len(rested.train_image_ids) + len(rested.test_image_ids) == 2 * design.trials_per_session


def test_bad_requests_are_reported(tiny_world, tmp_path):
    root, _, _ = tiny_world
    with pytest.raises(ValueError, match="has 5 sessions"):
        load_subject(data_cfg(root), 1, train_sessions=[6])
    with pytest.raises(ValueError, match="unknown betas source"):
        load_subject(data_cfg(root, betas="csv"), 1)
    with pytest.raises(MissingFileError, match="world summary"):
        target_clip_config(data_cfg(tmp_path))


def test_average_by_image_hand_computed():
    values = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]], dtype=np.float32)
    ids, mean = average_by_image(values, np.array([7, 7, 2]))
    np.testing.assert_array_equal(ids, [2, 7])
    np.testing.assert_allclose(mean, [[10.0, 0.0], [2.0, 3.0]])


def test_target_cache_matches_ground_truth_and_computes_once(tiny_world, tmp_path):
    root, _, _ = tiny_world
    targets = build_target_cache(data_cfg(root, cache_dir=str(tmp_path)))
    assert targets.token_shape == (16, 64) and targets.low_level_shape == (3, 16, 16)
    tokens, low = targets.get(np.array([4, 1, 4]))
    with h5py.File(root / "ground_truth/image_tokens.hdf5") as f:
        np.testing.assert_array_equal(tokens, read_rows(f["tokens"], np.array([4, 1, 4])).astype(np.float32))
    assert low.shape == (3, 3, 16, 16) and -1 <= low.min() and low.max() <= 1
    with h5py.File(targets.path) as f:
        assert f["computed"][:].sum() == 2  # only the two images asked for
    # A second cache object on the same key reads what the first computed.
    again = build_target_cache(data_cfg(root, cache_dir=str(tmp_path)))
    assert again.path == targets.path
    np.testing.assert_array_equal(again.get(np.array([1]))[0], tokens[1:2])


def test_target_cache_waits_for_another_process_writing_it(tiny_world, tmp_path):
    """Two runs sharing a data root: one computing targets holds HDF5's lock; the other waits, then reads."""
    root, _, _ = tiny_world
    targets = build_target_cache(data_cfg(root, cache_dir=str(tmp_path)))
    tokens, _ = targets.get(np.array([2, 3]))
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               "f = h5py.File(sys.argv[1], 'a'); print('locked', flush=True); time.sleep(2)",
                               str(targets.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        again, _ = targets.get(np.array([3, 2]))  # blocks on the lock until the holder exits, then reads
    finally:
        holder.wait(30)
    np.testing.assert_array_equal(again, tokens[::-1])


def test_pixel_codec_round_trip_is_a_blurred_image():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (1, 8, 8, 3)), np.ones((1, 8, 8, 1))).astype(np.uint8)  # 64 px blocks
    codec = PixelCodec(latent_size=8)
    latent = codec.encode(smooth)
    assert latent.shape == (1, 3, 8, 8)
    back = codec.decode(torch.from_numpy(latent), image_size=64)[0].permute(1, 2, 0).numpy()
    # Area-downsampling an 8-px block image is exact; at pixel (4, 4) of each block bilinear
    # upsampling keeps weight (15/16)^2 on the block itself, so the error is at most 31/256 of the contrast.
    np.testing.assert_allclose(codec.decode(torch.from_numpy(latent), image_size=8)[0].permute(1, 2, 0).numpy(),
                               smooth[0, ::8, ::8] / 255.0, atol=1e-6)
    np.testing.assert_allclose(back[4::8, 4::8], smooth[0, 4::8, 4::8] / 255.0, atol=31 / 256 + 1e-6)


def test_sd_vae_codec_loads_local_weights_or_says_what_is_missing(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")
    codec = build_latent_codec({"kind": "sd_vae", "weights": str(tmp_path / "vae"), "image_size": 32})
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 16, 16)  # 32 px / 2 with one downsampling stage
    with torch.no_grad():
        x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1,
                                            size=(32, 32), mode="bilinear", antialias=True)
        expected = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    np.testing.assert_allclose(latents, expected.numpy(), atol=1e-5)
    assert codec.decode(torch.from_numpy(latents)).shape == (2, 3, 32, 32)
    with pytest.raises(MissingFileError, match="Stable Diffusion VAE"):
        build_latent_codec({"kind": "sd_vae", "weights": "nobody/no-such-vae"})
    with pytest.raises(ValueError, match="unknown low-level codec"):
        build_latent_codec({"kind": "jpeg"})
