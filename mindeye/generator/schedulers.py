"""Samplers for the generator, swappable by name: diffusers schedulers over one training schedule.

A generator is trained with one noise schedule (betas, prediction type); which sampler walks it is a
choice made at sampling time. `make_scheduler(name, schedule)` builds that sampler from the
schedule's config, so a teacher trained for Euler can be sampled with DPM-Solver++ or DDIM and a
consistency-distilled student with LCM, all from the same folder.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       LCMScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# what the model was trained with; a sampler's own settings (spacing, solver order, ...) are not carried over
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr")

# name -> (scheduler class, settings on top of the training schedule)
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),  # EDM-style sigma spacing
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                            "timestep_spacing": "trailing"}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
    "lcm": (LCMScheduler, {"timestep_spacing": "trailing"}),
    "ddpm": (DDPMScheduler, {}),  # the training scheduler: adds noise, 1000-step ancestral sampling
}


def make_scheduler(name: str, schedule: Mapping[str, Any] | SchedulerMixin) -> SchedulerMixin:
    """Sampler `name` (one of SAMPLERS) over `schedule`: a training-schedule mapping (num_train_timesteps,
    beta_schedule, prediction_type, ...) or any scheduler whose config carries one."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    cls, settings = SAMPLERS[name]
    base = dict(schedule.config) if isinstance(schedule, SchedulerMixin) else dict(schedule)
    unknown = sorted(set(base) - set(SCHEDULE_KEYS)) if not isinstance(schedule, SchedulerMixin) else []
    if unknown:
        raise ValueError(f"unknown training-schedule key(s) {unknown}; known: {list(SCHEDULE_KEYS)}")
    training_schedule = {key: base[key] for key in SCHEDULE_KEYS if key in base}  # not the old sampler's settings
    return cls.from_config({**training_schedule, **settings})


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The SAMPLERS name of a scheduler built by make_scheduler (for logs and reports)."""
    for name, (cls, settings) in SAMPLERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in settings.items()):
            return name
    return type(scheduler).__name__
