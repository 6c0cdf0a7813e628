"""benchmarks/student_vs_teacher.py: every method it compares starts from the same noise, and the reference's
random unconditional tokens are its own.

Its distances to the full teacher's images only mean something if the guided teacher (which draws random
unconditional tokens before the starting noise), the unguided teacher and the student (which draw none)
denoise the same starting noise for the same seed; and a few-step teacher that shared the reference's
unconditional draw would be scored on a coupling the student cannot have. Checked on the first UNet call,
all with one sampler, at the size of a second.
"""
from __future__ import annotations

import torch

from export.distill import make_student, student_pipeline
from mindeye.generator import build_pipeline, make_scheduler

from conftest import load_benchmark


def first_unet_call(pipe, make_images) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents the UNet is first called on while `make_images()` runs (the conditional half of a guided batch),
    and the tokens of that call (both halves)."""
    calls = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0][-1:].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    try:
        make_images()
    finally:
        hook.remove()
    return calls[0]


def first_unet_input(pipe, make_images) -> torch.Tensor:
    return first_unet_call(pipe, make_images)[0]


def test_teacher_and_student_start_from_the_same_noise(small_cfg, one_thread, monkeypatch):
    bench = load_benchmark(monkeypatch, "student_vs_teacher")
    teacher = build_pipeline(small_cfg, clip_id="test", clip_tokens=4)
    student = student_pipeline(teacher, make_student(teacher.unet, 8))
    student.scheduler = make_scheduler("euler", teacher.scheduler)  # the teacher's sampler: the same input scaling
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    tokens_1ld = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))

    def bench_input(pipe, guidance: float) -> torch.Tensor:
        return first_unet_input(pipe, lambda: bench.generate(pipe, tokens_1ld, 1, guidance, seed=7, size=8))

    guided = bench_input(teacher, 3.0)
    reference_latents, reference_tokens = first_unet_call(teacher, lambda: bench.generate(
        teacher, tokens_1ld, 1, 3.0, seed=7, size=8, draws=bench.REFERENCE_DRAWS))
    assert torch.equal(reference_latents, guided)  # the same starting noise ...
    _, tokens = first_unet_call(teacher, lambda: bench.generate(teacher, tokens_1ld, 1, 3.0, seed=7, size=8))
    assert torch.equal(reference_tokens[1:], tokens[1:])  # ... the same conditional tokens ...
    assert not torch.allclose(reference_tokens[:1], tokens[:1])  # ... and its own unconditional draw
    assert torch.equal(bench_input(teacher, 1.0), guided)
    assert torch.equal(bench_input(student, 3.0), guided)
    # what the benchmark corrects: called plainly with one seed, the guided teacher (which draws its unconditional
    # tokens first) and the student start from different noise
    def plain_input(pipe) -> torch.Tensor:
        return first_unet_input(pipe, lambda: pipe(tokens_1ld, num_inference_steps=1, guidance_scale=3.0,
                                                   generator=torch.Generator().manual_seed(7)))

    assert not torch.allclose(plain_input(teacher), plain_input(student))
