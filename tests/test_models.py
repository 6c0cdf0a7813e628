"""MindEye2 model: configs, factory, shapes (tiny for real, paper sizes on the meta device), parameter
counts, working residual blocks, and the diffusion prior's loss and sampler."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import mindeye.models.prior as prior_module
from mindeye.models import (MindEyeConfig, available_configs, build_model, count_parameters, load_config)
from mindeye.models.prior import (PRIOR_SAMPLERS, cosine_alphas_cumprod, guided_x_start, prior_scheduler,
                                  relative_position_buckets)

TINY_VOXELS = {"subj01": 40, "subj02": 50}
NSD_SUBJ01 = {"subj01": 15724}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", voxels_per_subject=TINY_VOXELS, **overrides)


# --- config and factory -------------------------------------------------------------------------------

def test_config_round_trips_through_json():
    config = load_config("paper")
    data = json.loads(json.dumps(config.to_dict()))
    assert MindEyeConfig.from_dict(data) == config
    assert data["low_level"]["decoder_channels"] == [32, 64, 128]
    assert config.voxels_per_subject == {"subj01": 15724, "subj02": 14278, "subj03": 15226, "subj04": 13153,
                                         "subj05": 13039, "subj06": 17907, "subj07": 12682, "subj08": 14386}


def test_all_yaml_configs_build_with_injected_subjects():
    assert {"paper", "paper_1024", "small", "tiny"} <= set(available_configs())
    for name in available_configs():
        config = load_config(name, voxels_per_subject={"s1": 10})
        assert config.subjects == ["s1"]


def test_configs_without_subjects_ask_for_them():
    with pytest.raises(ValueError, match="voxels_per_subject=..."):
        load_config("small")


def test_overrides_merge_into_sub_configs_and_replace_subjects():
    config = load_config("paper", voxels_per_subject={"x": 7}, clip_tokens=64, prior={"depth": 2})
    assert config.voxels_per_subject == {"x": 7}
    assert (config.clip_tokens, config.prior.depth, config.prior.heads) == (64, 2, 32)


@pytest.mark.parametrize("bad, message", [
    ({"hidden_dimm": 3}, "unknown key"),
    ({"prior": {"depht": 2}}, "unknown key"),
    ({"hidden_dim": 0}, "hidden_dim must be an integer >= 1"),
    ({"dropout": 1.5}, "dropout must be a number in"),
    ({"voxels_per_subject": {"subj.01": 10}}, "no dots"),
    ({"voxels_per_subject": {"subj01": -3}}, "voxels_per_subject"),
    ({"prior": {"rotary_dim": 64}}, "rotary_dim=64 must be even and <= dim_head=52"),
    ({"prior": {"schedule": "linear"}}, "schedule must be 'cosine'"),
    ({"low_level": {"latent_size": 30}}, "latent_size=30 must be divisible by 4"),
    ({"low_level": {"norm_groups": 24}}, "divisible by norm_groups=24"),
])
def test_invalid_configs_are_rejected_with_the_field_named(bad, message):
    with pytest.raises(ValueError, match=message):
        load_config("paper", **bad)


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="available: .*paper"):
        build_model("papr")


# --- shapes and sizes -----------------------------------------------------------------------------------

def test_tiny_forward_shapes():
    model = tiny().eval()
    out = model(torch.randn(3, 50), "subj02")
    assert out.backbone_tokens.shape == (3, 16, 32)
    assert out.retrieval_tokens.shape == (3, 16, 32)
    assert out.low_level_latent.shape == (3, 4, 8, 8)
    assert model.encode_latent(torch.randn(3, 40), "subj01").shape == (3, 64)
    assert list(model.buffers()) == []  # nothing derived is stored: meta-built models load by assignment


def test_low_level_head_can_be_disabled():
    model = tiny(low_level={"enabled": False})
    assert model(torch.randn(2, 40), "subj01").low_level_latent is None
    assert count_parameters(model)["low_level"] == 0


@pytest.mark.parametrize("name, hidden", [("paper", 4096), ("paper_1024", 1024)])
def test_paper_models_shapes_on_meta_device(name, hidden):
    model = build_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    voxels = torch.empty(2, 17907, device="meta")
    assert model.encode_latent(voxels, "subj06").shape == (2, hidden)
    out = model(voxels, "subj06")
    assert out.backbone_tokens.shape == out.retrieval_tokens.shape == (2, 256, 1664)
    assert out.low_level_latent.shape == (2, 4, 28, 28)
    t = torch.zeros(2, dtype=torch.long, device="meta")
    assert model.prior(out.retrieval_tokens, t, out.backbone_tokens).shape == (2, 256, 1664)


def test_paper_parameter_counts():
    """Paper (one subject): ~2.21 B = aligner 64 M + 4096 -> 425,984 linear 1.745 B + prior ~260 M + the rest."""
    counts = count_parameters(build_model("paper", device="meta", voxels_per_subject=NSD_SUBJ01))
    assert counts["aligner"] == 15724 * 4096 + 4096
    token_linear = 4096 * 256 * 1664 + 256 * 1664
    assert token_linear == 1_745_256_448
    assert counts["backbone"] == token_linear + 4 * (2 * (4096 * 4096 + 4096) + 2 * 4096)
    assert counts["prior"] == pytest.approx(260e6, rel=0.01)
    assert counts["total"] == pytest.approx(2.21e9, rel=0.02)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    # all eight NSD subjects: the aligner grows by voxels x 4096 per subject
    counts8 = count_parameters(build_model("paper", device="meta"))
    assert counts8["aligner"] == (15724 + 14278 + 15226 + 13153 + 13039 + 17907 + 12682 + 14386 + 8) * 4096


def test_paper_1024_parameter_count():
    counts = count_parameters(build_model("paper_1024", device="meta", voxels_per_subject=NSD_SUBJ01))
    assert counts["total"] == pytest.approx(0.73e9, rel=0.03)
    assert counts["prior"] == pytest.approx(260e6, rel=0.01)


def test_prior_attention_width_need_not_equal_token_width():
    model = tiny(prior={"heads": 3, "dim_head": 10, "rotary_dim": 8})  # 30 != clip_dim 32: projected
    out = model(torch.randn(2, 40), "subj01")
    assert model.prior.sample(out.backbone_tokens, steps=3).shape == (2, 16, 32)


# --- aligner ---------------------------------------------------------------------------------------------

def test_unknown_subject_names_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown subject 'subj09'.*subj01.*subj02"):
        tiny()(torch.randn(2, 40), "subj09")


def test_wrong_voxel_count_is_rejected():
    with pytest.raises(ValueError, match=r"subject 'subj01' has 40 voxels.*\(2, 50\)"):
        tiny()(torch.randn(2, 50), "subj01")


def test_add_subject_extends_aligner_and_config():
    model = tiny()
    model.add_subject("subj09", 33)
    assert model.config.voxels_per_subject == {**TINY_VOXELS, "subj09": 33}
    assert model(torch.randn(2, 33), "subj09").backbone_tokens.shape == (2, 16, 32)
    with pytest.raises(ValueError, match="already has an aligner"):
        model.add_subject("subj01", 40)


# --- residual blocks -------------------------------------------------------------------------------------

def test_residual_blocks_train_and_change_the_output():
    """The official defect (blocks with no effect, no gradient) is absent."""
    model = tiny().eval()
    voxels = torch.randn(4, 40)
    out = model(voxels, "subj01")
    (out.backbone_tokens.square().mean() + out.low_level_latent.square().mean()).backward()
    for block in model.backbone.blocks:
        for name in ("fc1", "fc2"):
            assert getattr(block, name).weight.grad.abs().sum() > 0, f"{name} got no gradient"
    with torch.no_grad():
        model.backbone.blocks[0].fc1.weight.add_(0.1 * torch.randn_like(model.backbone.blocks[0].fc1.weight))
        changed = model(voxels, "subj01").backbone_tokens
    assert (changed - out.backbone_tokens).abs().max() > 1e-3


def test_residual_blocks_switch_removes_them():
    model = tiny(residual_blocks=False).eval()
    assert len(model.backbone.blocks) == 0
    voxels = torch.randn(2, 40)
    aligned = model.aligner(voxels, "subj01")
    torch.testing.assert_close(model.encode_latent(voxels, "subj01"), aligned)
    expected = model.backbone.to_tokens(aligned).view(2, 16, 32)  # aligner -> one linear
    torch.testing.assert_close(model(voxels, "subj01").backbone_tokens, expected)
    block_parameters = 2 * (64 * 64 + 64) + 2 * 64  # two linears and a LayerNorm at h = 64
    assert count_parameters(tiny())["backbone"] - count_parameters(model)["backbone"] == 4 * block_parameters


# --- diffusion prior -------------------------------------------------------------------------------------

def test_cosine_schedule_matches_closed_form():
    alpha_bar = cosine_alphas_cumprod(100)
    f = lambda t: math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 50, 90):  # before the 0.999 beta clip: alpha-bar_t = f(t + 1) / f(0)
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert alpha_bar[0] > 0.999 and alpha_bar[-1] < 1e-4


def test_relative_position_buckets_follow_dalle2_layout():
    # key 0 is the null key; distance = max(query - (key - 1) - 1, 0) = max(query - key, 0)
    buckets = relative_position_buckets(3, 4, buckets=32, max_distance=128, device=torch.device("cpu"))
    assert buckets.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [2, 1, 0, 0]]
    far = relative_position_buckets(600, 1, buckets=32, max_distance=128, device=torch.device("cpu"))[:, 0]
    assert far[15].item() == 15 and far[16].item() == 16 and far[127].item() == 31 and far[599].item() == 31
    assert torch.all(far[1:] >= far[:-1])


def test_prior_loss_is_finite_and_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    prior = tiny().prior
    brain = torch.randn(8, 16, 32)
    image = torch.tanh(brain @ torch.randn(32, 32) / 32 ** 0.5)  # a learnable brain -> image map

    def held_out_loss() -> float:  # same timesteps, noise and dropout every time
        with torch.no_grad():
            return prior.loss(brain, image, generator=torch.Generator().manual_seed(1)).item()

    before = held_out_loss()
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for _ in range(50):
        loss = prior.loss(brain, image)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.5 * before, (before, after)
    assert after < 0.85 * image.square().mean().item()  # better than predicting zeros: it reads its inputs


def test_prior_conditioning_dropout_uses_null_tokens():
    prior = tiny().prior.eval()
    noisy, brain, t = torch.randn(2, 16, 32), torch.randn(2, 16, 32), torch.tensor([5, 70])
    dropped = prior(noisy, t, brain, torch.tensor([False, True]))
    null_input = torch.stack((prior.null_brain_tokens.detach(), brain[1]))
    torch.testing.assert_close(dropped, prior(noisy, t, null_input))


def test_sample_shape_determinism_and_step_counts():
    model = tiny().eval()
    brain = model(torch.randn(2, 40), "subj01").backbone_tokens.detach()
    a = model.prior.sample(brain, steps=20, generator=torch.Generator().manual_seed(3))
    b = model.prior.sample(brain, steps=20, generator=torch.Generator().manual_seed(3))
    c = model.prior.sample(brain, steps=20, generator=torch.Generator().manual_seed(4))
    assert a.shape == (2, 16, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    full = model.prior.sample(brain, steps=100, generator=torch.Generator().manual_seed(3))
    assert full.shape == (2, 16, 32) and torch.isfinite(full).all()
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\]"):
        model.prior.sample(brain, steps=101)


@pytest.mark.parametrize("sampler", sorted(PRIOR_SAMPLERS))
def test_guidance_scale_zero_is_the_unconditional_prediction(sampler):
    prior = tiny().prior.eval()
    brain = torch.randn(2, 16, 32)

    def sample(tokens, cond_scale):
        return prior.sample(tokens, steps=5, cond_scale=cond_scale, generator=torch.Generator().manual_seed(0),
                            sampler=sampler)

    unconditional = sample(brain, 0.0)
    torch.testing.assert_close(unconditional, sample(prior.null_brain_tokens.detach().expand(2, -1, -1), 1.0))
    assert (sample(brain, 3.0) - sample(brain, 1.0)).abs().max() > 1e-3


# --- the prior's samplers: diffusers schedulers against the hand-written DDIM they replaced ----------------

def old_ddim_loop(prior, brain_tokens, steps=20, cond_scale=1.0, generator=None, times=None):
    """Reference: the hand-written deterministic DDIM DiffusionPrior.sample ran before it used diffusers
    schedulers, kept verbatim except that `times` (descending timesteps) may replace its own
    round(linspace(T - 1, 0, steps)). Each step predicts x_start, derives the noise it implies and moves x
    to the next timestep's noise level; the last step returns x_start."""
    alpha_bar = cosine_alphas_cumprod(prior.config.timesteps)
    if times is None:
        times = torch.linspace(prior.config.timesteps - 1, 0, steps).round().long().tolist()
    x_bnd = torch.randn(brain_tokens.shape, device=brain_tokens.device, dtype=brain_tokens.dtype,
                        generator=generator)
    for t, t_next in zip(times, times[1:] + [None]):
        x_start = guided_x_start(prior, x_bnd, t, brain_tokens, prior.null_brain_tokens, cond_scale)
        if t_next is None:
            break
        a_t, a_next = alpha_bar[t].item(), alpha_bar[t_next].item()
        eps_bnd = (x_bnd - math.sqrt(a_t) * x_start) / math.sqrt(1 - a_t)
        x_bnd = math.sqrt(a_next) * x_start + math.sqrt(1 - a_next) * eps_bnd
    return x_start


