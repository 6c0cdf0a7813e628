"""mindeye-distill: distillation of the unCLIP generator into a 1-4 step student, by one of three methods.

`method=lcm`: latent consistency distillation (LCM, Luo et al. 2023; diffusers' consistency_distillation
examples), here in whatever space the teacher denoises (pixels for the world's generator, VAE latents at
paper size). Per batch of scenes and their CLIP tokens:
1. noise the images to a timestep t_n of the 50-point DDIM grid the LCM sampler walks;
2. the teacher, with classifier-free guidance at a random scale g (unconditional input: random tokens,
   as at sampling), takes one DDIM step from t_n to t_(n-1);
3. the student at (x_(t_n), t_n, g) and the target network at (x_(t_(n-1)), t_(n-1), g) each give the
   consistency function f = c_skip x + c_out x0_hat; the loss is a pseudo-Huber distance between them.
The student is the teacher plus an embedding of g (`time_cond_proj_dim`, zero-initialised so it starts
as the teacher): guidance is folded in, one UNet call a sampling step. The target network is an EMA of
the student; with `lora_rank` set only low-rank adapters on the attention and residual layers (and the
guidance embedding) train, the target is the student itself, and the adapters are merged at save time.
A teacher's token map (the world's generators) is the student's too, unchanged. The student samples
with the LCM scheduler, which draws fresh noise at every step.

`method=reflow`: trajectory distillation on straight paths (Liu et al. 2023, rectified flow / InstaFlow's
distillation; Luhman & Luhman 2021). Per batch: the teacher's ODE (`reflow.teacher_sampler`, `teacher_steps`,
guided at a random scale g) maps noise x_T to an image x0*; the student sees points of the straight path
x_t = sqrt(ab_t) x0* + sqrt(1 - ab_t) x_T at the `reflow.points` trailing timesteps its sampler can visit
(999, 874, ..., 124 for 8: those of 1, 2, 4 and 8 steps) and learns x0* from each. It samples with
deterministic DDIM (eta 0): from a perfect prediction DDIM's next point lies on the same path, so every step
aims at the teacher's image of that noise. Why it is here: where the teacher's ODE is nearly straight (the
world's generator, conditioned on a token map), a 4-step Euler teacher is already close to its full-step self,
and LCM's fresh noise per step keeps its student further away (benchmarks/results/student_vs_teacher.txt).

`method=progressive`: segment distillation (Salimans & Ho 2022's progressive distillation, with the guided
teacher of Meng et al. 2023, generalised to `teacher_substeps` per student step as phased consistency models
split the trajectory). The student's `progressive.student_steps` trailing timesteps (999, 749, 499, 249 for 4)
cut the trajectory into segments. Per batch: scenes noised to a segment's start t (as sampling meets them);
the guided teacher (random scale g) takes `teacher_substeps` DDIM steps to the segment's end; the student at
(x_t, t, g) learns the clean image whose single DDIM step lands there. It samples with Euler, the same step
as DDIM without clipping, so its 4 steps walk the teacher's 4 x `teacher_substeps`-step solve, one UNet call
each. Why: it starts where it should end (the student is the teacher, whose one step per segment is already a
4-step solve) and each target is local, so it needs few training steps, where reflow learns the whole
noise-to-image map at once.

out_dir receives: student/ (a generator folder with its method's sampler; load_pipeline reads it),
train_state/ (resume=true), run_config.yaml, log.jsonl, distill.png and samples/.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mindeye.cli import command

if TYPE_CHECKING:  # torch, diffusers and the generator load where they are used: --help answers without them
    import torch
    from diffusers import UNet2DConditionModel

    from mindeye.generator import MindEyeUnCLIPPipeline

log = logging.getLogger(__name__)
STATE_DIR, STUDENT_DIR = "train_state", "student"
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's boundary condition, as diffusers' LCMScheduler applies it
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj"]


def boundary_scalings(t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out (b, 1, 1, 1): f(x, t) = c_skip x + c_out x0_hat, with f = identity at t = 0."""
    scaled = t_b.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def x0_and_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar_b: torch.Tensor,
               prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean image and the noise a UNet output implies at x_t (eps or v parameterisation)."""
    a = alpha_bar_b[:, None, None, None]
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output, (1 - a).sqrt() * x_t + a.sqrt() * output
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt(), output
    raise ValueError(f"consistency distillation supports eps and v prediction, not {prediction_type!r}")


def make_student(teacher: UNet2DConditionModel, guidance_dim: int) -> UNet2DConditionModel:
    """The teacher with a guidance-scale embedding added to its timestep embedding, zero-initialised."""
    import torch
    from diffusers import UNet2DConditionModel

    # without `_use_default_values`: from_config drops the keys it lists (time_cond_proj_dim among them for a
    # UNet built in memory), which would discard the override and build a student without the embedding
    config = {k: v for k, v in teacher.config.items() if k != "_use_default_values"}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": guidance_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"student and teacher layouts differ: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def init_student(cfg: DictConfig, teacher: MindEyeUnCLIPPipeline) -> UNet2DConditionModel:
    """The student's starting UNet: the teacher with a fresh guidance embedding, or `cfg.init_student`'s (a
    student folder, e.g. an LCM student refined by method=reflow), which must be a student of this teacher."""
    if cfg.init_student is None:
        return make_student(teacher.unet, cfg.guidance_embedding_dim)
    from mindeye.generator import load_pipeline

    unet = load_pipeline(cfg.init_student, device=teacher.device).unet
    layout = {**teacher.unet.config, "time_cond_proj_dim": cfg.guidance_embedding_dim}
    differs = sorted(k for k in layout if not k.startswith("_") and unet.config.get(k) != layout[k])
    if differs:
        raise ValueError(f"init_student={cfg.init_student} is not a student of {cfg.teacher} with "
                         f"guidance_embedding_dim={cfg.guidance_embedding_dim}: {differs} differ")
    return unet.float()


def guided_ddim_step(teacher: MindEyeUnCLIPPipeline, x_bchw: torch.Tensor, t_b: torch.Tensor,
                     alpha_bar_b: torch.Tensor, alpha_bar_next_b: torch.Tensor, g_b: torch.Tensor,
                     tokens_bld: torch.Tensor, added_2b: dict) -> torch.Tensor:
    """One DDIM step (eta 0) of the teacher guided at scale g_b from x at t_b to the level alpha_bar_next_b;
    its unconditional input is random tokens, as at sampling. `added_2b`: micro-conditioning for 2b rows."""
    import torch

    tokens_2b = torch.cat((torch.randn_like(tokens_bld), tokens_bld))
    out_u, out_c = teacher.unet(teacher.denoiser_input(torch.cat((x_bchw, x_bchw)), tokens_2b), torch.cat((t_b, t_b)),
                                encoder_hidden_states=tokens_2b, added_cond_kwargs=added_2b).sample.chunk(2)
    g = g_b[:, None, None, None]
    x0, eps = x0_and_eps(out_u + g * (out_c - out_u), x_bchw, alpha_bar_b, teacher.scheduler.config.prediction_type)
    a_next = alpha_bar_next_b[:, None, None, None]
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


class ConsistencyDistiller:
    """The LCM loss of one batch, given the frozen teacher pipeline, the student and its target network."""

    def __init__(self, teacher: MindEyeUnCLIPPipeline, student, target, cfg: DictConfig):
        import torch

        from mindeye.generator import make_scheduler

        self.teacher, self.student, self.target, self.cfg = teacher, student, target, cfg
        schedule = teacher.scheduler.config
        self.alphas_cumprod = make_scheduler("ddpm", teacher.scheduler).alphas_cumprod
        self.prediction_type = schedule.prediction_type
        self.skip = schedule.num_train_timesteps // cfg.ddim_timesteps
        self.grid = torch.arange(1, cfg.ddim_timesteps + 1) * self.skip - 1  # 19, 39, ..., 999 for 50 points

    def loss(self, images_b3hw: torch.Tensor, tokens_bld: torch.Tensor) -> torch.Tensor:
        import torch

        from mindeye.generator import micro_conditioning_ids
        from mindeye.generator.pipeline import guidance_embedding

        teacher, cfg = self.teacher, self.cfg
        x0 = teacher.encode_images(images_b3hw)
        b, device = len(x0), x0.device
        t = self.grid[torch.randint(0, len(self.grid), (b,))].to(device)
        t_prev = (t - self.skip).clamp(min=0)
        a_t, a_prev = self.alphas_cumprod.to(device)[t], self.alphas_cumprod.to(device)[t_prev]
        noise = torch.randn_like(x0)
        x_t = a_t.sqrt()[:, None, None, None] * x0 + (1 - a_t).sqrt()[:, None, None, None] * noise
        g_b = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, device=device)
        w_emb = guidance_embedding(g_b, cfg.guidance_embedding_dim)
        added = micro_conditioning_ids(b, tuple(teacher.config.original_size), tuple(teacher.config.crop_coords),
                                       device=device)

        c_skip, c_out = boundary_scalings(t)
        out_student = self.student(teacher.denoiser_input(x_t, tokens_bld), t, encoder_hidden_states=tokens_bld, added_cond_kwargs=added,
                                   timestep_cond=w_emb).sample
        f_student = c_skip * x_t + c_out * x0_and_eps(out_student, x_t, a_t, self.prediction_type)[0]

        with torch.no_grad():
            added_2b = {k: torch.cat((v, v)) for k, v in added.items()}
            x_prev = guided_ddim_step(teacher, x_t, t, a_t, a_prev, g_b, tokens_bld, added_2b)
            out_target = self.target(teacher.denoiser_input(x_prev, tokens_bld), t_prev, encoder_hidden_states=tokens_bld, added_cond_kwargs=added,
                                     timestep_cond=w_emb).sample
            c_skip_p, c_out_p = boundary_scalings(t_prev)
            f_target = c_skip_p * x_prev + c_out_p * x0_and_eps(out_target, x_prev, a_prev, self.prediction_type)[0]
        c = cfg.huber_c
        return ((f_student.float() - f_target.float()) ** 2 + c ** 2).sqrt().sub(c).mean()



class ReflowDistiller:
    """The straight-path distillation loss of one batch (`method=reflow`, module docstring)."""

    def __init__(self, teacher: MindEyeUnCLIPPipeline, student, cfg: DictConfig):
        import torch

        from mindeye.generator import make_scheduler

        self.teacher, self.student, self.cfg = teacher, student, cfg
        self.solver = with_unet_and_sampler(teacher, teacher.unet, cfg.reflow.teacher_sampler)
        self.solver.set_progress_bar_config(disable=True)
        self.alphas_cumprod = make_scheduler("ddpm", teacher.scheduler).alphas_cumprod
        self.prediction_type = teacher.scheduler.config.prediction_type
        T, n = teacher.scheduler.config.num_train_timesteps, cfg.reflow.points
        self.points = torch.tensor([round(T - k * T / n) - 1 for k in range(n)])  # trailing, as DDIM samples

    def teacher_pairs(self, tokens_bld: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Noise x_T (b, C, H, W), the teacher's ODE image x0* of it, and the guidance scale g it was made at."""
        import torch

        cfg = self.cfg
        g = float(cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(()))  # one per batch
        side = self.teacher.unet.config.sample_size
        x_T = torch.randn((len(tokens_bld), self.teacher.sample_channels, side, side), device=tokens_bld.device)
        with torch.no_grad():
            x0_star = self.solver(tokens_bld, num_inference_steps=cfg.reflow.teacher_steps, guidance_scale=g,
                                  latents=x_T, output_type="latent").images
        return x_T, x0_star, g

    def path_loss(self, x_T: torch.Tensor, x0_star: torch.Tensor, g: float, tokens_bld: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber distance between x0* and the student's clean image from a point of the x_T -> x0* path."""
        import torch

        from mindeye.generator import micro_conditioning_ids
        from mindeye.generator.pipeline import guidance_embedding

        teacher, b, device = self.teacher, len(tokens_bld), tokens_bld.device
        t = self.points[torch.randint(0, len(self.points), (b,))].to(device)
        a_t = self.alphas_cumprod.to(device)[t]
        x_t = a_t.sqrt()[:, None, None, None] * x0_star + (1 - a_t).sqrt()[:, None, None, None] * x_T
        added = micro_conditioning_ids(b, tuple(teacher.config.original_size), tuple(teacher.config.crop_coords),
                                       device=device)
        w_emb = guidance_embedding(torch.full((b,), g, device=device), self.cfg.guidance_embedding_dim)
        out = self.student(teacher.denoiser_input(x_t, tokens_bld), t, encoder_hidden_states=tokens_bld,
                           added_cond_kwargs=added, timestep_cond=w_emb).sample
        x0_hat = x0_and_eps(out, x_t, a_t, self.prediction_type)[0]
        c = self.cfg.huber_c
        return ((x0_hat.float() - x0_star.float()) ** 2 + c ** 2).sqrt().sub(c).mean()

    def loss(self, images_b3hw: torch.Tensor, tokens_bld: torch.Tensor) -> torch.Tensor:
        """From the scenes' tokens only (the teacher makes the images the student learns); each pair is shown
        at `reflow.points_per_pair` points of its path, as the teacher's solve costs several student steps."""
        k = self.cfg.reflow.points_per_pair
        x_T, x0_star, g = self.teacher_pairs(tokens_bld)
        return self.path_loss(x_T.repeat(k, 1, 1, 1), x0_star.repeat(k, 1, 1, 1), g, tokens_bld.repeat(k, 1, 1))


def segment_target(x_t: torch.Tensor, x_end: torch.Tensor, alpha_bar_t: torch.Tensor,
                   alpha_bar_end: torch.Tensor) -> torch.Tensor:
    """The clean image whose one DDIM step (eta 0) from x_t lands on x_end (Salimans & Ho's target):
    x0~ = (x_end - (s_e / s_t) x_t) / (a_e - (s_e / s_t) a_t), a = sqrt(alpha-bar), s = sqrt(1 - alpha-bar)."""
    ratio = ((1 - alpha_bar_end) / (1 - alpha_bar_t)).sqrt()
    return (x_end - ratio * x_t) / (alpha_bar_end.sqrt() - ratio * alpha_bar_t.sqrt())


class ProgressiveDistiller:
    """The segment distillation loss of one batch (`method=progressive`, module docstring)."""

    def __init__(self, teacher: MindEyeUnCLIPPipeline, student, cfg: DictConfig):
        import torch

        from mindeye.generator import make_scheduler

        self.teacher, self.student, self.cfg = teacher, student, cfg
        self.prediction_type = teacher.scheduler.config.prediction_type
        alphas_cumprod = make_scheduler("ddpm", teacher.scheduler).alphas_cumprod
        self.alpha_bar = torch.cat((alphas_cumprod, torch.ones(1)))  # index -1: the clean end, alpha-bar 1
        sampler = make_scheduler(STUDENT_SAMPLERS["progressive"], teacher.scheduler)
        sampler.set_timesteps(cfg.progressive.student_steps)
        starts = [int(t) for t in sampler.timesteps]  # 999, 749, 499, 249 for 4 (trailing)
        m = cfg.progressive.teacher_substeps
        # (segments, m + 1): the teacher's timesteps from each segment's start to its end (-1: clean)
        self.substeps = torch.tensor([[round(start + (end - start) * j / m) for j in range(m + 1)]
                                      for start, end in zip(starts, starts[1:] + [-1])])

    def teacher_solve(self, x_bchw: torch.Tensor, substeps_bm: torch.Tensor, g_b: torch.Tensor,
                      tokens_bld: torch.Tensor) -> torch.Tensor:
        """Where the guided teacher's DDIM steps (eta 0, no clipping: Euler's step in other coordinates) through
        each row's timesteps `substeps_bm` take x_bchw, from the first timestep to the last."""
        import torch

        from mindeye.generator import micro_conditioning_ids

        teacher, b, alpha_bar = self.teacher, len(x_bchw), self.alpha_bar.to(x_bchw.device)
        added = micro_conditioning_ids(2 * b, tuple(teacher.config.original_size), tuple(teacher.config.crop_coords),
                                       device=x_bchw.device)
        with torch.no_grad():
            for j in range(substeps_bm.shape[1] - 1):
                t, t_next = substeps_bm[:, j], substeps_bm[:, j + 1]
                x_bchw = guided_ddim_step(teacher, x_bchw, t, alpha_bar[t], alpha_bar[t_next], g_b, tokens_bld, added)
        return x_bchw

    def loss(self, images_b3hw: torch.Tensor, tokens_bld: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber distance between the student's clean image at a segment's start and the one whose DDIM
        step lands where the teacher's substeps do (`segment_target`)."""
        import torch

        from mindeye.generator import micro_conditioning_ids
        from mindeye.generator.pipeline import guidance_embedding

        teacher, cfg = self.teacher, self.cfg
        x0 = teacher.encode_images(images_b3hw)
        b, device = len(x0), x0.device
        substeps_bm = self.substeps[torch.randint(0, len(self.substeps), (b,))].to(device)
        t, t_end = substeps_bm[:, 0], substeps_bm[:, -1]
        ab_t, ab_end = (self.alpha_bar.to(device)[i][:, None, None, None] for i in (t, t_end))
        x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * torch.randn_like(x0)
        g_b = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, device=device)
        x0_target = segment_target(x_t, self.teacher_solve(x_t, substeps_bm, g_b, tokens_bld), ab_t, ab_end)

        added = micro_conditioning_ids(b, tuple(teacher.config.original_size), tuple(teacher.config.crop_coords),
                                       device=device)
        out = self.student(teacher.denoiser_input(x_t, tokens_bld), t, encoder_hidden_states=tokens_bld,
                           added_cond_kwargs=added, timestep_cond=guidance_embedding(g_b, cfg.guidance_embedding_dim)).sample
        x0_hat = x0_and_eps(out, x_t, self.alpha_bar.to(device)[t], self.prediction_type)[0]
        c = cfg.huber_c
        return ((x0_hat.float() - x0_target.float()) ** 2 + c ** 2).sqrt().sub(c).mean()


STUDENT_SAMPLERS = {"lcm": "lcm", "reflow": "ddim", "progressive": "euler"}  # method -> its student's sampler


def with_unet_and_sampler(teacher: MindEyeUnCLIPPipeline, unet, sampler: str) -> MindEyeUnCLIPPipeline:
    """The teacher pipeline (its VAE and token map too) with another UNet and sampler."""
    from mindeye.generator import MindEyeUnCLIPPipeline, make_scheduler

    return MindEyeUnCLIPPipeline(unet, make_scheduler(sampler, teacher.scheduler), teacher.vae,
                                 teacher.token_map, clip_id=teacher.config.clip_id, clip_tokens=teacher.config.clip_tokens,
                                 original_size=tuple(teacher.config.original_size),
                                 crop_coords=tuple(teacher.config.crop_coords))


def student_pipeline(teacher: MindEyeUnCLIPPipeline, student_unet, method: str = "lcm") -> MindEyeUnCLIPPipeline:
    """The teacher pipeline with the student UNet and the sampler its distillation method trains it for."""
    return with_unet_and_sampler(teacher, student_unet, STUDENT_SAMPLERS[method])


def update_ema(target, student, decay: float) -> None:
    import torch

    with torch.no_grad():
        for p_target, p_student in zip(target.parameters(), student.parameters()):
            p_target.lerp_(p_student.detach(), 1 - decay)


def distill(cfg: DictConfig) -> Path:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_constant_schedule_with_warmup
    from tqdm.auto import tqdm

    from mindeye.clip import build_clip_embedder, clip_identity
    from mindeye.generator import load_pipeline
    from mindeye.generator.training import (check_out_dir, load_state, plot_loss, preview_grid, preview_scenes,
                                           save_generator_folder, save_state, scene_loader, to_unit)

    out_dir = Path(cfg.out_dir)
    state_dir = out_dir / STATE_DIR
    check_out_dir(out_dir, state_dir, cfg.resume)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    accelerator = Accelerator(cpu=cfg.cpu)
    teacher = load_pipeline(cfg.teacher, device=accelerator.device)
    if teacher.is_student:
        raise ValueError(f"{cfg.teacher} is already a distilled student; distil from the full-step teacher")
    if teacher.config.clip_id != clip_identity(cfg.world.clip):
        raise ValueError(f"the teacher {cfg.teacher} was trained on CLIP {teacher.config.clip_id!r}, the world's "
                         f"encoder is {clip_identity(cfg.world.clip)!r}")
    teacher.unet.requires_grad_(False).eval()
    if teacher.token_map is not None:  # the student reads the teacher's token map as it is
        teacher.token_map.requires_grad_(False).eval()
    embedder = build_clip_embedder(cfg.world.clip, device=str(accelerator.device))
    set_seed(cfg.seed)  # after the encoder: building a random-weights one re-seeds torch with its own seed

    student = init_student(cfg, teacher).train()
    if cfg.lora_rank:
        from peft import LoraConfig

        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS,
                                       init_lora_weights="gaussian"))
        student.time_embedding.cond_proj.requires_grad_(True)
        target = student  # the LoRA recipe: the student itself, without gradient, is the target
    elif cfg.method == "lcm":
        target = copy.deepcopy(student).requires_grad_(False)
    else:
        target = student  # reflow regresses the teacher's images: no target network
    trainable = [p for p in student.parameters() if p.requires_grad]
    log.info("distilling %s into a student: %d trainable parameters", cfg.teacher, sum(p.numel() for p in trainable))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    student, optimizer, lr_schedule = accelerator.prepare(student, optimizer, lr_schedule)
    if target is not student:
        accelerator.register_for_checkpointing(target)
    if cfg.method not in STUDENT_SAMPLERS:
        raise ValueError(f"method={cfg.method!r}: expected one of {sorted(STUDENT_SAMPLERS)}")
    distiller = (ConsistencyDistiller(teacher, student, target, cfg) if cfg.method == "lcm" else
                 ReflowDistiller(teacher, student, cfg) if cfg.method == "reflow" else
                 ProgressiveDistiller(teacher, student, cfg))

    step, records = 0, []
    if state_dir.is_dir():
        progress = load_state(accelerator, state_dir)
        step, records = progress["step"], progress["records"]
        log.info("resuming %s at step %d", out_dir, step)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    preview_pipe = student_pipeline(teacher, accelerator.unwrap_model(student), cfg.method)
    preview_pipe.set_progress_bar_config(disable=True)
    held_out = preview_scenes(cfg.scene_seed + 1, cfg.world.image_size)
    batches = scene_loader(cfg.scene_seed, cfg.world.image_size, cfg.batch_size, step, cfg.loader_workers)
    window, started = [], time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="distil", disable=not cfg.progress)
    for images in batches:
        if step >= cfg.steps:
            break
        images_b3hw = to_unit(images).to(accelerator.device)
        with torch.no_grad():
            tokens_bld = embedder(images_b3hw)
        loss = distiller.loss(images_b3hw, tokens_bld)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if target is not student:
            update_ema(target, accelerator.unwrap_model(student), cfg.target_ema)
        step += 1
        window.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window):.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            records.append({"step": step, "loss": float(np.mean(window)),
                            "s_per_step": (time.perf_counter() - started) / len(window)})
            window, started = [], time.perf_counter()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(accelerator, state_dir, {"step": step, "records": records})
            (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            plot_loss(records, out_dir / "distill.png", ylabel="pseudo-Huber loss",
                      title={"lcm": "consistency distillation", "reflow": "straight-path distillation",
                             "progressive": "segment (progressive) distillation"}[cfg.method])
        if step % cfg.sample_every == 0 or step == cfg.steps:
            preview_pipe.unet.eval()
            preview_grid(preview_pipe, embedder, held_out, out_dir / "samples" / f"step-{step:06d}.png",
                         steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance_scale)
            preview_pipe.unet.train()
    bar.close()
    final = accelerator.unwrap_model(student).eval()
    if cfg.lora_rank:
        final.fuse_lora()
        final.unload_lora()
    return save_generator_folder(student_pipeline(teacher, final, cfg.method), out_dir / STUDENT_DIR,
                                 half=cfg.save_fp16)


@command("distill", "mindeye-distill")
def main(cfg: DictConfig) -> None:
    path = distill(cfg)
    print(f"student saved in {path} (samples in {Path(cfg.out_dir) / 'samples'})")


if __name__ == "__main__":
    main()
