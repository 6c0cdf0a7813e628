"""Per-image generation time of the unCLIP generator: the full-step teacher against its few-step student.

The teacher samples as MindEye2 does: 38 Euler steps at guidance 5, i.e. 2 UNet evaluations a step (the
unconditional and conditional inputs go through one batch-2 forward). The distilled student
(export/distill.py: make_student + student_pipeline, guidance folded in) samples with LCM at 1, 2 and 4
steps, 1 UNet evaluation a step. Batch 1 (one image, as live decoding makes them), after warm-up; every
timed thing runs once per repetition, in a rotating order, so slow drifts of the machine's load hit them
alike; median and p95 over the repetitions, and the ratio of each median to the teacher's.

Also timed apart: one UNet forward (batch 2 = a teacher step, batch 1 = a student step) and the decoder
(`vae.decode` of one latent for a latent-space config; a pixel-space config has no decoder, its output is
the image). In the table, "ms/UNet call", "UNet share" and "decoder share" are measured inside each
generation (forward hooks on the UNet and on the VAE's decoder): the UNet's time per forward in that run,
and the medians over repetitions of the fraction of the run spent in the UNet and in the decoder; the
rest is the scheduler, guidance arithmetic and the uint8 conversion.

Sizes:
- tiny: the synthetic world's 32 px pixel-space generator (configs/generator/tiny.yaml, 16 x 64 CLIP
  tokens); random weights unless --teacher / --student folders are given (weights do not change timing);
- medium: a latent config defined here (MEDIUM), the paper's layout at reduced width (UNet [64, 128, 256],
  a [32, 64, 128, 128] VAE, 256 px = 32 x 32 latents, the paper's 256 x 1664 tokens), random weights;
- paper (--paper): configs/generator/paper.yaml (768 px, 2.5 B parameters), random weights, fp16 on
  CUDA; skipped without a GPU.

    .venv/bin/python benchmarks/generator_speed.py                     # tiny + medium, 1 CPU thread
    .venv/bin/python benchmarks/generator_speed.py --sizes tiny --teacher runs/generator/teacher \\
        --student runs/distill/student
    .venv/bin/python benchmarks/generator_speed.py --sizes --paper --out benchmarks/results/generator_speed_gpu.txt
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER_STEPS, GUIDANCE = 38, 5.0
STUDENT_STEPS = (1, 2, 4)
GUIDANCE_EMBEDDING_DIM = 256  # configs/distill.yaml's guidance_embedding_dim

# The paper's layout (configs/generator/paper.yaml: 3 levels, 2 layers a block, transformers [1, 2, 10], 64-wide
# heads, SDXL's 4-level VAE, the 256 x 1664 tokens) at 1/5 of its UNet width and 1/4 of its VAE width, with
# fewer transformer layers, at 256 px (32 x 32 latents): one image in seconds on one CPU core, not minutes.
MEDIUM = {
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [32, 64, 128, 128], "sample_size": 256, "scaling_factor": 0.13025},
    "unet": {"sample_size": 32, "in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128, 256],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "layers_per_block": 2, "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [1, 2, 4],
             "use_linear_projection": True, "cross_attention_dim": 1664, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 1024},
    "schedule": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "prediction_type": "epsilon"},
    "micro_conditioning": {"original_size": [768, 768], "crop_coords": [0, 0]},
    "sampling": {"sampler": "euler_karras", "steps": TEACHER_STEPS, "guidance_scale": GUIDANCE},
}
CLIP_TOKENS = {"tiny": 16, "medium": 256, "paper": 256}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["tiny", "medium"], choices=["tiny", "medium"],
                        help="CPU-sized configs to time (default: tiny medium; none with --paper alone)")
    parser.add_argument("--paper", action="store_true", help="also time the paper config (needs a CUDA GPU)")
    parser.add_argument("--teacher", type=Path, help="a saved tiny teacher folder (default: random weights)")
    parser.add_argument("--student", type=Path, help="a saved tiny student folder (default: made from the teacher)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of everything (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of everything first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default=None, help="device for tiny/medium (default cpu; paper: cuda)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/generator_speed.txt")
    return parser.parse_args(argv)


def machine_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"machine: nproc {len(os.sched_getaffinity(0))}, {model}"


def load_line(when: str) -> str:
    return f"load average at {when}: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- building the pipelines

def teacher_and_student(size: str, args, device, dtype):
    """(teacher, student) pipelines of one size on `device`, progress bars off."""
    import torch

    from export.distill import make_student, student_pipeline
    from mindeye.generator import build_pipeline, load_pipeline

    config = MEDIUM if size == "medium" else size
    if size == "tiny" and args.teacher:
        teacher = load_pipeline(args.teacher, device=device, dtype=dtype)
    else:
        teacher = build_pipeline(config, clip_id="random", clip_tokens=CLIP_TOKENS[size], device=device)
    if size == "tiny" and args.student:
        student = load_pipeline(args.student, device=device, dtype=dtype)
    else:
        with torch.device(device):  # the paper size's 2.5 B parameters are initialised on the GPU
            student = student_pipeline(teacher, make_student(teacher.unet, GUIDANCE_EMBEDDING_DIM))
    pipes = []
    for pipe in (teacher, student):
        pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.eval()
        pipes.append(pipe)
    assert not pipes[0].is_student and pipes[1].is_student
    return pipes


def describe(size: str, teacher, device, dtype) -> str:
    from mindeye.generator import count_parameters, sampler_name

    unet = teacher.unet.config
    space = (f"latent {unet.sample_size}x{unet.sample_size}x{unet.in_channels}, VAE "
             f"{count_parameters(teacher.vae) / 1e6:.1f} M" if teacher.vae is not None else "pixel space, no VAE")
    return (f"{size}: {teacher.image_size} px, {space}; UNet {count_parameters(teacher.unet) / 1e6:.1f} M, "
            f"blocks {list(unet.block_out_channels)}; tokens {teacher.token_shape}; teacher sampler "
            f"{sampler_name(teacher.scheduler)}; {device} {str(dtype).removeprefix('torch.')}")


# ---------------------------------------------------------------- timers: each times one thing, once

def synced(device):
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


class ModuleClock:
    """Seconds spent in a module's forward calls since the last reset (forward hooks; one clock a module)."""
    _clocks: dict[int, "ModuleClock"] = {}

    def __init__(self, module, device):
        self.seconds, self._start, self._sync = 0.0, 0.0, synced(device)
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)

    @classmethod
    def of(cls, module, device) -> "ModuleClock":
        if id(module) not in cls._clocks:
            cls._clocks[id(module)] = cls(module, device)
        return cls._clocks[id(module)]

    def _enter(self, *_):
        self._sync()
        self._start = time.perf_counter()

    def _exit(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._start


def generation_timer(pipe, steps: int, device):
    """One full pipeline call for one image (tokens -> uint8 image): {"total", "unet", "decoder"} seconds,
    the last two spent inside it (UNet forwards; the VAE's decoder, 0 without one)."""
    import torch

    tokens = torch.randn(1, *pipe.token_shape, generator=torch.Generator().manual_seed(0)).to(device)
    sync = synced(device)
    unet = ModuleClock.of(pipe.unet, device)
    decoder = ModuleClock.of(pipe.vae.decoder, device) if pipe.vae is not None else None

    def run() -> dict[str, float]:
        generator = torch.Generator(device).manual_seed(0)
        for clock in filter(None, (unet, decoder)):
            clock.seconds = 0.0
        sync()
        start = time.perf_counter()
        pipe(tokens, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator, output_type="np")
        sync()
        return {"total": time.perf_counter() - start, "unet": unet.seconds,
                "decoder": decoder.seconds if decoder else 0.0}
    return run


def unet_call_timer(pipe, batch: int, device):
    """One UNet forward at `batch` (2: a teacher step under guidance; 1: a student step): {"total": seconds}."""
    import torch

    from mindeye.generator import micro_conditioning_ids
    from mindeye.generator.pipeline import guidance_embedding

    unet, dtype = pipe.unet, pipe.unet.dtype
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=dtype)
    tokens = torch.randn(batch, *pipe.token_shape, device=device, dtype=dtype)
    added = micro_conditioning_ids(batch, tuple(pipe.config.original_size), tuple(pipe.config.crop_coords),
                                   device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    cond = None
    if pipe.is_student:
        cond = guidance_embedding(torch.full((batch,), GUIDANCE, device=device), unet.config.time_cond_proj_dim)
        cond = cond.to(dtype)
    sync = synced(device)

    @torch.no_grad()
    def run() -> dict[str, float]:
        sync()
        start = time.perf_counter()
        unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added, timestep_cond=cond)
        sync()
        return {"total": time.perf_counter() - start}
    return run


