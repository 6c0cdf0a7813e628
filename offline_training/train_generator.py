"""mindeye-train-generator: train the synthetic world's unCLIP generator (CLIP image tokens -> image).

MindEye2's unCLIP was trained on web images, never on NSD's; likewise this generator learns from an
endless stream of new scenes from the world's own scene generator, drawn with a seed of their own
(`scene_seed`; the world's stimuli are drawn with `world.seed`), embedded by the world's frozen
encoder (`world.clip`). Batch `s` holds scenes [s B, (s + 1) B), so a resumed run sees exactly what
an uninterrupted one would.

Denoiser loss: MSE of the schedule's prediction type (v for the world's pixel-space generators: with a
cosine schedule the terminal SNR is ~1e-9, where an epsilon model's implied image is unstable and few-step
samplers and consistency distillation break down) with min-SNR-gamma weighting (Hang et al. 2023: the
same quality in a fraction of the steps); with probability `cond_drop_prob` a row's tokens are replaced by random
tokens, MindEye2's unconditional input, so classifier-free guidance works at sampling time. A generator
with a token map (the world's) trains it with the UNet, plus `token_map_loss` x the MSE between the map of
the kept rows' tokens and their clean samples, so the map is a picture. An EMA of the weights is what
gets saved.

out_dir receives: generator/ (the pipeline, diffusers format, EMA weights: load_pipeline reads it),
train_state/ (for resume), run_config.yaml, log.jsonl, training.png (loss curve) and samples/ (seen |
generated grids of held-out scenes every `sample_every` steps).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mindeye.cli import command

if TYPE_CHECKING:  # torch, diffusers and the generator load where they are used: --help answers without them
    import torch
    from diffusers.training_utils import EMAModel

    from mindeye.generator import MindEyeUnCLIPPipeline

log = logging.getLogger(__name__)
STATE_DIR, GENERATOR_DIR = "train_state", "generator"


def diffusion_loss(pipe: MindEyeUnCLIPPipeline, noise_schedule, images_b3hw: torch.Tensor, tokens_bld: torch.Tensor,
                   cond_drop_prob: float, snr_gamma: float | None, token_map_loss: float = 0.0) -> torch.Tensor:
    """min-SNR-weighted MSE (eps or v target) at a random timestep per row; dropped rows get random tokens.
    With a token map, plus `token_map_loss` x the MSE of the kept rows' maps to their clean samples."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    from mindeye.generator import micro_conditioning_ids

    x0 = pipe.encode_images(images_b3hw)
    batch = len(x0)
    noise = torch.randn_like(x0)
    t_b = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), device=x0.device)
    noisy = noise_schedule.add_noise(x0, noise, t_b)
    drop_b = torch.rand(batch, device=x0.device) < cond_drop_prob
    tokens_bld = torch.where(drop_b[:, None, None], torch.randn_like(tokens_bld), tokens_bld)
    added = micro_conditioning_ids(batch, tuple(pipe.config.original_size), tuple(pipe.config.crop_coords),
                                   device=x0.device)
    predicted = pipe.unet(pipe.denoiser_input(noisy, tokens_bld), t_b, encoder_hidden_states=tokens_bld,
                          added_cond_kwargs=added).sample
    v_prediction = noise_schedule.config.prediction_type == "v_prediction"
    target = noise_schedule.get_velocity(x0, noise, t_b) if v_prediction else noise
    mse_b = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:  # min-SNR-gamma weights of the x0 error, expressed for an eps or a v target
        snr_b = compute_snr(noise_schedule, t_b)
        mse_b = mse_b * snr_b.clamp(max=snr_gamma) / (snr_b + 1 if v_prediction else snr_b)
    loss = mse_b.mean()
    if pipe.token_map is not None and token_map_loss and not drop_b.all():
        kept = ~drop_b
        loss = loss + token_map_loss * F.mse_loss(pipe.token_map(tokens_bld[kept]).float(), x0[kept].float())
    return loss