@pytest.mark.parametrize("sampler", sorted(PRIOR_SAMPLERS))
@pytest.mark.parametrize("timesteps", [100, 1000])
def test_scheduler_schedule_is_ours(sampler, timesteps):
    """diffusers' squaredcos_cap_v2 is cosine_alphas_cumprod (its float32 copy), so no trained_betas needed."""
    scheduler, _ = prior_scheduler(sampler, timesteps)
    assert scheduler.config.prediction_type == "sample" and scheduler.config.num_train_timesteps == timesteps
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), cosine_alphas_cumprod(timesteps), rtol=0, atol=1e-6)


def test_trailing_timesteps_start_from_pure_noise():
    """Steps 1 and T keep the old loop's timesteps; otherwise evenly spaced from T - 1, ending at T / steps - 1."""
    def timesteps(sampler, steps):
        scheduler, _ = prior_scheduler(sampler, 100)
        scheduler.set_timesteps(steps)
        return scheduler.timesteps.tolist()

    for sampler in PRIOR_SAMPLERS:
        assert timesteps(sampler, 1) == [99]
        assert timesteps(sampler, 100) == list(range(99, -1, -1))
        assert timesteps(sampler, 5) == [99, 79, 59, 39, 19]
        assert timesteps(sampler, 20) == list(range(99, 3, -5))
    old = lambda steps: torch.linspace(99, 0, steps).round().long().tolist()  # noqa: E731
    assert old(5) == [99, 74, 50, 25, 0]  # what the hand-written loop used


