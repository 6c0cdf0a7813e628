"""mindeye-distill (export.distill): LCM consistency distillation of the unCLIP generator, at a size of seconds.

The parts: the student (the teacher plus a zero-initialised guidance embedding), LCM's boundary condition
(checked against diffusers' LCMScheduler, the student's sampler), the clean image and noise implied by an
eps or v output, and the consistency loss (exactly consistent teacher -> ~0 loss). End to end: outputs,
a student that load_pipeline reads and samples in 1-4 steps, resume == uninterrupted run, refusal to
overwrite a run, refusal of a student teacher and of another encoder's teacher, and LoRA (few trainable
parameters, merged into a plain UNet at save time).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                       UNet2DConditionModel)

from export.distill import (
    LORA_TARGETS,
    ConsistencyDistiller,
    ProgressiveDistiller,
    ReflowDistiller,
    boundary_scalings,
    distill,
    make_student,
    segment_target,
    x0_and_eps,
)
from mindeye.clip import build_clip_embedder, clip_identity
from mindeye.config import load_config
from mindeye.generator import build_pipeline, count_parameters, load_pipeline, make_scheduler, micro_conditioning_ids
from mindeye.generator.pipeline import guidance_embedding

from conftest import assert_resumed_like_uninterrupted, read_log, torch_threads, unet_weights

B, W = 2, 8  # batch; width of the student's guidance embedding (time_cond_proj_dim)
GRID = 20  # the teacher's 1000 training steps / ddim_timesteps (50): the LCM grid is 19, 39, ..., 999


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (module scope: the distillation runs are module fixtures)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def world():
    """The distillation config's world (tiny): its encoder's identity and token shape."""
    cfg = load_config("distill").world
    embedder = build_clip_embedder(cfg.clip)
    return cfg, clip_identity(cfg.clip), embedder.n_tokens, embedder.dim


def save_teacher(path, small_generator_cfg, *, clip_id: str, tokens: tuple[int, int], seed: int = 0):
    """A freshly initialised small generator (v prediction, cosine schedule) saved as a teacher folder."""
    n_tokens, dim = tokens
    torch.manual_seed(seed)
    pipe = build_pipeline(small_generator_cfg(cross_attention_dim=dim), clip_id=clip_id, clip_tokens=n_tokens)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, small_generator_cfg, world):
    _, clip_id, n_tokens, dim = world
    return save_teacher(tmp_path_factory.mktemp("teacher") / "generator", small_generator_cfg, clip_id=clip_id,
                        tokens=(n_tokens, dim))


@pytest.fixture
def teacher(teacher_dir):
    return load_pipeline(teacher_dir)


def model_inputs(teacher, seed: int = 0, batch: int = B):
    g = torch.Generator().manual_seed(seed)
    n_tokens, dim = teacher.token_shape
    size, channels = teacher.unet.config.sample_size, teacher.unet.config.in_channels
    return {"sample": torch.randn(batch, channels, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, n_tokens, dim, generator=g),
            "added_cond_kwargs": micro_conditioning_ids(batch, tuple(teacher.config.original_size),
                                                        tuple(teacher.config.crop_coords))}


def distill_cfg(*extra: str):
    return load_config("distill", [f"guidance_embedding_dim={W}", *extra])


# --- the student -------------------------------------------------------------------------------------------

def test_make_student_starts_as_the_teacher_for_any_guidance_and_embeds_the_guidance(teacher):
    student = make_student(teacher.unet, W)
    assert student.config.time_cond_proj_dim == W and teacher.unet.config.time_cond_proj_dim is None
    assert student.time_embedding.cond_proj.weight.shape == (student.time_embedding.linear_1.in_features, W)
    assert not student.time_embedding.cond_proj.weight.any()  # zero-initialised
    inputs = model_inputs(teacher)
    with torch.no_grad():
        for t in (0, 19, 500, 999):
            expected = teacher.unet(timestep=t, **inputs).sample
            for scale in (1.0, 1.5, 3.0, 7.5):
                emb = guidance_embedding(torch.full((B,), scale), W)
                torch.testing.assert_close(student(timestep=t, timestep_cond=emb, **inputs).sample, expected,
                                           rtol=0, atol=1e-6)
            wild = 100 * torch.randn(B, W, generator=torch.Generator().manual_seed(t))  # any embedding at all
            torch.testing.assert_close(student(timestep=t, timestep_cond=wild, **inputs).sample, expected,
                                       rtol=0, atol=1e-6)
    # a copy, not the teacher's tensors: training the student leaves the teacher as it was
    before = teacher.unet.conv_in.weight.clone()
    with torch.no_grad():
        student.conv_in.weight.add_(1.0)
    assert torch.equal(teacher.unet.conv_in.weight, before)
    # once the guidance projection is non-zero, the scale matters
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight)
    with torch.no_grad():
        one, five = (student(timestep=500, timestep_cond=guidance_embedding(torch.full((B,), s), W), **inputs).sample
                     for s in (1.0, 5.0))
    assert not torch.allclose(one, five)


def test_make_student_of_a_unet_built_in_memory(small_generator_cfg):
    """A UNet built from a config lists the keys it left at their defaults (time_cond_proj_dim among them) in
    `_use_default_values`, which from_config would drop: the student must still get its guidance embedding."""
    torch.manual_seed(0)
    teacher = build_pipeline(small_generator_cfg(), clip_id="test:random:0", clip_tokens=4)
    assert "time_cond_proj_dim" in teacher.unet.config.get("_use_default_values", [])
    student = make_student(teacher.unet, W)
    assert student.config.time_cond_proj_dim == W and not student.time_embedding.cond_proj.weight.any()
    inputs = model_inputs(teacher)
    with torch.no_grad():
        torch.testing.assert_close(student(timestep=250, timestep_cond=torch.randn(B, W), **inputs).sample,
                                   teacher.unet(timestep=250, **inputs).sample, rtol=0, atol=1e-6)


def test_make_student_refuses_a_teacher_whose_layout_differs(teacher):
    already = make_student(teacher.unet, W)  # has a guidance projection already: none would be missing
    with pytest.raises(RuntimeError, match="layouts differ"):
        make_student(already, W)
    extra = copy.deepcopy(teacher.unet)
    extra.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))  # a weight the config does not build
    with pytest.raises(RuntimeError, match="unexpected.*stray"):
        make_student(extra, W)


# --- boundary condition and parameterisations --------------------------------------------------------------

def test_boundary_scalings_are_the_identity_at_zero_the_model_at_the_end_and_diffusers_lcm(teacher):
    t = torch.tensor([0, 1, 19, 39, 259, 500, 979, 999])
    c_skip, c_out = boundary_scalings(t)
    assert c_skip.shape == c_out.shape == (len(t), 1, 1, 1)
    c_skip, c_out = c_skip.flatten(), c_out.flatten()
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x, 0) = x
    assert float(c_skip[-1]) < 1e-8 and float(c_out[-1]) == pytest.approx(1.0, abs=1e-7)
    assert (c_skip.diff() < 0).all() and (c_out.diff() >= 0).all()  # c_out reaches 1.0 in float32
    lcm = make_scheduler("lcm", teacher.scheduler)  # the student's sampler: the same boundary condition
    assert isinstance(lcm, LCMScheduler)
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert float(c_skip[i]) == pytest.approx(float(ref_skip), rel=1e-6, abs=1e-12), step
        assert float(c_out[i]) == pytest.approx(float(ref_out), rel=1e-6, abs=1e-12), step


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_and_eps_recover_the_clean_image_and_the_noise(prediction_type, teacher):
    schedule = make_scheduler("ddpm", {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                       "prediction_type": prediction_type})
    # eps prediction divides by sqrt(alpha_bar) (~5e-5 at t = 999 here): the reason the world's generators
    # predict v; v stays exact to the end of the cosine schedule
    timesteps = [0, 19, 500, 959] + ([979, 999] if prediction_type == "v_prediction" else [])
    t = torch.tensor(timesteps)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(len(t), 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(len(t), 3, 8, 8, generator=g)
    a = schedule.alphas_cumprod[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(x_t, schedule.add_noise(x0, noise, t))  # diffusers' forward process
    output = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "v_prediction":
        torch.testing.assert_close(output, schedule.get_velocity(x0, noise, t))
    x0_hat, eps_hat = x0_and_eps(output, x_t, schedule.alphas_cumprod[t], prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="'sample'"):
        x0_and_eps(output, x_t, schedule.alphas_cumprod[t], "sample")


# --- the consistency loss ----------------------------------------------------------------------------------

def test_the_consistency_loss_is_finite_positive_and_trains_the_student_alone(teacher, world):
    _, _, n_tokens, dim = world
    student = make_student(teacher.unet, W)
    target = copy.deepcopy(student).requires_grad_(False)
    distiller = ConsistencyDistiller(teacher, student, target, distill_cfg())
    assert distiller.prediction_type == "v_prediction" and distiller.skip == GRID
    assert distiller.grid.tolist() == list(range(GRID - 1, 1000, GRID))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    loss = distiller.loss(torch.rand(B, 3, 64, 64, generator=g), torch.randn(B, n_tokens, dim, generator=g))
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert student.conv_out.weight.grad is not None and student.conv_out.weight.grad.abs().sum() > 0
    assert student.time_embedding.cond_proj.weight.grad.abs().sum() > 0  # the guidance embedding learns
    assert all(p.grad is None for p in teacher.unet.parameters())  # the teacher's step runs without gradient
    assert all(p.grad is None for p in target.parameters())


def record_calls(unet) -> list[dict]:
    calls = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append({**kwargs, "sample": sample.clone(), "timestep": torch.as_tensor(timestep).clone()})

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_the_consistency_loss_compares_the_student_at_t_n_with_the_target_one_teacher_step_later(teacher, world):
    _, _, n_tokens, dim = world
    student = make_student(teacher.unet, W)
    target = copy.deepcopy(student).requires_grad_(False)
    distiller = ConsistencyDistiller(teacher, student, target, distill_cfg())
    at_student, at_target, at_teacher = record_calls(student), record_calls(target), record_calls(teacher.unet)
    batch = 8
    tokens_bld = torch.randn(batch, n_tokens, dim, generator=torch.Generator().manual_seed(1))
    images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    distiller.loss(images, tokens_bld)
    assert len(at_student) == len(at_target) == len(at_teacher) == 1
    s, tg, te = at_student[0], at_target[0], at_teacher[0]
    t = s["timestep"]
    assert t.shape == (batch,) and all((int(x) + 1) % GRID == 0 for x in t)  # on the LCM sampler's grid
    assert torch.equal(tg["timestep"], (t - GRID).clamp(min=0))  # one DDIM step of the grid later
    assert torch.equal(te["timestep"], torch.cat((t, t)))
    assert torch.equal(s["encoder_hidden_states"], tokens_bld) and torch.equal(tg["encoder_hidden_states"], tokens_bld)
    # the guided teacher: random unconditional tokens, then the conditional ones; no guidance embedding
    assert torch.equal(te["encoder_hidden_states"][batch:], tokens_bld)
    assert not torch.allclose(te["encoder_hidden_states"][:batch], tokens_bld)
    assert te.get("timestep_cond") is None and torch.equal(te["sample"][:batch, :3], s["sample"][:, :3])
    # every UNet input ends with its tokens' map: the teacher's token map, shared by the student
    token_map = teacher.token_map(tokens_bld)
    for call, maps in ((s, token_map), (tg, token_map), (te, teacher.token_map(te["encoder_hidden_states"]))):
        assert torch.equal(call["sample"][:, 3:], maps)
    # student and target read the same guidance scales, embedded as the sampler embeds them
    assert s["timestep_cond"].shape == (batch, W) and torch.equal(s["timestep_cond"], tg["timestep_cond"])
    assert not torch.allclose(s["timestep_cond"][0], s["timestep_cond"][1])  # a scale drawn per row
    assert not torch.equal(tg["sample"], s["sample"])  # the target sees the teacher's step, not x_t

    distiller.grid = torch.tensor([GRID - 1])  # the first grid point: the target sits at t = 0
    distiller.loss(images, tokens_bld)
    assert (at_student[-1]["timestep"] == GRID - 1).all() and (at_target[-1]["timestep"] == 0).all()


def test_the_consistency_loss_is_near_zero_for_a_consistent_network_and_grows_for_a_perturbed_one(small_generator_cfg):
    """A UNet whose output is zero, with eps prediction, is exactly self-consistent along its own DDIM
    trajectory (x / sqrt(alpha_bar) stays put): teacher = student (guidance projection zeroed) = target gives
    ~0 loss; a perturbed student does not."""
    cfg = small_generator_cfg()
    cfg["schedule"].update(beta_schedule="linear", prediction_type="epsilon")  # 1 / sqrt(alpha_bar) <= 160
    torch.manual_seed(0)
    teacher = build_pipeline(cfg, clip_id="test:random:0", clip_tokens=4)
    torch.nn.init.zeros_(teacher.unet.conv_out.weight)
    torch.nn.init.zeros_(teacher.unet.conv_out.bias)
    student = make_student(teacher.unet, W)
    perturbed = copy.deepcopy(student)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    tokens_bld = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(2))

    def loss(student_net, target_net) -> float:
        torch.manual_seed(5)  # the same timesteps, noise and guidance scales for every pair
        with torch.no_grad():
            return ConsistencyDistiller(teacher, student_net, target_net, distill_cfg()).loss(images, tokens_bld).item()

    consistent = loss(student, student)
    assert 0 <= consistent < 1e-5
    assert loss(perturbed, perturbed) > 1000 * max(consistent, 1e-7)  # inconsistent along the trajectory
    assert loss(perturbed, student) > 1000 * max(consistent, 1e-7)  # departs from its target


# --- the straight-path (reflow) loss -------------------------------------------------------------------------

def test_the_teachers_pair_is_its_guided_ode_image_of_the_noise(teacher, world):
    _, _, n_tokens, dim = world
    distiller = ReflowDistiller(teacher, make_student(teacher.unet, W), distill_cfg("method=reflow"))
    assert distiller.points.tolist() == [999, 874, 749, 624, 499, 374, 249, 124]  # trailing 8: holds 1, 2, 4 steps
    at_teacher = record_calls(teacher.unet)
    tokens_bld = torch.randn(B, n_tokens, dim, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    x_T, x0_star, g = distiller.teacher_pairs(tokens_bld)
    assert 1.0 <= g <= 5.0 and len(at_teacher) == 8  # reflow.teacher_steps guided calls
    assert all(len(call["sample"]) == 2 * B for call in at_teacher)
    assert x_T.shape == x0_star.shape == (B, 3, 8, 8) and not torch.allclose(x0_star, x_T)
    torch.manual_seed(0)  # the same draws by hand: g, x_T, then the solver's random unconditional tokens
    assert float(1.0 + 4.0 * torch.rand(())) == g
    torch.testing.assert_close(torch.randn(x_T.shape), x_T, rtol=0, atol=0)
    again = distiller.solver(tokens_bld, num_inference_steps=8, guidance_scale=g, latents=x_T, output_type="latent")
    torch.testing.assert_close(again.images, x0_star, rtol=0, atol=0)
    assert isinstance(distiller.solver.scheduler, DPMSolverMultistepScheduler)  # reflow.teacher_sampler: dpmpp


def test_the_path_loss_shows_the_student_a_point_between_noise_and_image_and_trains_it_alone(teacher, world):
    _, _, n_tokens, dim = world
    student = make_student(teacher.unet, W)
    distiller = ReflowDistiller(teacher, student, distill_cfg("method=reflow"))
    at_student = record_calls(student)
    g = torch.Generator().manual_seed(2)
    tokens_bld = torch.randn(B, n_tokens, dim, generator=g)
    x_T, x0_star = torch.randn(B, 3, 8, 8, generator=g), torch.rand(B, 3, 8, 8, generator=g) * 2 - 1
    loss = distiller.path_loss(x_T, x0_star, 2.5, tokens_bld)
    loss.backward()
    call = at_student[0]
    t = call["timestep"]
    assert set(t.tolist()) <= set(distiller.points.tolist())
    a = distiller.alphas_cumprod[t][:, None, None, None]
    torch.testing.assert_close(call["sample"][:, :3], a.sqrt() * x0_star + (1 - a).sqrt() * x_T)
    torch.testing.assert_close(call["timestep_cond"], guidance_embedding(torch.full((B,), 2.5), W))
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert student.conv_out.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.unet.parameters())


# --- the segment (progressive) loss --------------------------------------------------------------------------

def test_the_segments_run_from_each_student_timestep_to_the_next_and_the_last_to_the_clean_image(teacher):
    distiller = ProgressiveDistiller(teacher, make_student(teacher.unet, W),
                                     distill_cfg("method=progressive", "progressive.teacher_substeps=2"))
    assert distiller.substeps.tolist() == [[999, 874, 749], [749, 624, 499], [499, 374, 249], [249, 124, -1]]
    assert distiller.alpha_bar[-1] == 1.0 and distiller.alpha_bar[999] < 1e-3


def test_the_students_euler_step_from_the_segment_target_lands_where_the_teacher_did(teacher):
    """The distiller's algebra against diffusers' Euler scheduler, the student's sampler: a model output
    implying segment_target's clean image steps x_t onto x_end (in Euler's sigma scaling)."""
    euler = make_scheduler("euler", teacher.scheduler)
    euler.set_timesteps(4)
    alpha_bar = euler.alphas_cumprod
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(euler.timesteps.tolist()):
        t = int(t)
        t_end = int(euler.timesteps[i + 1]) if i < 3 else -1
        ab_t = alpha_bar[t]
        ab_end = alpha_bar[t_end] if t_end >= 0 else torch.tensor(1.0)
        x_t, x_end = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        x0 = segment_target(x_t, x_end, ab_t, ab_end)
        v = (ab_t.sqrt() * x_t - x0) / (1 - ab_t).sqrt()  # the v-prediction output that implies x0
        sigma, sigma_end = euler.sigmas[i], euler.sigmas[i + 1]
        euler._step_index = i
        landed = euler.step(v, euler.timesteps[i], x_t * (sigma ** 2 + 1).sqrt()).prev_sample
        # at t = 999 Euler's sigma (2e4 for the cosine schedule) scales x_t up, and its float32 step cancels
        # terms of that size: ~1e-3 of rounding there, as in every Euler sample of the teacher
        torch.testing.assert_close(landed / (sigma_end ** 2 + 1).sqrt(), x_end, rtol=0, atol=5e-3 if i == 0 else 2e-5)


def test_the_progressive_loss_is_zero_for_a_student_that_already_takes_the_teachers_step(teacher, world):
    """One substep at guidance 1: the teacher's segment is one conditional DDIM step, which the untrained
    student (the teacher, its guidance embedding zero) takes exactly; a perturbed student is penalised."""
    _, _, n_tokens, dim = world
    student = make_student(teacher.unet, W)
    cfg = distill_cfg("method=progressive", "progressive.teacher_substeps=1", "guidance_min=1.0", "guidance_max=1.0")
    distiller = ProgressiveDistiller(teacher, student, cfg)
    g = torch.Generator().manual_seed(5)
    images, tokens = torch.rand(4, 3, 8, 8, generator=g), torch.randn(4, n_tokens, dim, generator=g)
    torch.manual_seed(0)
    assert distiller.loss(images, tokens).item() < 1e-5
    with torch.no_grad():
        student.conv_out.bias.add_(0.05)
    torch.manual_seed(0)
    assert distiller.loss(images, tokens).item() > 1e-2


def test_the_progressive_teacher_solves_each_segment_guided_and_trains_the_student_alone(teacher, world):
    _, _, n_tokens, dim = world
    student = make_student(teacher.unet, W)
    distiller = ProgressiveDistiller(teacher, student, distill_cfg("method=progressive"))  # 4 substeps
    at_teacher, at_student = record_calls(teacher.unet), record_calls(student)
    g = torch.Generator().manual_seed(6)
    images, tokens = torch.rand(B, 3, 8, 8, generator=g), torch.randn(B, n_tokens, dim, generator=g)
    loss = distiller.loss(images, tokens)
    loss.backward()
    assert len(at_teacher) == 4 and all(len(call["sample"]) == 2 * B for call in at_teacher)  # guided substeps
    starts = at_student[0]["timestep"]
    assert set(starts.tolist()) <= {999, 749, 499, 249}
    torch.testing.assert_close(at_teacher[0]["timestep"], torch.cat((starts, starts)))
    rows = [distiller.substeps[distiller.substeps[:, 0] == s][0] for s in starts.tolist()]
    for j, call in enumerate(at_teacher):
        assert call["timestep"][:B].tolist() == [int(r[j]) for r in rows]
    assert at_student[0]["timestep_cond"].shape == (B, W)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert student.conv_out.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.unet.parameters())


# --- mindeye-distill end to end ----------------------------------------------------------------------------

def distill_overrides(teacher_dir, out_dir, *extra: str) -> list[str]:
    return [f"teacher={teacher_dir}", f"out_dir={out_dir}", "steps=3", "batch_size=2", "loader_workers=0",
            "progress=false", "cpu=true", "log_every=1", "save_every=2", "sample_every=2", "warmup_steps=1",
            "lr=1e-2", f"guidance_embedding_dim={W}", *extra]


def run_distill(teacher_dir, out_dir, *extra: str):
    """distill(cfg) with the given overrides: (student path, the module's log messages)."""
    cfg = load_config("distill", distill_overrides(teacher_dir, out_dir, *extra))
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("export.distill")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        return distill(cfg), messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def trainable_count(messages: list[str]) -> int:
    counts = [int(m) for message in messages for m in re.findall(r"(\d+) trainable parameters", message)]
    assert len(counts) == 1, messages
    return counts[0]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher_dir):
    """An uninterrupted 3-step full distillation: (out_dir, log messages)."""
    out_dir = tmp_path_factory.mktemp("distill") / "run"
    path, messages = run_distill(teacher_dir, out_dir)
    assert path == out_dir / "student"
    return out_dir, messages


