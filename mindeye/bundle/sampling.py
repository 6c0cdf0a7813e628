"""The prior's sampler in the runtime: a diffusers scheduler's updates stepping an exported denoiser.

The bundle exports the prior's denoiser (one call: noisy tokens, timestep, brain tokens -> x_start) and
not its sampling loop, so the number of steps and the sampler stay runtime choices. This loop is
`DiffusionPrior.sample`'s, with the denoiser passed in: the same scheduler's timesteps, noise draw and
updates, and the same classifier-free guidance (`guided_x_start`: the exported conditional denoiser, given
the prior's null brain tokens for the unconditional half).

Why not call the scheduler's step(): diffusers' step costs ~1-3 ms of Python a call on this CPU, more
than the exported denoiser itself (0.3 ms at the tiny and medium sizes), so it dominated the model path.
The deterministic samplers here (DDIM with eta 0, DPM-Solver++(2M)) update x linearly:
x_(i+1) = a_i x_i + b_i x0_i + c_i x0_(i-1), with coefficients fixed by (sampler, schedule, steps).
`step_coefficients` reads them off the diffusers scheduler itself, by stepping it on unit vectors, once
per setting; the samples then equal the scheduler's to float32 rounding (tests/test_bundle.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mindeye.models.prior import guided_x_start, prior_scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_bld, t_b int64, brain_bld) -> x0


@functools.lru_cache(maxsize=64)
def step_coefficients(sampler: str, timesteps: int, steps: int) -> tuple[tuple[int, ...], torch.Tensor]:
    """(the timesteps, float64 (steps - 1, 3) rows (a_i, b_i, c_i)) of `sampler`'s updates over `steps` steps.

    Element 0 of the probe carries x (x_i = 1), element k + 1 carries x0 at step k only (an impulse), so
    step i's output holds a_i at 0, b_i at i + 1 and c_i at i; anything else would be a dependence this
    two-term update does not have, and is refused."""
    scheduler, step_options = prior_scheduler(sampler, timesteps)
    scheduler.set_timesteps(steps)
    coefficients = torch.zeros(max(steps - 1, 0), 3, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        x = torch.zeros(steps + 1, dtype=torch.float64)
        x[0] = 1.0
        x0 = torch.zeros(steps + 1, dtype=torch.float64)
        x0[i + 1] = 1.0
        out = scheduler.step(x0, t, x, **step_options).prev_sample
        coefficients[i] = torch.stack((out[0], out[i + 1], out[i] if i else out.new_zeros(())))
        rest = out.clone()
        rest[[0, i + 1, *([i] if i else [])]] = 0
        if rest.abs().max() > 1e-12:
            raise RuntimeError(f"the {sampler} scheduler's step {i} depends on more than x, x0 and the previous x0")
    return tuple(int(t) for t in scheduler.timesteps), coefficients


@torch.no_grad()
def sample_prior(denoise: Denoiser, brain_bld: torch.Tensor, *, steps: int, sampler: str, timesteps: int,
                 generator: torch.Generator | None = None, cond_scale: float = 1.0,
                 null_brain_ld: torch.Tensor | None = None) -> torch.Tensor:
    """Image tokens (B, L, D) sampled from Gaussian noise in `steps` steps of `sampler` (PRIOR_SAMPLERS);
    cond_scale != 1 guides them: x_start = uncond + cond_scale * (cond - uncond), uncond from `null_brain_ld`."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    schedule, coefficients = step_coefficients(sampler, timesteps, steps)
    x_bld = torch.randn(brain_bld.shape, device=brain_bld.device, dtype=brain_bld.dtype, generator=generator)
    previous = torch.zeros_like(x_bld)
    for i, t in enumerate(schedule):
        x_start = guided_x_start(denoise, x_bld, t, brain_bld, null_brain_ld, cond_scale)
        if i < steps - 1:
            a, b, c = coefficients[i].tolist()
            x_bld = (a * x_bld + b * x_start + c * previous).to(brain_bld.dtype)
            previous = x_start
    return x_start
