"""The realtime decode backend: z-scoring with the saved calibration, the model's outputs, retrieval, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mindeye.errors import ConfigValueError, MissingFileError
from mindeye.latents import PixelCodec
from mindeye.models import build_model, save_calibration, save_checkpoint
from mindeye.nsd import ExpDesign, NSDLayout, StimulusBrick
from mindeye.targets import build_target_cache
from mindeye.bank import ExactBank
from realtime.backends import DecodeBackend, TorchBackend, candidate_image_ids, noise_seed

VOXELS = {"subj01": 40, "subj02": 50}
TOKENS, DIM = 16, 32  # the tiny config's CLIP token shape

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny model whose low-level head predicts pixel-codec latents (3 x 8 x 8), saved with calibration."""
    torch.manual_seed(0)
    model = build_model("tiny", voxels_per_subject=VOXELS, low_level={"latent_channels": 3}).eval()
    rng = np.random.default_rng(1)
    calibration = {name: (rng.normal(2.0, 1.0, n).astype(np.float32), rng.uniform(0.5, 3.0, n).astype(np.float32))
                   for name, n in VOXELS.items()}
    save_checkpoint(model, tmp_path / "ckpt")
    save_calibration(tmp_path / "ckpt", calibration, units="percent_signal_change", estimator="realtime_glm")
    return tmp_path / "ckpt", model, calibration


@pytest.fixture
def bank():
    rng = np.random.default_rng(2)
    return ExactBank(np.arange(100, 112), rng.normal(size=(12, TOKENS, DIM)).astype(np.float32))


