"""The unCLIP generator (mindeye.generator) and mindeye-train-generator, on a UNet small enough for seconds.

Pipeline: diffusers-format save/load round trip, token checks, MindEye2's classifier-free guidance
(random-token unconditional input), the guidance-embedded student, low-level img2img and blend,
swappable samplers over one training schedule, micro-conditioning. Training: outputs, finite loss,
resume == uninterrupted run, refusal to overwrite a run, the saved generator's encoder identity, and
the scene stream (batch s = scenes s B .. (s + 1) B - 1 of a seed that is not the world's).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mindeye.clip import ClipSpec, clip_identity
from mindeye.config import CONFIG_DIR, load_config
from mindeye.errors import MissingFileError
from mindeye.generator import (
    SAMPLERS,
    MindEyeUnCLIPPipeline,
    TokenMap,
    blend_images,
    blend_with_low_level,
    build_pipeline,
    build_unet,
    load_pipeline,
    make_scheduler,
    micro_conditioning_ids,
    sampler_name,
    to_uint8,
)
from mindeye.generator.pipeline import guidance_embedding
from offline_training.train_generator import diffusion_loss

from conftest import SMALL_UNET, assert_resumed_like_uninterrupted, read_log, unet_weights  # tests/conftest.py

pytestmark = pytest.mark.usefixtures("one_thread")

B, L, D = 2, 4, 8  # batch, CLIP tokens, token width of the small test generator (SMALL_UNET's)
CLIP_ID = "test_vit:random:000000000000"


@pytest.fixture
def pipe(small_cfg):
    torch.manual_seed(0)
    p = build_pipeline(small_cfg, clip_id=CLIP_ID, clip_tokens=L)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def student(small_cfg):
    small_cfg["unet"]["time_cond_proj_dim"] = 8
    torch.manual_seed(0)
    p = build_pipeline(small_cfg, clip_id=CLIP_ID, clip_tokens=L)
    p.set_progress_bar_config(disable=True)
    return p


def tokens(seed: int = 1, batch: int = B) -> torch.Tensor:
    return torch.randn(batch, L, D, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class UNetCalls:
    """Records every UNet call of a pipeline: the inputs (sample, timestep, kwargs) and the output sample."""

    def __init__(self, unet: torch.nn.Module):
        self.inputs, self.outputs = [], []
        unet.register_forward_pre_hook(self._pre, with_kwargs=True)
        unet.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.inputs.append({**kwargs, "sample": sample.clone(), "timestep": timestep})

    def _post(self, module, args, output):
        self.outputs.append(output.sample.clone())

    def __len__(self):
        return len(self.inputs)


def capture_step_inputs(pipe, monkeypatch) -> list[torch.Tensor]:
    """The model outputs the pipeline hands its scheduler (the guided prediction), one per step."""
    seen, step = [], pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    return seen


def corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


# --- build, save, load -------------------------------------------------------------------------------------

def test_save_pretrained_then_load_pipeline_gives_bit_identical_images(pipe, tmp_path):
    x = tokens()
    before = pipe(x, num_inference_steps=3, guidance_scale=3.0, generator=seeded(7), output_type="pt")
    pipe.save_pretrained(tmp_path / "gen")
    index = json.loads((tmp_path / "gen" / "model_index.json").read_text())
    assert index["_class_name"] == "MindEyeUnCLIPPipeline"
    assert index["clip_id"] == CLIP_ID and index["clip_tokens"] == L and index["original_size"] == [64, 64]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "gen" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = load_pipeline(tmp_path / "gen")
    assert type(loaded).__name__ == "MindEyeUnCLIPPipeline" and loaded.config.clip_id == CLIP_ID
    assert loaded.token_shape == (L, D) and loaded.image_size == 8 and sampler_name(loaded.scheduler) == "euler"
    after = loaded(x, num_inference_steps=3, guidance_scale=3.0, generator=seeded(7), output_type="pt")
    assert torch.equal(before.images, after.images) and torch.equal(before.generated, after.generated)
    np_before = pipe(x, num_inference_steps=3, guidance_scale=3.0, generator=seeded(7)).images
    np_after = loaded(x, num_inference_steps=3, guidance_scale=3.0, generator=seeded(7)).images
    assert np_before.dtype == np.uint8 and np_before.shape == (B, 8, 8, 3)
    np.testing.assert_array_equal(np_before, np_after)
    other_seed = loaded(x, num_inference_steps=3, guidance_scale=3.0, generator=seeded(8), output_type="pt").images
    assert not torch.equal(other_seed, after.images)  # the seed matters, so the equality above means something

    dpm = load_pipeline(tmp_path / "gen", sampler="dpmpp")
    assert sampler_name(dpm.scheduler) == "dpmpp"
    assert torch.equal(dpm.scheduler.alphas_cumprod, loaded.scheduler.alphas_cumprod)


def test_load_pipeline_on_a_folder_without_model_index_names_the_file(tmp_path):
    with pytest.raises(MissingFileError, match="model_index.json") as error:
        load_pipeline(tmp_path)
    assert error.value.path == tmp_path / "model_index.json"


def test_tokens_of_the_wrong_shape_nan_tokens_and_another_encoder_are_refused(pipe):
    expected = rf"\(batch, {L}, {D}\)"
    for bad in (torch.randn(B, L + 1, D), torch.randn(B, L, D + 1), torch.randn(L, D)):
        with pytest.raises(ValueError, match=expected):
            pipe(bad, num_inference_steps=1)
    nan = tokens()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pipe(nan, num_inference_steps=1)
    with pytest.raises(ValueError) as error:
        pipe(tokens(), num_inference_steps=1, clip_id="bigG:open_clip_pytorch_model.bin:abcdef012345")
    assert "bigG:open_clip_pytorch_model.bin:abcdef012345" in str(error.value) and CLIP_ID in str(error.value)
    pipe(tokens(), num_inference_steps=1, clip_id=CLIP_ID)  # its own encoder's tokens are fine


def test_build_unet_refuses_added_conditioning_other_than_micro_conditioning(small_cfg):
    unet_cfg = small_cfg["unet"]
    assert build_unet(unet_cfg).config.addition_embed_type == "text_time"
    sdxl_like = {**unet_cfg, "projection_class_embeddings_input_dim": 16 + 32}  # + a pooled text embedding
    no_added = {k: v for k, v in unet_cfg.items() if k not in ("addition_embed_type",)}
    text = {**unet_cfg, "addition_embed_type": "text"}
    for bad in (sdxl_like, no_added, text):
        with pytest.raises(ValueError, match="micro-conditioning only"):
            build_unet(bad)


def test_micro_conditioning_ids_are_size_and_crop_per_row_with_no_pooled_text():
    ids = micro_conditioning_ids(3, (64, 48), (2, 5))
    assert torch.equal(ids["time_ids"], torch.tensor([[64.0, 48.0, 2.0, 5.0]] * 3))
    assert ids["text_embeds"].shape == (3, 0)


# --- the token map ------------------------------------------------------------------------------------------

def test_the_token_map_paints_each_token_into_its_own_patch_in_the_vits_row_major_order():
    token_map = TokenMap(n_tokens=4, token_dim=D, sample_size=8)  # a 2 x 2 grid of 4 x 4 patches
    torch.nn.init.zeros_(token_map.unpatchify.bias)
    for j in range(4):
        only_j = torch.zeros(1, 4, D)
        only_j[0, j] = torch.randn(D, generator=torch.Generator().manual_seed(j))
        painted = token_map(only_j)[0].abs().sum(dim=0) > 0  # (8, 8)
        expected = torch.zeros(8, 8, dtype=torch.bool)
        expected[4 * (j // 2):4 * (j // 2) + 4, 4 * (j % 2):4 * (j % 2) + 4] = True
        assert torch.equal(painted, expected)


def test_a_token_map_needs_a_square_grid_dividing_the_sample_and_the_unet_its_channels(small_cfg):
    for n_tokens, size in ((5, 8), (16, 10)):
        with pytest.raises(ValueError, match="square token grid"):
            TokenMap(n_tokens=n_tokens, token_dim=D, sample_size=size)
    with pytest.raises(ValueError, match="takes 4 tokens"):
        TokenMap(n_tokens=4, token_dim=D, sample_size=8)(torch.zeros(1, 9, D))
    three_channels = build_unet({**small_cfg["unet"], "in_channels": 3})
    with pytest.raises(ValueError, match="needs 6 in, 3 out"):
        MindEyeUnCLIPPipeline(three_channels, make_scheduler("euler", small_cfg["schedule"]),
                              token_map=TokenMap(n_tokens=L, token_dim=D, sample_size=8), clip_id=CLIP_ID)


def test_the_training_loss_adds_the_token_maps_error_on_the_rows_that_kept_their_tokens(pipe, small_cfg):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x, schedule = tokens(batch=4), make_scheduler("ddpm", small_cfg["schedule"])
    losses = {}
    for weight in (0.0, 2.0):
        torch.manual_seed(5)
        losses[weight] = diffusion_loss(pipe, schedule, images, x, cond_drop_prob=0.0, snr_gamma=5.0,
                                        token_map_loss=weight)
    map_error = torch.nn.functional.mse_loss(pipe.token_map(x), pipe.encode_images(images))
    torch.testing.assert_close(losses[2.0] - losses[0.0], 2.0 * map_error)
    torch.manual_seed(5)
    all_dropped = diffusion_loss(pipe, schedule, images, x, cond_drop_prob=1.0, snr_gamma=5.0, token_map_loss=2.0)
    torch.manual_seed(5)
    assert all_dropped == diffusion_loss(pipe, schedule, images, x, cond_drop_prob=1.0, snr_gamma=5.0)


# --- classifier-free guidance and the student ---------------------------------------------------------------

def test_guidance_scale_one_calls_the_unet_once_per_step_on_the_conditional_tokens(pipe, monkeypatch):
    x = tokens()
    calls, guided = UNetCalls(pipe.unet), capture_step_inputs(pipe, monkeypatch)
    pipe(x, num_inference_steps=3, guidance_scale=1.0, generator=seeded())
    assert len(calls) == 3 and len(guided) == 3
    for call, output, prediction in zip(calls.inputs, calls.outputs, guided):
        assert call["sample"].shape[0] == B and torch.equal(call["encoder_hidden_states"], x)
        assert call["timestep_cond"] is None
        assert torch.equal(call["added_cond_kwargs"]["time_ids"], torch.tensor([[64.0, 64.0, 0.0, 0.0]] * B))
        assert torch.equal(prediction, output)  # no guidance: the UNet's prediction as it is


def test_guidance_doubles_the_batch_with_random_unconditional_tokens_and_extrapolates(pipe, monkeypatch):
    x, g = tokens(), 4.0
    calls, guided = UNetCalls(pipe.unet), capture_step_inputs(pipe, monkeypatch)
    pipe(x, num_inference_steps=3, guidance_scale=g, generator=seeded(0))
    assert len(calls) == 3 and len(guided) == 3
    uncond_tokens = calls.inputs[0]["encoder_hidden_states"][:B]
    for call, output, prediction in zip(calls.inputs, calls.outputs, guided):
        context = call["encoder_hidden_states"]
        assert context.shape == (2 * B, L, D) and call["sample"].shape[0] == 2 * B
        assert torch.equal(context[B:], x)  # second half: the conditional tokens
        assert torch.equal(context[:B], uncond_tokens)  # the same random tokens at every step
        noisy, token_maps = call["sample"][:, :3], call["sample"][:, 3:]
        assert torch.equal(noisy[:B], noisy[B:])  # both halves denoise the same latents
        assert torch.equal(token_maps, pipe.token_map(context))  # each half with its own tokens' map
        assert call["added_cond_kwargs"]["time_ids"].shape == (2 * B, 4)
        uncond, cond = output.chunk(2)
        torch.testing.assert_close(prediction, uncond + g * (cond - uncond), rtol=0, atol=1e-6)
        assert not torch.allclose(prediction, cond)  # guidance did change the prediction
    # MindEye2's unconditional input: random normal tokens, not zeros and not the conditional ones
    assert uncond_tokens.abs().min() > 0 and not torch.allclose(uncond_tokens, x)
    assert abs(float(uncond_tokens.mean())) < 0.5 and 0.6 < float(uncond_tokens.std()) < 1.4
    calls.inputs.clear()
    pipe(x, num_inference_steps=1, guidance_scale=g, generator=seeded(1))
    assert not torch.equal(calls.inputs[0]["encoder_hidden_states"][:B], uncond_tokens)  # drawn, not a fixed null


def test_a_student_takes_the_guidance_scale_as_an_embedding_in_one_call_per_step(student):
    assert student.is_student
    x, w = tokens(), 4.0
    calls = UNetCalls(student.unet)
    guided = student(x, num_inference_steps=3, guidance_scale=w, generator=seeded(), output_type="pt").images
    assert len(calls) == 3
    expected = guidance_embedding(torch.full((B,), w), 8)
    assert expected.shape == (B, 8)
    for call in calls.inputs:
        assert call["sample"].shape[0] == B and torch.equal(call["encoder_hidden_states"], x)
        torch.testing.assert_close(call["timestep_cond"], expected, rtol=0, atol=0)
    unguided = student(x, num_inference_steps=3, guidance_scale=1.0, generator=seeded(), output_type="pt").images
    assert not torch.equal(calls.inputs[-1]["timestep_cond"], expected)
    assert not torch.equal(guided, unguided)  # the UNet does read the embedding
    # the embedding: sin / cos of (w - 1) * 1000 over geometric frequencies; w = 1 -> sin 0, cos 1
    one = guidance_embedding(torch.tensor([1.0]), 8)
    torch.testing.assert_close(one, torch.tensor([[0.0] * 4 + [1.0] * 4]))
    assert float(expected[0, 0]) == pytest.approx(math.sin(3000.0), abs=1e-4)


# --- the low-level image: img2img start, final blend, output size -------------------------------------------

def test_lowlevel_blend_mixes_the_generated_images_with_the_resized_low_level_images(pipe):
    x, w = tokens(), 0.25
    low = torch.rand(B, 3, 8, 8, generator=seeded(3))  # already at the generator's size: no resampling
    plain = pipe(x, num_inference_steps=2, guidance_scale=1.0, generator=seeded())
    out = pipe(x, num_inference_steps=2, guidance_scale=1.0, generator=seeded(), low_level_images=low,
               lowlevel_blend=w)
    np.testing.assert_array_equal(out.generated, plain.images)  # strength 1: the blend comes after generation
    low_hwc = low.permute(0, 2, 3, 1).numpy()
    expected = np.round(((1 - w) * out.generated / 255.0 + w * low_hwc) * 255)
    assert np.abs(out.images.astype(int) - expected).max() <= 1
    assert np.abs(out.images.astype(int) - out.generated.astype(int)).max() > 10  # the blend did something

    colour = torch.tensor([0.9, 0.1, 0.5]).view(1, 3, 1, 1)
    flat = colour.expand(B, 3, 32, 32)  # a larger low-level image: resized to the output, a flat one stays flat
    out = pipe(x, num_inference_steps=2, guidance_scale=1.0, generator=seeded(), low_level_images=flat,
               lowlevel_blend=w, output_size=16)
    assert out.images.shape == out.generated.shape == (B, 16, 16, 3)
    expected = np.round(((1 - w) * out.generated / 255.0 + w * colour.view(3).numpy()) * 255)
    assert np.abs(out.images.astype(int) - expected).max() <= 1


def test_reblending_saved_pictures_matches_the_pipelines_blend_to_one_grey_level():
    rng = np.random.default_rng(0)
    generated_b3hw = torch.from_numpy(rng.random((3, 3, 16, 16), dtype=np.float32))
    blurry_nhwc = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    blurry_b3hw = torch.from_numpy(blurry_nhwc).permute(0, 3, 1, 2).float() / 255.0
    for weight in (0.25, 0.5):
        in_pipeline = to_uint8(blend_with_low_level(generated_b3hw, blurry_b3hw, weight)).astype(int)
        from_saved = blend_images(to_uint8(generated_b3hw), blurry_nhwc, weight).astype(int)
        assert from_saved.shape == (3, 16, 16, 3) and np.abs(from_saved - in_pipeline).max() <= 1
        assert np.abs(from_saved - to_uint8(generated_b3hw).astype(int)).mean() > 10  # the weight is applied


def test_output_size_resizes_the_images(pipe):
    out = pipe(tokens(), num_inference_steps=2, guidance_scale=1.0, generator=seeded(), output_size=20,
               output_type="pt")
    assert out.images.shape == (B, 3, 20, 20) and float(out.images.min()) >= 0 and float(out.images.max()) <= 1
    native = pipe(tokens(), num_inference_steps=2, guidance_scale=1.0, generator=seeded(), output_type="pt").images
    assert native.shape == (B, 3, 8, 8)


def test_strength_below_one_runs_the_end_of_the_schedule_from_the_low_level_image(pipe):
    x = tokens()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    low = torch.stack([xx, yy, 1 - xx]).expand(B, 3, 16, 16).clone()  # high-contrast gradients
    low[1] = 1 - low[1]
    calls = UNetCalls(pipe.unet)
    pipe(x, num_inference_steps=4, guidance_scale=1.0, generator=seeded(), low_level_images=low)
    assert len(calls) == 4  # strength 1: the low-level image is not the start
    calls.inputs.clear()
    pipe(x, num_inference_steps=4, guidance_scale=1.0, generator=seeded(), low_level_images=low, strength=0.5)
    assert len(calls) == 2
    first_t = pipe.scheduler.timesteps[2]
    assert float(calls.inputs[0]["timestep"]) == float(first_t)  # the last half of the same schedule
    calls.inputs.clear()
    near = pipe(x, num_inference_steps=50, guidance_scale=1.0, generator=seeded(), low_level_images=low,
                strength=0.02)  # only the last of 50 steps
    assert len(calls) == 1
    low_8 = pipe.encode_images(low)  # the low-level image where the UNet works: 8 px, [-1, 1]
    assert corr(calls.inputs[0]["sample"][:, :3], low_8) > 0.9  # the noised low-level image is the start
    assert corr(near.images, low_8.permute(0, 2, 3, 1)) > 0.9
    far = pipe(x, num_inference_steps=4, guidance_scale=1.0, generator=seeded()).images
    assert abs(corr(far, low_8.permute(0, 2, 3, 1))) < 0.5  # from noise, nothing of the low-level image
    for bad in ({"strength": 0.0, "low_level_images": low}, {"strength": 0.5},
                {"lowlevel_blend": 0.3}, {"lowlevel_blend": 1.5, "low_level_images": low}):
        with pytest.raises(ValueError):
            pipe(x, num_inference_steps=2, **bad)


# --- samplers ----------------------------------------------------------------------------------------------

def test_every_sampler_runs_and_swapping_samplers_keeps_the_training_schedule(pipe, small_cfg):
    x = tokens()
    training = make_scheduler("ddpm", small_cfg["schedule"])
    assert set(SAMPLERS) >= {"euler", "euler_karras", "dpmpp", "ddim", "lcm", "ddpm"}
    for name in SAMPLERS:
        pipe.scheduler = make_scheduler(name, pipe.scheduler)  # from the previous sampler, not the mapping
        assert sampler_name(pipe.scheduler) == name
        assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        torch.testing.assert_close(pipe.scheduler.alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
        out = pipe(x, num_inference_steps=3, guidance_scale=2.0, generator=seeded(), output_type="pt")
        assert out.images.shape == (B, 3, 8, 8) and torch.isfinite(out.images).all(), name


def test_make_scheduler_refuses_unknown_samplers_and_unknown_schedule_keys(small_cfg):
    with pytest.raises(ValueError, match="unknown sampler 'heun'") as error:
        make_scheduler("heun", small_cfg["schedule"])
    assert "euler" in str(error.value) and "dpmpp" in str(error.value)
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_scheduler("euler", {**small_cfg["schedule"], "timestep_spacing": "leading"})
    with pytest.raises(ValueError, match="beta_shedule"):
        make_scheduler("euler", {"num_train_timesteps": 1000, "beta_shedule": "linear"})


# --- the encoder identity ----------------------------------------------------------------------------------

def test_clip_identity_names_one_encoder_and_only_that_one():
    from omegaconf import OmegaConf

    tiny = OmegaConf.load(CONFIG_DIR / "clip" / "tiny_vit.yaml")
    small = OmegaConf.load(CONFIG_DIR / "clip" / "small_vit.yaml")
    assert clip_identity(tiny) == clip_identity(OmegaConf.load(CONFIG_DIR / "clip" / "tiny_vit.yaml"))
    assert clip_identity(tiny) == clip_identity(ClipSpec.from_config(tiny))
    assert clip_identity(tiny).startswith("tiny_vit:random:")
    assert clip_identity(tiny) != clip_identity(small)
    reseeded = OmegaConf.merge(tiny, {"seed": 1})  # same architecture, other random weights: another encoder
    assert clip_identity(reseeded) != clip_identity(tiny)


@pytest.mark.parametrize("generator, world", [("tiny", "tiny"), ("small", "small"), ("small_32px", "small")])
def test_each_world_generator_draws_an_image_from_its_worlds_tokens(generator, world):
    from mindeye.clip import build_clip_embedder

    cfg = load_config("train_generator", [f"world={world}", f"generator={generator}"])
    embedder = build_clip_embedder(cfg.world.clip)
    pipe = build_pipeline(cfg.generator, clip_id=clip_identity(cfg.world.clip), clip_tokens=embedder.n_tokens)
    images = torch.rand(2, 3, cfg.world.image_size, cfg.world.image_size)
    with torch.no_grad():
        tokens_bld = embedder(images)
        out = pipe(tokens_bld, num_inference_steps=1, guidance_scale=3.0, generator=seeded(0), output_type="pt")
    size = cfg.generator.unet.sample_size * (8 if cfg.generator.vae else 1)
    assert tuple(out.images.shape) == (2, 3, size, size) and torch.isfinite(out.images).all()
    assert pipe.unet.config.cross_attention_dim == tokens_bld.shape[-1]


# --- mindeye-train-generator -------------------------------------------------------------------------------

def train_overrides(out_dir, *extra: str) -> list[str]:
    unet = [f"generator.unet.{key}={json.dumps(value).replace(' ', '').replace(chr(34), '')}"
            for key, value in SMALL_UNET.items() if key not in ("cross_attention_dim", "norm_num_groups")]
    return [f"out_dir={out_dir}", "steps=4", "batch_size=2", "loader_workers=0", "progress=false", "cpu=true",
            "log_every=1", "save_every=2", "sample_every=2", "warmup_steps=8", "lr=5e-2",
            "+generator.unet.norm_num_groups=4", "generator.sampling.steps=2", *unet, *extra]


def train_run(out_dir, *extra: str):
    from offline_training.train_generator import train_generator

    cfg = load_config("train_generator", train_overrides(out_dir, *extra))
    return cfg, train_generator(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 4-step run of the small generator on the tiny world's encoder: (cfg, out_dir)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the per-test one_thread fixture does not reach here
    out_dir = tmp_path_factory.mktemp("generator") / "run"
    cfg, generator_dir = train_run(out_dir)
    assert generator_dir == out_dir / "generator"
    yield cfg, out_dir
    torch.set_num_threads(previous)


def test_training_writes_the_generator_log_loss_curve_and_samples_with_a_finite_loss(trained):
    cfg, out_dir = trained
    assert cfg.generator.unet.cross_attention_dim == cfg.world.clip.vision.width  # the tiny world's tokens
    assert (out_dir / "generator" / "model_index.json").is_file()
    assert (out_dir / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert (out_dir / "run_config.yaml").is_file() and (out_dir / "train_state" / "progress.json").is_file()
    log = read_log(out_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    # all 4 steps in the linear warm-up, whose lr does not depend on `steps` (the cosine after it does), so a
    # 2-step run extended to 4 can follow the 4-step run exactly
    assert [r["lr"] for r in log] == pytest.approx([cfg.lr * k / cfg.warmup_steps for k in (1, 2, 3, 4)])


def test_the_trained_generator_loads_and_names_the_world_encoder(trained):
    from mindeye.clip import build_clip_embedder
    from mindeye.scenes import paint_scene, sample_scene

    cfg, out_dir = trained
    pipe = load_pipeline(out_dir / "generator")
    assert pipe.config.clip_id == clip_identity(cfg.world.clip)
    embedder = build_clip_embedder(cfg.world.clip)
    assert pipe.token_shape == (embedder.n_tokens, embedder.dim) == (16, 64)
    scene = paint_scene(sample_scene(5, 0), cfg.world.image_size)
    x = embedder(torch.from_numpy(scene[None]).permute(0, 3, 1, 2))
    out = pipe(x, num_inference_steps=2, guidance_scale=2.0, generator=seeded(), clip_id=clip_identity(cfg.world.clip))
    assert out.images.shape == (1, 8, 8, 3)
    small_world_clip = clip_identity(load_config("train_generator", ["world=small"]).world.clip)
    with pytest.raises(ValueError, match="small_vit"):
        pipe(x, num_inference_steps=1, clip_id=small_world_clip)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(trained, tmp_path):
    _, full_dir = trained
    split_dir = tmp_path / "split"
    train_run(split_dir, "steps=2")
    halfway = unet_weights(split_dir / "generator")
    train_run(split_dir, "resume=true")
    assert [r["step"] for r in read_log(split_dir)] == [1, 2, 3, 4]
    assert_resumed_like_uninterrupted(split_dir, full_dir, "generator", halfway)
    resumed_raw = load_file(split_dir / "train_state" / "model.safetensors")
    full_raw = load_file(full_dir / "train_state" / "model.safetensors")
    for key in full_raw:
        torch.testing.assert_close(resumed_raw[key], full_raw[key], rtol=0, atol=1e-6, msg=key)


def test_a_second_start_without_resume_refuses_to_overwrite_the_run(trained):
    _, out_dir = trained
    before = (out_dir / "generator" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="resume=true"):
        train_run(out_dir)
    assert (out_dir / "generator" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert [r["step"] for r in read_log(out_dir)] == [1, 2, 3, 4]


def test_scene_batches_are_consecutive_scenes_of_the_training_seed_not_the_world_stimuli():
    from mindeye.scenes import SceneBatches, paint_scene, sample_scene

    batches = iter(SceneBatches(seed=11, size=16, batch_size=3, first_batch=2))
    for s in (2, 3):
        batch = next(batches)
        assert batch.dtype == np.uint8 and batch.shape == (3, 16, 16, 3)
        for row, i in enumerate(range(s * 3, (s + 1) * 3)):
            np.testing.assert_array_equal(batch[row], paint_scene(sample_scene(11, i), 16))

    cfg = load_config("train_generator")
    assert cfg.scene_seed != cfg.world.seed and cfg.scene_seed + 1 != cfg.world.seed
    size = cfg.world.image_size
    training = next(iter(SceneBatches(cfg.scene_seed, size, 6, 0))).astype(int)
    world = np.stack([paint_scene(sample_scene(cfg.world.seed, i), size) for i in range(6)]).astype(int)
    distance = np.abs(training[:, None] - world[None]).mean(axis=(2, 3, 4))  # (training, world) mean |diff|
    assert distance.min() > 5  # no training scene is one of the world's stimuli
