"""Export bundles without ONNX: the manifest's checks, the runtime's prior sampler and generator over graphs,
an eager bundle decoding exactly as the checkpoint does, and what export and load refuse."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.cli import export_bundle
from mindeye.bundle import (PRIOR_DENOISER, TorchGraphs, available_backends, generator_graphs, load_graphs,
                            model_graphs, read_manifest, sample_prior)
from mindeye.bundle.generator import graph_pipeline
from mindeye.errors import ConfigValueError, FormatError, MissingFileError
from mindeye.generator import GenerationSettings, build_pipeline, reconstruct
from mindeye.latents import PixelCodec
from mindeye.models import build_model, save_calibration, save_checkpoint
from realtime.backends import TorchBackend, load_backend

VOXELS = {"subj01": 40, "subj02": 50}
TOKENS, DIM = 16, 32  # the tiny config's CLIP token shape
CLIP_ID = "test-encoder"

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny(path, units="percent_signal_change"):
    torch.manual_seed(0)
    model = build_model("tiny", voxels_per_subject=VOXELS, low_level={"latent_channels": 3}).eval()
    rng = np.random.default_rng(1)
    calibration = {name: (rng.normal(2.0, 1.0, n).astype(np.float32), rng.uniform(0.5, 3.0, n).astype(np.float32))
                   for name, n in VOXELS.items()}
    save_checkpoint(model, path)
    save_calibration(path, calibration, units=units, estimator="realtime_glm")
    return path, model


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny(tmp_path / "ckpt")


@pytest.fixture
def generator_dir(tmp_path, small_generator_cfg):
    """An 8 px student-shaped generator (guidance embedding) over the tiny token shape, saved; random weights."""
    torch.manual_seed(0)
    pipe = build_pipeline(small_generator_cfg(cross_attention_dim=DIM, time_cond_proj_dim=16), clip_id=CLIP_ID,
                          clip_tokens=TOKENS, sampler="lcm")
    pipe.save_pretrained(tmp_path / "gen")
    return tmp_path / "gen"


def betas(n_trials: int, n_voxels: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(2.0, 2.0, (n_trials, n_voxels)).astype(np.float32)


@pytest.mark.parametrize("sampler,steps,cond_scale", [("ddim", 4, 1.0), ("dpmpp", 7, 1.0), ("dpmpp", 15, 1.0),
                                                      ("dpmpp", 7, 3.0)])
def test_the_runtime_sampler_over_the_eager_denoiser_gives_the_priors_own_samples(sampler, steps, cond_scale):
    """Guided too: the conditional graph on the null brain tokens is the prior's unconditional branch."""
    from mindeye.bundle.sampling import step_coefficients

    model = build_model("tiny", voxels_per_subject=VOXELS).eval()
    graphs = TorchGraphs(model_graphs(model, ["subj01"]))
    brain = torch.randn(3, TOKENS, DIM)
    want = model.prior.sample(brain, steps=steps, sampler=sampler, cond_scale=cond_scale,
                              generator=torch.Generator().manual_seed(5))
    got = sample_prior(lambda x, t, b: graphs(PRIOR_DENOISER, x, t, b)[0], brain, steps=steps, sampler=sampler,
                       timesteps=model.config.prior.timesteps, generator=torch.Generator().manual_seed(5),
                       cond_scale=cond_scale, null_brain_ld=model.prior.null_brain_tokens.detach())
    # the scheduler's own steps, to float32 rounding, which guidance's uncond + s (cond - uncond) scales by up to 2s - 1
    torch.testing.assert_close(got, want, rtol=0, atol=5e-5 * (2 * cond_scale - 1))
    if cond_scale != 1.0:
        unguided = model.prior.sample(brain, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(5))
        assert (got - unguided).abs().max() > 1e-2
        with pytest.raises(ValueError, match="null brain tokens"):
            sample_prior(lambda x, t, b: x, brain, steps=steps, sampler=sampler, timesteps=100, cond_scale=cond_scale)
    _, coefficients = step_coefficients(sampler, model.config.prior.timesteps, steps)
    # DDIM uses no history; DPM-Solver++(2M) does after its first-order first step
    assert (coefficients[:, 2] == 0).all() == (sampler == "ddim") and coefficients[0, 2] == 0


def test_the_generator_over_graphs_makes_the_pipelines_own_images(generator_dir):
    from mindeye.generator import load_pipeline

    pipe = load_pipeline(generator_dir)
    over_graphs = graph_pipeline(generator_dir, TorchGraphs(generator_graphs(pipe)))
    assert over_graphs.is_student and over_graphs.image_size == pipe.image_size
    tokens = torch.randn(2, TOKENS, DIM)
    settings = GenerationSettings(steps=3, guidance_scale=2.0, lowlevel_blend=0.0)
    np.testing.assert_array_equal(reconstruct(over_graphs, tokens, settings=settings, seed=4).images,
                                  reconstruct(pipe, tokens, settings=settings, seed=4).images)