def decode_timer(pipe, device):
    """Decoding one latent to an image (vae.decode): {"total": seconds}; None for a pixel-space pipeline."""
    import torch

    if pipe.vae is None:
        return None
    unet = pipe.unet.config
    latents = torch.randn(1, unet.in_channels, unet.sample_size, unet.sample_size, device=device,
                          dtype=pipe.vae.dtype)
    sync = synced(device)

    @torch.no_grad()
    def run() -> dict[str, float]:
        sync()
        start = time.perf_counter()
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        sync()
        return {"total": time.perf_counter() - start}
    return run


def time_interleaved(timers: dict, reps: int, warmup: int) -> dict[str, list[dict[str, float]]]:
    """{name: [a timer's answer per repetition]}: every timer once per repetition, the order rotated each time."""
    names = list(timers)
    for _ in range(warmup):
        for name in names:
            timers[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timers[name]())
    return times


# ---------------------------------------------------------------- one size: time, then tabulate

def bench_size(size: str, args, device, dtype) -> list[str]:
    import numpy as np

    teacher, student = teacher_and_student(size, args, device, dtype)
    rows = [("teacher", "euler", TEACHER_STEPS, 2)] + [("student", "lcm", s, 1) for s in STUDENT_STEPS]
    timers = {f"{who} {steps}": generation_timer(teacher if who == "teacher" else student, steps, device)
              for who, _, steps, _ in rows}
    timers["unet b2"] = unet_call_timer(teacher, 2, device)
    timers["unet b1"] = unet_call_timer(student, 1, device)
    decode = decode_timer(teacher, device)
    if decode is not None:
        timers["decode"] = decode
    start = time.perf_counter()
    times = time_interleaved(timers, args.reps, args.warmup)
    elapsed = time.perf_counter() - start

    def ms(name, q=50, part="total"):
        return float(np.percentile([t[part] for t in times[name]], q)) * 1e3

    def share(name, part):  # median over repetitions of the part's fraction of that same run
        return float(np.median([t[part] / t["total"] for t in times[name]]))

    base = ms(f"teacher {TEACHER_STEPS}")
    lines = [describe(size, teacher, device, dtype),
             f"{'':8}{'sampler':>8}{'steps':>6}{'UNet evals':>11}{'median ms':>11}{'p95 ms':>10}{'x teacher':>10}"
             f"{'speed-up':>9}{'ms/UNet call':>13}{'UNet share':>11}{'decoder share':>14}"]
    for who, sampler, steps, evals in rows:
        name = f"{who} {steps}"
        decoder = f"{share(name, 'decoder'):.1%}" if decode is not None else "none"
        lines.append(f"{who:8}{sampler:>8}{steps:>6}{steps * evals:>11}{ms(name):>11.1f}{ms(name, 95):>10.1f}"
                     f"{ms(name) / base:>10.3f}{base / ms(name):>9.1f}{ms(name, part='unet') / steps:>13.1f}"
                     f"{share(name, 'unet'):>11.1%}{decoder:>14}")
    lines.append(f"UNet call alone: batch 2 (a teacher step) {ms('unet b2'):.1f} ms median (p95 "
                 f"{ms('unet b2', 95):.1f}), batch 1 (a student step) {ms('unet b1'):.1f} ms (p95 "
                 f"{ms('unet b1', 95):.1f}); batch 2 / batch 1 = {ms('unet b2') / ms('unet b1'):.2f}")
    if decode is not None:
        lines.append(f"decoder alone (vae.decode, 1 image): {ms('decode'):.1f} ms median (p95 {ms('decode', 95):.1f})")
    else:
        lines.append("decoder: none - a pixel-space generator's UNet output is the image (0 ms)")
    lines.append(f"({args.reps} timed repetitions after {args.warmup} warm-up, {elapsed:.0f} s)")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), load_line("start")
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", "invalid value encountered in cast")  # random fp16 weights may give NaN images
    torch.set_num_threads(args.threads)
    python = os.path.relpath(sys.executable, Path.cwd())
    script = os.path.relpath(__file__, Path.cwd())
    header = [f"Command: {shlex.join([python, script, *sys.argv[1:]])}", machine_line(), load_start,
              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); batch 1; teacher {TEACHER_STEPS} "
              f"Euler steps at guidance {GUIDANCE} (2 UNet evaluations a step, one batch-2 forward), student "
              f"LCM {list(STUDENT_STEPS)} steps (1 a step); random weights unless folders are given",
              "p95: with few repetitions, interpolated between the slowest runs"]
    print("\n".join(header) + "\n", flush=True)
    sections = []
    device = torch.device(args.device or "cpu")
    for size in args.sizes:
        sections.append(bench_size(size, args, device, torch.float32))
        print("\n".join(sections[-1]) + "\n", flush=True)
    if args.paper:
        if torch.cuda.is_available():
            gpu = f"GPU: {torch.cuda.get_device_name(0)}"
            sections.append([gpu] + bench_size("paper", args, torch.device("cuda"), torch.float16))
        else:
            sections.append(["paper: skipped - it needs a CUDA GPU (2.5 B parameters at 768 px, timed in fp16)"])
        print("\n".join(sections[-1]) + "\n", flush=True)
    footer = [load_line("end"), f"total run time {time.perf_counter() - started:.0f} s"]
    print("\n".join(footer))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + [""] + ["\n".join(s) + "\n" for s in sections] + footer) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