def trained_like_prior() -> torch.nn.Module:
    """The tiny prior with its output scaled up, so x_start depends visibly on x, t and the brain."""
    prior = tiny().prior.eval()
    with torch.no_grad():
        prior.project_out.weight.mul_(3.0)
    return prior


@pytest.mark.parametrize("steps", [1, 5, 20, 100])
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_ddim_sampler_equals_the_hand_written_loop(steps, cond_scale, monkeypatch):
    """Same noise, same timesteps -> the same tokens. Steps 1 and 100 are the old loop as it was; for 5 and 20
    the reference walks the scheduler's trailing timesteps (test_trailing_timesteps_start_from_pure_noise).

    In float32 the two differ by rounding only: the scheduler's alphas are float32 (the old loop's float64)
    and the model amplifies 1e-7 differences over the steps, more so with guidance (seen: 1e-4 relative to the
    tokens' scale at 100 guided steps). In float64, with the scheduler given the float64 schedule, the two
    are the same arithmetic, equal to 1e-9."""
    prior = trained_like_prior()
    brain = torch.randn(3, 16, 32)
    scheduler, _ = prior_scheduler("ddim", prior.config.timesteps)
    scheduler.set_timesteps(steps)
    times = None if steps in (1, 100) else scheduler.timesteps.tolist()

    def both(prior, brain):
        expected = old_ddim_loop(prior, brain, steps, cond_scale, torch.Generator().manual_seed(5), times=times)
        got = prior.sample(brain, steps=steps, cond_scale=cond_scale, generator=torch.Generator().manual_seed(5),
                           sampler="ddim")
        return got, expected

    got, expected = both(prior, brain)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-3)
    assert (got - expected).abs().max() < 2e-4 * expected.abs().max()
    if times is not None:  # not the old timesteps: a different (but valid) result than the old loop's
        old = old_ddim_loop(prior, brain, steps, cond_scale, torch.Generator().manual_seed(5))
        assert (got - old).abs().max() > 1e-2

    def float64_schedule(sampler, timesteps):
        scheduler, step_options = prior_scheduler(sampler, timesteps)
        scheduler.alphas_cumprod = cosine_alphas_cumprod(timesteps)
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        return scheduler, step_options

    monkeypatch.setattr(prior_module, "prior_scheduler", float64_schedule)
    got, expected = both(prior.double(), brain.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_dpm_solver_pp_first_order_steps_are_ddim():
    """DPM-Solver++ takes first-order steps (which are DDIM steps) at its start and at its end: with 2 steps it
    is DDIM; with 5, its second-order steps make it differ."""
    prior = trained_like_prior()
    brain = torch.randn(2, 16, 32)

    def sample(sampler, steps):
        return prior.sample(brain, steps=steps, generator=torch.Generator().manual_seed(1), sampler=sampler)

    torch.testing.assert_close(sample("dpmpp", 2), sample("ddim", 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sample("dpmpp", 1), sample("ddim", 1), rtol=1e-5, atol=1e-5)
    five = sample("dpmpp", 5)
    assert five.shape == (2, 16, 32) and torch.isfinite(five).all()
    assert (five - sample("ddim", 5)).abs().max() > 1e-3
    torch.testing.assert_close(five, sample("dpmpp", 5), rtol=0, atol=0)  # deterministic: a fresh scheduler per call


def test_ddim_warns_when_steps_do_not_divide_the_schedule():
    prior = tiny().prior.eval()
    brain = torch.randn(1, 16, 32)
    with pytest.warns(UserWarning, match=r"ddim with 3 steps: .* 100 // 3 = 33 .* 33.33 apart"):
        three = prior.sample(brain, steps=3, sampler="ddim")
    assert three.shape == (1, 16, 32) and torch.isfinite(three).all()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ddim with")
        prior.sample(brain, steps=3, sampler="dpmpp")  # steps between its own timesteps: no warning
        prior.sample(brain, steps=4, sampler="ddim")


def test_unknown_sampler_is_refused_by_name():
    prior = tiny().prior.eval()
    with pytest.raises(ValueError, match=r"unknown prior sampler 'euler'; choose one of ddim, dpmpp"):
        prior.sample(torch.randn(1, 16, 32), steps=2, sampler="euler")


def test_loss_is_the_mean_of_per_row_losses_with_the_same_draws():
    """Training draws the prior's randomness per global batch; the per-row loss must be the model's loss."""
    from mindeye.models.prior import draw_noise

    torch.manual_seed(0)
    prior = build_model("tiny", voxels_per_subject={"subj01": 10}).prior
    brain, image = torch.randn(5, 16, 32), torch.randn(5, 16, 32)
    expected = prior.loss(brain, image, generator=torch.Generator().manual_seed(7))
    draws = draw_noise(5, 16, 32, prior.config.timesteps, prior.config.cond_drop_prob,
                       generator=torch.Generator().manual_seed(7))
    per_row = prior.loss_per_row(brain, image, *draws)
    assert per_row.shape == (5,)
    torch.testing.assert_close(per_row.mean(), expected, rtol=1e-6, atol=1e-7)