def test_an_eager_bundle_decodes_exactly_as_its_checkpoint(checkpoint, generator_dir, tmp_path):
    path, model = checkpoint
    bundle = export_bundle(path, tmp_path / "bundle", clip_id=CLIP_ID, generator=generator_dir, backend="eager",
                           subjects=["subj02"])
    manifest = bundle.manifest
    assert (manifest["format"], manifest["format_version"], manifest["backend"]) == ("mindeye2-bundle", 1, "eager")
    assert manifest["subjects"] == {"subj02": {"n_voxels": 50}} and manifest["graphs"] == {}
    assert manifest["calibration"]["units"] == "percent_signal_change"
    assert manifest["calibration"]["statistics"]["subj02"]["n_voxels"] == 50
    assert manifest["clip"] == {"identity": CLIP_ID, "tokens": TOKENS, "dim": DIM}
    assert manifest["generator"]["is_student"] and manifest["generator"]["image_size"] == 8
    heads = manifest["interface"]["heads.subj02"]
    assert heads["inputs"] == [{"name": "voxels", "shape": ["batch", 50], "dtype": "float32"}]
    assert [o["shape"] for o in heads["outputs"]] == [["batch", TOKENS, DIM]] * 2 + [["batch", 3, 8, 8]]
    assert list(manifest["interface"]) == ["heads.subj02", "prior_denoiser", "generator_unet"]
    assert available_backends(bundle) == ["eager"]

    kwargs = dict(codec=PixelCodec(8), image_size=16, prior_steps=4, prior_sampler="dpmpp", prior_cond_scale=3.0,
                  generation=GenerationSettings(2, 2.0, 0.25))
    from mindeye.generator import load_pipeline

    loaded = load_backend(bundle.root, "auto", **kwargs)
    direct = TorchBackend.from_checkpoint(path, generator=load_pipeline(generator_dir), **kwargs)
    assert loaded.name == "eager" and loaded.subjects() == ["subj02"]
    x = betas(3, 50)
    got, want = loaded.decode("subj02", x), direct.decode("subj02", x)
    np.testing.assert_array_equal(got.image_tokens_bld, want.image_tokens_bld)  # guided: the bundle's null tokens
    unguided = TorchBackend.from_checkpoint(path, **{**kwargs, "prior_cond_scale": 1.0}).decode("subj02", x)
    assert np.abs(unguided.image_tokens_bld - want.image_tokens_bld).max() > 1e-2
    np.testing.assert_array_equal(got.lowlevel_bhw3, want.lowlevel_bhw3)
    np.testing.assert_array_equal(got.reconstruction_bhw3, want.reconstruction_bhw3)
    with pytest.raises(ValueError, match=r"unknown subject 'subj01'|no calibration"):
        loaded.decode("subj01", betas(1, 40))
    with pytest.raises(ConfigValueError, match="holds no ONNX graphs.*mindeye-export backend=onnxruntime"):
        load_graphs(bundle, "onnxruntime")


def test_the_manifest_refuses_a_changed_file_another_version_and_a_checkpoint(checkpoint, tmp_path):
    path, _ = checkpoint
    root = export_bundle(path, tmp_path / "bundle", clip_id=CLIP_ID, backend="eager").root
    with pytest.raises(MissingFileError, match=r"manifest.json \(.* is a checkpoint, not a bundle: make one with "
                                               r"mindeye-export checkpoint="):
        read_manifest(path)
    calibration = root / "checkpoint" / "calibration.safetensors"
    calibration.write_bytes(calibration.read_bytes()[:-4])
    with pytest.raises(FormatError, match=r"calibration.safetensors: sha256 should be .* changed or truncated"):
        read_manifest(root)
    assert read_manifest(root, verify_hashes=False).subjects == VOXELS
    calibration.unlink()
    with pytest.raises(MissingFileError, match="calibration.safetensors"):
        read_manifest(root, verify_hashes=False)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(FormatError, match=r"format_version should be 1 \(this code's\), found 99: re-export"):
        read_manifest(root)


def test_export_refuses_offline_units_another_encoders_generator_and_an_occupied_folder(checkpoint, generator_dir,
                                                                                         tmp_path):
    from mindeye.errors import OutDirInUse
    from mindeye.generator import EncoderMismatch

    path, _ = checkpoint
    offline, _ = save_tiny(tmp_path / "offline", units="zscored_per_session")
    with pytest.raises(ConfigValueError, match="zscored_per_session .* Make a live calibration first: "
                                               "mindeye-calibrate"):
        export_bundle(offline, tmp_path / "a", clip_id=CLIP_ID, backend="eager")
    with pytest.raises(EncoderMismatch, match="trained on tokens of CLIP encoder 'test-encoder'"):
        export_bundle(path, tmp_path / "b", clip_id="another-encoder", generator=generator_dir, backend="eager")
    with pytest.raises(ConfigValueError, match=r"subjects \['subj09'\] cannot be exported"):
        export_bundle(path, tmp_path / "c", clip_id=CLIP_ID, backend="eager", subjects=["subj09"])
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abc")
    export_bundle(path, tmp_path / "d", clip_id=CLIP_ID, backend="eager")
    with pytest.raises(OutDirInUse, match="holds a bundle already; pass overwrite=true"):
        export_bundle(path, tmp_path / "d", clip_id=CLIP_ID, backend="eager")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(OutDirInUse, match="holds files that are not a bundle"):
        export_bundle(path, tmp_path / "e", clip_id=CLIP_ID, backend="eager", overwrite=True)
    assert (tmp_path / "e" / "notes.txt").read_text() == "mine"


def test_the_service_refuses_a_bundle_of_another_clip_encoder(tiny_world, checkpoint, tmp_path):
    from mindeye.config import load_config
    from realtime.cli import build_service

    path, _ = checkpoint
    root = export_bundle(path, tmp_path / "bundle", clip_id="another-encoder", backend="eager").root
    cfg = load_config("realtime", [f"bundle={root}", f"data.root={tiny_world[0]}", "viewer.enabled=false"])
    with pytest.raises(ConfigValueError, match="predicts tokens of CLIP encoder 'another-encoder', the data's "
                                               "retrieval candidates are 'tiny_vit"):
        build_service(cfg)