def betas(n_trials: int, n_voxels: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(2.0, 2.0, (n_trials, n_voxels)).astype(np.float32)


def direct_outputs(model, calibration, subject, betas_bv):
    """What the model gives for betas z-scored by hand."""
    mean_v, std_v = calibration[subject]
    with torch.no_grad():
        return model(torch.from_numpy((betas_bv - mean_v) / std_v), subject)


def test_decoded_batch_shapes_and_dtypes(checkpoint, bank):
    path, _, _ = checkpoint
    backend = TorchBackend.from_checkpoint(path, bank=bank, codec=PixelCodec(8), image_size=24, prior_steps=4)
    assert isinstance(backend, DecodeBackend)
    assert backend.subjects() == ["subj01", "subj02"] and backend.n_voxels("subj02") == 50
    out = backend.decode("subj02", betas(3, 50))
    assert out.embedding_norm_b.shape == (3,) and out.embedding_norm_b.dtype == np.float32
    assert out.image_tokens_bld.shape == (3, TOKENS, DIM) and out.image_tokens_bld.dtype == np.float32
    assert out.lowlevel_bhw3.shape == (3, 24, 24, 3) and out.lowlevel_bhw3.dtype == np.uint8
    assert [len(row) for row in out.top_k] == [5, 5, 5]
    assert all(isinstance(i, int) and isinstance(s, float) for row in out.top_k for i, s in row)
    assert out.decode_ms > 0 and out.generate_ms > 0
    np.testing.assert_allclose(out.embedding_norm_b, np.linalg.norm(out.image_tokens_bld.reshape(3, -1), axis=1),
                               rtol=1e-5)


def test_outputs_equal_the_model_on_hand_z_scored_betas(checkpoint, bank):
    path, model, calibration = checkpoint
    backend = TorchBackend.from_checkpoint(path, bank=bank, codec=PixelCodec(8), image_size=16, top_k=12,
                                           prior_steps=3, seed=7)
    b = betas(4, 40)
    out = backend.decode("subj01", b)
    direct = direct_outputs(model, calibration, "subj01", b)
    # Retrieval: the cosine of the hand-computed retrieval tokens with every bank image, ranked.
    predicted = direct.retrieval_tokens.numpy().reshape(4, -1)
    cosine = (predicted / np.linalg.norm(predicted, axis=1, keepdims=True)) @ bank.unit_rows_nf.float().numpy().T
    for row, cos_n in zip(out.top_k, cosine):
        order = np.argsort(-cos_n)
        assert [i for i, _ in row] == (bank.image_ids[order]).tolist()
        np.testing.assert_allclose([s for _, s in row], cos_n[order], atol=1e-5)
    # Prior: the same tokens from the same starting noise.
    generator = torch.Generator().manual_seed(noise_seed(7, "subj01", b))
    expected = model.prior.sample(direct.backbone_tokens, steps=3, generator=generator)
    np.testing.assert_allclose(out.image_tokens_bld, expected.numpy(), atol=1e-5)
    # Low level: the head's latent decoded by the codec, as uint8 pixels.
    pixels = PixelCodec(8).decode(direct.low_level_latent, image_size=16).permute(0, 2, 3, 1).numpy()
    assert np.abs(out.lowlevel_bhw3.astype(int) - (pixels * 255).round()).max() <= 1


def test_without_prior_the_embedding_is_the_retrieval_tokens(checkpoint):
    path, model, calibration = checkpoint
    backend = TorchBackend.from_checkpoint(path, prior_steps=0)
    b = betas(2, 50)
    out = backend.decode("subj02", b)
    direct = direct_outputs(model, calibration, "subj02", b).retrieval_tokens.numpy().reshape(2, -1)
    np.testing.assert_allclose(out.embedding_norm_b, np.linalg.norm(direct, axis=1), rtol=1e-5)
    # Not z-scoring would give other numbers: the check above can fail.
    raw = direct_outputs(model, {"subj02": (np.zeros(50, np.float32), np.ones(50, np.float32))}, "subj02", b)
    assert not np.allclose(out.embedding_norm_b, np.linalg.norm(raw.retrieval_tokens.numpy().reshape(2, -1), axis=1),
                           rtol=1e-3)
    assert out.image_tokens_bld is None and out.lowlevel_bhw3 is None and out.top_k == [[], []]


def test_sampling_is_deterministic_per_batch(checkpoint):
    path, _, _ = checkpoint
    backend = TorchBackend.from_checkpoint(path, prior_steps=4, seed=0)
    b = betas(2, 40)
    first = backend.decode("subj01", b).image_tokens_bld
    backend.decode("subj01", betas(2, 40, seed=9))  # whatever ran in between
    np.testing.assert_array_equal(backend.decode("subj01", b).image_tokens_bld, first)
    again = TorchBackend.from_checkpoint(path, prior_steps=4, seed=0).decode("subj01", b).image_tokens_bld
    np.testing.assert_array_equal(again, first)
    other_seed = TorchBackend.from_checkpoint(path, prior_steps=4, seed=1).decode("subj01", b).image_tokens_bld
    assert np.abs(other_seed - first).max() > 1e-3


def test_prior_sampler_is_passed_to_the_prior_and_validated(checkpoint):
    path, model, calibration = checkpoint
    b = betas(2, 40)
    backend = TorchBackend.from_checkpoint(path, prior_steps=4, prior_sampler="dpmpp", seed=2)
    out = backend.decode("subj01", b)
    direct = direct_outputs(model, calibration, "subj01", b)
    expected = model.prior.sample(direct.backbone_tokens, steps=4, sampler="dpmpp",
                                  generator=torch.Generator().manual_seed(noise_seed(2, "subj01", b)))
    np.testing.assert_allclose(out.image_tokens_bld, expected.numpy(), atol=1e-5)
    ddim = TorchBackend.from_checkpoint(path, prior_steps=4, seed=2).decode("subj01", b).image_tokens_bld
    assert np.abs(ddim - out.image_tokens_bld).max() > 1e-4  # the default is another sampler (ddim)
    with pytest.raises(ValueError, match=r"unknown prior sampler 'plms'; choose one of ddim, dpmpp"):
        TorchBackend.from_checkpoint(path, prior_steps=4, prior_sampler="plms")


def test_bad_input_is_named(checkpoint, bank, tmp_path):
    path, model, calibration = checkpoint
    backend = TorchBackend.from_checkpoint(path, prior_steps=0)
    with pytest.raises(ValueError, match=r"unknown subject 'subj05'.*\['subj01', 'subj02'\]"):
        backend.decode("subj05", betas(1, 40))
    with pytest.raises(ValueError, match=r"\(B >= 1, 40 voxels\), got shape \(2, 50\)"):
        backend.decode("subj01", betas(2, 50))
    bad = betas(3, 40)
    bad[1, 4], bad[2, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"2 NaN/inf values in trials \(rows\) \[1, 2\]"):
        backend.decode("subj01", bad)
    only_one = TorchBackend(model, {"subj01": calibration["subj01"]}, bank=None)
    with pytest.raises(ValueError, match=r"'subj02' has no calibration statistics; decodable subjects: \['subj01'\]"):
        only_one.decode("subj02", betas(1, 50))
    with pytest.raises(ValueError, match=r"calibration of 'subj02' has mean \(45,\).*takes 50 voxels"):
        TorchBackend(model, {**calibration, "subj02": (np.zeros(45), np.ones(45))}, bank=None)
    with pytest.raises(ValueError, match="bank's tokens are"):
        TorchBackend(model, calibration, bank=ExactBank(np.arange(2), np.ones((2, 4, DIM))))
    with pytest.raises(ValueError, match="image_size is required"):
        TorchBackend(model, calibration, bank=None, codec=PixelCodec(8))
    save_checkpoint(model, tmp_path / "no_calibration")
    with pytest.raises(MissingFileError, match="calibration statistics"):
        TorchBackend.from_checkpoint(tmp_path / "no_calibration")
    with pytest.raises(MissingFileError, match="checkpoint config"):
        TorchBackend.from_checkpoint(tmp_path / "nothing_here")


def test_calibration_in_other_units_is_refused_live(checkpoint):
    """MindEye2's per-session z-scored betas (or a file that does not say) are not what the live GLM feeds."""
    path, _, calibration = checkpoint
    save_calibration(path, calibration, units="zscored_per_session", estimator="glmsingle")
    with pytest.raises(ConfigValueError, match=r"zscored_per_session \(glmsingle\); the live service feeds "
                                               r"percent_signal_change .* mindeye-calibrate"):
        TorchBackend.from_checkpoint(path, prior_steps=0)
    from safetensors.numpy import save_file

    save_file({f"{s}.{part}": x for s, (m, sd) in calibration.items() for part, x in (("mean", m), ("std", sd))},
              str(path / "calibration.safetensors"))  # written before units were recorded
    with pytest.raises(ConfigValueError, match=r"betas in unknown \(unknown\)"):
        TorchBackend.from_checkpoint(path, prior_steps=0)
    save_calibration(path, calibration, units="percent_signal_change", estimator="realtime_glm")
    assert TorchBackend.from_checkpoint(path, prior_steps=0).subjects() == list(calibration)


def test_candidates_can_be_every_image_of_the_served_subjects_or_a_stimulus_set(tiny_world, tmp_path):
    root, _, _ = tiny_world
    design = ExpDesign.read(NSDLayout(root).expdesign())
    subj01 = candidate_image_ids(root, "subjects", ["subj01"])
    np.testing.assert_array_equal(subj01, np.unique(design.subject_images[0]))
    assert np.isin(design.shared_images, subj01).all()  # a replayed session's seen image is always a candidate
    both = candidate_image_ids(root, "subjects", ["subj01", "subj02"])
    np.testing.assert_array_equal(both, np.union1d(design.subject_images[0], design.subject_images[1]))
    np.testing.assert_array_equal(candidate_image_ids(root, [5, 3, 5]), [3, 5])  # a visit's stimulus set
    ids_file = tmp_path / "visit_stimuli.txt"
    ids_file.write_text("# stimuli of visit 1\n12 7\n3  # the catch image\n")
    np.testing.assert_array_equal(candidate_image_ids(root, str(ids_file)), [3, 7, 12])
    with pytest.raises(FileNotFoundError, match="file of candidate image ids"):
        candidate_image_ids(root, str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="served subjects"):
        candidate_image_ids(root, "subjects")


def test_candidate_ids_and_bank_from_the_world(tiny_world, tmp_path):
    root, _, _ = tiny_world
    shared = candidate_image_ids(root, "shared")
    np.testing.assert_array_equal(shared, ExpDesign.read(NSDLayout(root).expdesign()).shared_images)
    everything = candidate_image_ids(root, "all")
    np.testing.assert_array_equal(everything, np.arange(len(StimulusBrick(NSDLayout(root).stimuli()))))
    assert np.isin(shared, everything).all() and len(shared) < len(everything)
    with pytest.raises(ValueError, match="one of shared, subjects, all, a list of image ids or a file"):
        candidate_image_ids(root, "test")
    data_cfg = OmegaConf.create({"root": str(root), "cache_dir": str(tmp_path), "clip": "world",
                                 "low_level": {"kind": "pixels", "latent_size": 16}})
    targets = build_target_cache(data_cfg)
    bank = ExactBank.from_targets(targets, shared, dtype=torch.float32)  # scores to float32 rounding
    tokens, _ = targets.get(shared[:3])
    # An image's own tokens retrieve it first, with cosine 1.
    for image_id, ranked in zip(shared[:3], bank.top_k(tokens, 2)):
        assert ranked[0][0] == image_id and ranked[0][1] == pytest.approx(1.0, abs=1e-5)


# --- reconstructions: the prior's tokens through a generator, every decoded trial ------------------------

@pytest.fixture
def tiny_generator(small_generator_cfg):
    """A factory of 8 px generators over the tiny model's token shape (random weights: shapes and plumbing)."""
    from mindeye.generator import build_pipeline

    def make(token_dim: int = DIM):
        torch.manual_seed(0)
        pipe = build_pipeline(small_generator_cfg(cross_attention_dim=token_dim), clip_id="test-encoder",
                              clip_tokens=TOKENS, sampler="euler")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def test_every_decoded_trial_gets_a_reconstruction_blended_with_its_low_level_image(checkpoint, tiny_generator):
    from mindeye.generator import GenerationSettings

    path, _, _ = checkpoint
    pipe = tiny_generator()
    kwargs = dict(bank=None, codec=PixelCodec(8), image_size=24, prior_steps=4, generator=pipe)
    unblended = TorchBackend.from_checkpoint(path, generation=GenerationSettings(2, 1.0, 0.0), **kwargs)
    blended = TorchBackend.from_checkpoint(path, generation=GenerationSettings(2, 1.0, 0.25), **kwargs)
    x = betas(3, 40)
    plain, mixed = unblended.decode("subj01", x), blended.decode("subj01", x)
    assert plain.reconstruction_bhw3.shape == (3, 24, 24, 3) and plain.reconstruction_bhw3.dtype == np.uint8
    # the same trial decodes to the same picture; the blend is 0.75 generated + 0.25 low-level
    np.testing.assert_array_equal(unblended.decode("subj01", x).reconstruction_bhw3, plain.reconstruction_bhw3)
    expected = 0.75 * plain.reconstruction_bhw3 + 0.25 * mixed.lowlevel_bhw3.astype(float)
    assert np.abs(mixed.reconstruction_bhw3 - expected).max() <= 1.5
    # the generator's noise depends on the trial: two different trials do not share it
    assert not np.array_equal(plain.reconstruction_bhw3[0], plain.reconstruction_bhw3[1])


def test_a_generator_needs_the_prior_and_the_models_token_shape(checkpoint, tiny_generator):
    path, _, _ = checkpoint
    with pytest.raises(ValueError, match="a generator needs image tokens: prior_steps >= 1, or readouts"):
        TorchBackend.from_checkpoint(path, bank=None, image_size=24, prior_steps=0, generator=tiny_generator())
    with pytest.raises(ValueError, match="different CLIP encoders"):
        TorchBackend.from_checkpoint(path, bank=None, image_size=24, prior_steps=2,
                                     generator=tiny_generator(token_dim=DIM * 2))


def test_the_refinement_stage_reruns_the_end_of_the_base_models_schedule_over_the_reconstruction(
        checkpoint, tiny_generator):
    from mindeye.generator import GenerationSettings, Refinement, refine

    path, _, _ = checkpoint
    base = tiny_generator()
    calls = []
    base.unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    refinement = Refinement(base, GenerationSettings(steps=4, guidance_scale=1.0, lowlevel_blend=0.0,
                                                     img2img_strength=0.5))
    rng = np.random.default_rng(0)
    tokens, images = rng.normal(size=(3, TOKENS, DIM)).astype(np.float32), rng.integers(0, 256, (3, 24, 24, 3), np.uint8)
    refined = refine(refinement, tokens, images, seed=1)
    assert refined.shape == images.shape and refined.dtype == np.uint8
    assert calls == [3, 3]  # half of a 4-step schedule, one batch of 3
    with pytest.raises(ValueError, match="img2img_strength must be < 1"):
        refine(Refinement(base, GenerationSettings(steps=4)), tokens, images)

    kwargs = dict(bank=None, codec=PixelCodec(8), image_size=24, prior_steps=4, generator=tiny_generator(),
                  generation=GenerationSettings(2, 1.0, 0.25))
    x = betas(2, 40)
    plain = TorchBackend.from_checkpoint(path, **kwargs).decode("subj01", x)
    refined = TorchBackend.from_checkpoint(path, refinement=refinement, **kwargs).decode("subj01", x)
    assert refined.reconstruction_bhw3.shape == plain.reconstruction_bhw3.shape
    assert not np.array_equal(refined.reconstruction_bhw3, plain.reconstruction_bhw3)
    with pytest.raises(ValueError, match="needs a generator"):
        TorchBackend.from_checkpoint(path, bank=None, image_size=24, prior_steps=2, refinement=refinement)