def test_distill_writes_an_lcm_student_that_samples_in_one_to_four_steps(distilled, teacher_dir, world):
    out_dir, messages = distilled
    teacher = load_pipeline(teacher_dir)
    student = load_pipeline(out_dir / "student")
    assert student.is_student and not teacher.is_student
    assert isinstance(student.scheduler, LCMScheduler)
    assert student.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(student.scheduler.alphas_cumprod, teacher.scheduler.alphas_cumprod, rtol=0, atol=0)
    assert student.unet.config.time_cond_proj_dim == W
    assert student.config.clip_id == teacher.config.clip_id == world[1]
    assert student.token_shape == teacher.token_shape and student.image_size == teacher.image_size
    assert student.unet.time_embedding.cond_proj.weight.any()  # the guidance embedding trained
    assert trainable_count(messages) == count_parameters(student.unet)  # full distillation: everything trains

    log = read_log(out_dir)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert (out_dir / "distill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["step-000002.png", "step-000003.png"]
    assert (out_dir / "run_config.yaml").is_file()
    assert json.loads((out_dir / "train_state" / "progress.json").read_text())["step"] == 3

    n_tokens, dim = student.token_shape
    x = torch.randn(B, n_tokens, dim, generator=torch.Generator().manual_seed(4))
    seen = []
    student.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("timestep_cond")),
                                           with_kwargs=True)
    for steps in (1, 2, 4):
        seen.clear()
        out = student(x, num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (B, 8, 8, 3) and out.images.dtype == np.uint8
        assert len(seen) == steps and all(c is not None and c.shape == (B, W) for c in seen)  # one call a step
        timesteps = student.scheduler.timesteps.tolist()
        assert len(timesteps) == steps and timesteps[0] == 999
        assert all((t + 1) % GRID == 0 for t in timesteps)  # on the grid the student was distilled on


@pytest.mark.parametrize("method, overrides, sampler, steps", [
    ("reflow", ["reflow.teacher_steps=2"], DDIMScheduler, (1, 2, 4)),  # DDIM at eta 0
    ("progressive", ["progressive.teacher_substeps=2"], EulerDiscreteScheduler, (4,)),  # its 4 segments
])
def test_a_trajectory_student_samples_deterministically_its_image_fixed_by_the_starting_noise(
        teacher_dir, tmp_path, method, overrides, sampler, steps):
    path, _ = run_distill(teacher_dir, tmp_path / method, f"method={method}", *overrides)
    student = load_pipeline(path)
    assert student.is_student and isinstance(student.scheduler, sampler)
    assert student.scheduler.config.timestep_spacing == "trailing"
    assert [r["step"] for r in read_log(tmp_path / method)] == [1, 2, 3]
    n_tokens, dim = student.token_shape
    tokens = torch.randn(B, n_tokens, dim, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for n in steps:
        one, two = (student(tokens, num_inference_steps=n, guidance_scale=3.0, latents=noise,
                            generator=torch.Generator().manual_seed(seed)).images for seed in (0, 1))
        np.testing.assert_array_equal(one, two)  # no noise is drawn after the start
        assert student.scheduler.timesteps.tolist()[0] == 999
    assert student.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # 4 steps: the progressive segments
    with pytest.raises(ValueError, match=r"latents must be \(2, 3, 8, 8\)"):
        student(tokens, num_inference_steps=1, latents=noise[:, :, :4])


def test_a_distillation_can_start_from_a_student_of_the_same_teacher_and_refuses_another(distilled, teacher_dir,
                                                                                         tmp_path):
    lcm_dir, _ = distilled
    path, _ = run_distill(teacher_dir, tmp_path / "refined", "method=reflow", "reflow.teacher_steps=2",
                          f"init_student={lcm_dir / 'student'}", "steps=1", "lr=0")
    started, init = unet_weights(path), unet_weights(lcm_dir / "student")
    assert started.keys() == init.keys() and all(torch.equal(started[k], init[k]) for k in init)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        run_distill(teacher_dir, tmp_path / "other", f"init_student={lcm_dir / 'student'}",
                    "guidance_embedding_dim=16")


def test_a_resumed_distillation_ends_with_the_weights_of_an_uninterrupted_one(distilled, teacher_dir, tmp_path):
    full_dir, _ = distilled
    split_dir = tmp_path / "split"
    run_distill(teacher_dir, split_dir, "steps=2")
    halfway = unet_weights(split_dir / "student")
    run_distill(teacher_dir, split_dir, "resume=true")
    assert [r["step"] for r in read_log(split_dir)] == [1, 2, 3]
    assert_resumed_like_uninterrupted(split_dir, full_dir, "student", halfway)
    # the target network (an EMA of the student) is restored too
    target_split = torch.load(split_dir / "train_state" / "custom_checkpoint_0.pkl", weights_only=True)
    target_full = torch.load(full_dir / "train_state" / "custom_checkpoint_0.pkl", weights_only=True)
    assert target_split.keys() == target_full.keys()
    for key in target_full:
        torch.testing.assert_close(target_split[key], target_full[key], rtol=0, atol=1e-6, msg=key)


def test_the_seed_sets_the_noise_of_the_run(distilled, teacher_dir, tmp_path):
    full_dir, _ = distilled
    run_distill(teacher_dir, tmp_path / "seed1", "seed=1", "steps=1")
    assert read_log(tmp_path / "seed1")[0]["loss"] != pytest.approx(read_log(full_dir)[0]["loss"], rel=1e-3)
    run_distill(teacher_dir, tmp_path / "seed0", "seed=0", "steps=1")
    assert read_log(tmp_path / "seed0")[0]["loss"] == pytest.approx(read_log(full_dir)[0]["loss"], rel=1e-5)


def test_a_second_start_without_resume_refuses_to_overwrite_the_run(distilled, teacher_dir):
    out_dir, _ = distilled
    before = (out_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="resume=true"):
        run_distill(teacher_dir, out_dir)
    assert (out_dir / "student" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert [r["step"] for r in read_log(out_dir)] == [1, 2, 3]


def test_a_student_is_refused_as_a_teacher(distilled, tmp_path):
    out_dir, _ = distilled
    with pytest.raises(ValueError, match="already a distilled student"):
        run_distill(out_dir / "student", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_teacher_of_another_clip_encoder_is_refused_naming_both(small_generator_cfg, world, tmp_path):
    _, clip_id, n_tokens, dim = world
    other_id = clip_identity(load_config("distill", ["world=small"]).world.clip)
    assert other_id != clip_id
    other = save_teacher(tmp_path / "other", small_generator_cfg, clip_id=other_id, tokens=(n_tokens, dim))
    with pytest.raises(ValueError) as error:
        run_distill(other, tmp_path / "out")
    assert other_id in str(error.value) and clip_id in str(error.value)
    assert not (tmp_path / "out").exists()


# --- LoRA --------------------------------------------------------------------------------------------------

def expected_lora_count(unet: UNet2DConditionModel, rank: int) -> int:
    """Adapter parameters peft adds to the LORA_TARGETS modules (A: in -> r, B: r -> out), + the guidance embedding."""
    total = unet.time_embedding.cond_proj.weight.numel()
    for name, module in unet.named_modules():
        if not any(name == target or name.endswith("." + target) for target in LORA_TARGETS):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            total += rank * module.in_channels * math.prod(module.kernel_size) + module.out_channels * rank
    return total


def test_lora_distillation_trains_adapters_only_and_saves_a_plain_merged_student(distilled, teacher_dir, tmp_path):
    full_dir, full_messages = distilled
    path, messages = run_distill(teacher_dir, tmp_path / "lora", "lora_rank=2")
    full_count, lora_count = trainable_count(full_messages), trainable_count(messages)
    plain = load_pipeline(full_dir / "student").unet
    assert lora_count == expected_lora_count(plain, 2)
    assert lora_count < full_count / 3

    lora, full, teacher = unet_weights(path), unet_weights(full_dir / "student"), unet_weights(teacher_dir)
    assert lora.keys() == full.keys()  # a plain UNet2DConditionModel state dict: adapters merged and removed
    assert not any("lora" in key or "base_layer" in key for key in lora)
    config = json.loads((path / "unet" / "config.json").read_text())
    assert not any("lora" in key or "peft" in key for key in config)
    # the adapters' targets changed, everything else is the teacher's; the guidance embedding trained
    changed = {key for key in teacher if not torch.equal(lora[key], teacher[key])}
    assert changed and all(any(f".{target}." in f".{key}" for target in LORA_TARGETS) for key in changed)
    assert "conv_in.weight" not in changed and "time_embedding.linear_1.weight" not in changed
    assert lora["time_embedding.cond_proj.weight"].any()

    student = load_pipeline(path)
    assert student.is_student and isinstance(student.scheduler, LCMScheduler)
    n_tokens, dim = student.token_shape
    out = student(torch.randn(B, n_tokens, dim), num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (B, 3, 8, 8) and torch.isfinite(out.images).all()