def train_generator(cfg: DictConfig) -> Path:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from mindeye.clip import build_clip_embedder, clip_identity
    from mindeye.generator import build_pipeline, make_scheduler
    from mindeye.generator.training import (check_out_dir, load_state, plot_loss, preview_grid, preview_scenes,
                                           save_state, scene_loader, to_unit)

    out_dir = Path(cfg.out_dir)
    state_dir = out_dir / STATE_DIR
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_out_dir(out_dir, state_dir, cfg.resume)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    accelerator = Accelerator(cpu=cfg.cpu)
    embedder = build_clip_embedder(cfg.world.clip, device=str(accelerator.device))
    set_seed(cfg.seed)  # after the encoder: building a random-weights one re-seeds torch with its own seed
    pipe = build_pipeline(cfg.generator, clip_id=clip_identity(cfg.world.clip), clip_tokens=embedder.n_tokens)
    pipe.set_progress_bar_config(disable=True)
    noise_schedule = make_scheduler("ddpm", cfg.generator.schedule)
    trained = [pipe.unet.train()] + ([pipe.token_map.train()] if pipe.token_map is not None else [])
    params = [p for module in trained for p in module.parameters()]
    ema = EMAModel(params, decay=cfg.ema.decay, use_ema_warmup=True, power=cfg.ema.power)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    *trained, optimizer, scheduler = accelerator.prepare(*trained, optimizer, scheduler)
    accelerator.register_for_checkpointing(ema)

    step, records = 0, []
    if state_dir.is_dir():
        progress = load_state(accelerator, state_dir)
        step, records = progress["step"], progress["records"]
        log.info("resuming %s at step %d", out_dir, step)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples").mkdir(exist_ok=True)
    (out_dir / "run_config.yaml").write_text(OmegaConf.to_yaml(resolved))
    ema.to(accelerator.device)

    held_out = preview_scenes(cfg.scene_seed + 1, cfg.world.image_size)
    batches = scene_loader(cfg.scene_seed, cfg.world.image_size, cfg.batch_size, step, cfg.loader_workers)
    window, started = [], time.perf_counter()
    last = min(cfg.steps, cfg.stop_after or cfg.steps)  # stop_after: end early, the schedule still spans `steps`
    bar = tqdm(total=last, initial=step, desc="generator", disable=not cfg.progress)
    for images in batches:
        if step >= last:
            break
        images_b3hw = to_unit(images).to(accelerator.device)
        with torch.no_grad():
            tokens_bld = embedder(images_b3hw)
        loss = diffusion_loss(pipe, noise_schedule, images_b3hw, tokens_bld, cfg.cond_drop_prob, cfg.snr_gamma,
                              cfg.token_map_loss)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        step += 1
        window.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(window):.4f}")
        if step % cfg.log_every == 0 or step == last:
            records.append({"step": step, "loss": float(np.mean(window)), "lr": scheduler.get_last_lr()[0],
                            "s_per_step": (time.perf_counter() - started) / len(window)})
            window, started = [], time.perf_counter()
        if step % cfg.save_every == 0 or step == last:
            save_state(accelerator, state_dir, {"step": step, "records": records})
            (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            plot_loss(records, out_dir / "training.png", ylabel="min-SNR weighted MSE",
                      title="generator training loss")
        if step % cfg.sample_every == 0 or step == last:
            with ema_weights(ema, trained):
                preview_grid(pipe, embedder, held_out, out_dir / "samples" / f"step-{step:06d}.png",
                             steps=cfg.generator.sampling.steps, guidance_scale=cfg.generator.sampling.guidance_scale)
            for module in trained:
                module.train()
    bar.close()
    return save_generator(pipe, ema, params, out_dir / GENERATOR_DIR, half=cfg.save_fp16)


class ema_weights:
    """Context: the trained modules hold the EMA weights inside, their own weights again after."""

    def __init__(self, ema: EMAModel, modules: list[torch.nn.Module]):
        self.ema, self.modules = ema, modules
        self.params = [p for module in modules for p in module.parameters()]

    def __enter__(self):
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        for module in self.modules:
            module.eval()

    def __exit__(self, *exc):
        self.ema.restore(self.params)


def save_generator(pipe: MindEyeUnCLIPPipeline, ema: EMAModel, params: list, path: Path, *, half: bool) -> Path:
    """The pipeline with the EMA weights (in float16 when `half`: half the size, loads as float32)."""
    from mindeye.generator.training import save_generator_folder

    ema.copy_to(params)
    return save_generator_folder(pipe, path, half=half)


@command("train_generator", "mindeye-train-generator")
def main(cfg: DictConfig) -> None:
    path = train_generator(cfg)
    print(f"generator saved in {path} (samples in {Path(cfg.out_dir) / 'samples'})")


if __name__ == "__main__":
    main()
