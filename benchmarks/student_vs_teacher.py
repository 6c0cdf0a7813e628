"""Few-step generation on the tiny world: the distilled students against the teacher's own few-step samplers.

Held-out scenes: the first N of the world's shared test images (data/world/tiny; mindeye-world writes the
world when it is absent), each generated from its TRUE CLIP tokens (the world's encoder), one image at a
time (batch 1, as live decoding makes them) with seed `--seed + i` for image i in every method. Methods:
- the teacher at its full steps (38, its saved sampler, Euler, at its guidance): the reference;
- the teacher at 1, 2, 4 steps with euler, euler_karras, dpmpp, ddim (classifier-free guidance, same scale);
- each student at 1, 2, 4 steps with its own sampler (LCM for method=lcm, DDIM for method=reflow, Euler for
  method=progressive), the same guidance scale folded in: one UNet call a step;
- the teacher at full steps from other seeds: how far an independent sample of the same tokens lies.
Every method starts from the same noise (seed + i, passed in as the starting latents). What a pipeline draws
beyond it - the guided teacher's unconditional input (random tokens, once per image) and LCM's fresh noise per
step - comes from another stream, and the reference's from a third: its random unconditional tokens are
sampling noise like the starting noise, and a few-step teacher that shared them would be scored on a coupling
that the student, whose guidance is folded in (no unconditional input), cannot have. Two rows show what that
coupling is worth: the full teacher with another unconditional draw (the floor that draw alone sets) and the
4-step teacher with the reference's own draw.

Columns: RMSE->T / 1-SSIM->T: distance to the reference's image of the same scene and seed (per-pixel RMSE
in [0, 1], mean over images; 1 - SSIM as mindeye.evaluation computes it); PixCorr, SSIM and 2-way
identification (world CLIP features: the world encoder's flattened tokens) against the seen images;
UNet evaluations per image (counted: a guided step is 2); seconds per image (median over the images of the
wall time on this machine's CPU, under whatever else runs on it) and its ratio to the reference's. "*": the
teacher sampler closest to the reference (lowest RMSE->T) at that step count. Then: a guidance sweep of the
full teacher, and the timesteps each few-step sampler walks.

    .venv/bin/python benchmarks/student_vs_teacher.py --teacher runs/generator/tiny-world/generator \\
        --student runs/distill/tiny-world/student runs/distill/tiny-world-reflow/student
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mindeye.clip import build_clip_embedder, clip_identity
from mindeye.evaluation import ClipTokenFeatures, pixcorr, ssim, two_way_identification
from mindeye.generator import generator_config, load_pipeline, make_scheduler, sampler_name
from mindeye.nsd import ExpDesign, NSDLayout, StimulusBrick
from mindeye.targets import target_clip_config

REPO = Path(__file__).resolve().parents[1]
FEW_STEPS = (1, 2, 4)
TEACHER_SAMPLERS = ("euler", "euler_karras", "dpmpp", "ddim")
GUIDANCE_SWEEP = (1.0, 2.0, 3.0, 5.0)
OTHER_SEEDS = 10_000  # offset of the independent teacher samples' seeds
DRAWS, REFERENCE_DRAWS = 1_000_000, 2_000_000  # seed offsets of the pipelines' own draws: every method's, the reference's


@dataclass
class Row:
    who: str
    sampler: str
    steps: int
    images: np.ndarray = field(repr=False)
    evals_per_image: float
    s_per_image: float
    scores: dict[str, float] = field(default_factory=dict)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the full-step generator folder")
    parser.add_argument("--student", type=Path, nargs="+", required=True, help="distilled student folders")
    parser.add_argument("--images", type=int, default=30, help="held-out scenes (default 30: all shared images)")
    parser.add_argument("--world", type=Path, default=REPO / "data/world/tiny", help="the world's root")
    parser.add_argument("--seed", type=int, default=0, help="image i is generated with seed + i")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/student_vs_teacher.txt")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- data and models

def held_out_scenes(root: Path, n: int) -> np.ndarray:
    """uint8 (n, H, W, 3): the world's first n shared (test) images; writes the tiny world if it is absent."""
    layout = NSDLayout(root)
    if not layout.stimuli().is_file():
        subprocess.run([str(Path(sys.executable).parent / "mindeye-world"), f"out_dir={root}", "progress=false"],
                       check=True)
    shared = ExpDesign.read(layout.expdesign()).shared_images
    if not 2 <= n <= len(shared):
        raise SystemExit(f"--images must be in [2, {len(shared)}] (the world's shared images), got {n}")
    return StimulusBrick(layout.stimuli())[shared[:n]]


def world_clip_config(root: Path):
    return target_clip_config(OmegaConf.create({"root": str(root), "clip": "world"}))


def teacher_sampling(folder: Path) -> dict:
    """steps and guidance_scale the teacher was trained to sample with: its run's config beside the folder,
    else configs/generator/tiny.yaml's."""
    run_config = folder.parent / "run_config.yaml"
    if run_config.is_file():
        return dict(OmegaConf.load(run_config).generator.sampling)
    return generator_config("tiny")["sampling"]


# ---------------------------------------------------------------- generating and scoring

def generate(pipe, tokens_nld: torch.Tensor, steps: int, guidance: float, seed: int, size: int,
             draws: int = DRAWS) -> tuple[np.ndarray, float, float]:
    """uint8 (N, size, size, 3) images, one per token set at batch 1 from the starting noise of seed + i and the
    pipeline's other draws from seed + draws + i; the median seconds per image and the UNet evaluations per image
    (a guided step counts 2)."""
    batches: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    images, seconds = [], []
    shape = (1, pipe.sample_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    try:
        for i, tokens_1ld in enumerate(tokens_nld.split(1)):
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
            start = time.perf_counter()
            images.append(pipe(tokens_1ld, num_inference_steps=steps, guidance_scale=guidance, latents=noise,
                               generator=torch.Generator().manual_seed(seed + draws + i), output_size=size).images)
            seconds.append(time.perf_counter() - start)
    finally:
        hook.remove()
    return np.concatenate(images), float(np.median(seconds)), sum(batches) / len(tokens_nld)


def run(pipe, who: str, steps: int, guidance: float, tokens_nld, seed: int, size: int, draws: int = DRAWS) -> Row:
    images, s_per_image, evals = generate(pipe, tokens_nld, steps, guidance, seed, size, draws)
    print(f"  {who} {sampler_name(pipe.scheduler)} {steps} steps, guidance {guidance:g}: {s_per_image:.3f} s/image",
          flush=True)
    return Row(who, sampler_name(pipe.scheduler), steps, images, evals, s_per_image)


def rmse(images_nhwc: np.ndarray, reference_nhwc: np.ndarray) -> float:
    """Per-image RMSE over pixels in [0, 1], mean over images."""
    diff = (images_nhwc.astype(np.float64) - reference_nhwc.astype(np.float64)) / 255.0
    return float(np.sqrt((diff ** 2).reshape(len(diff), -1).mean(axis=1)).mean())


def or_nan(metric, *args) -> float:
    """metric(*args), or NaN where a correlation is undefined (a constant image or feature row)."""
    try:
        return metric(*args)
    except ValueError as error:
        if "constant" not in str(error):
            raise
        return float("nan")


def score(row: Row, reference: np.ndarray, seen: np.ndarray, seen_features: np.ndarray,
          features: ClipTokenFeatures) -> Row:
    row.scores = {"rmse_t": rmse(row.images, reference), "dssim_t": 1.0 - ssim(row.images, reference),
                  "pixcorr": or_nan(pixcorr, row.images, seen), "ssim": ssim(row.images, seen),
                  "two_way": or_nan(two_way_identification, features(row.images), seen_features)}
    return row


# ---------------------------------------------------------------- the report

def best_teacher_samplers(rows: list[Row]) -> dict[int, Row]:
    """{steps: the few-step teacher row closest to the reference (lowest RMSE->T)}."""
    best: dict[int, Row] = {}
    for row in rows:
        if row.who == "teacher" and row.steps in FEW_STEPS and (
                row.steps not in best or row.scores["rmse_t"] < best[row.steps].scores["rmse_t"]):
            best[row.steps] = row
    return best


def table(rows: list[Row], reference: Row) -> list[str]:
    best = {id(row) for row in best_teacher_samplers(rows).values()}
    lines = [f"{'method':22}{'sampler':>13}{'steps':>6}{'UNet/img':>9}{'RMSE->T':>9}{'1-SSIM->T':>10}"
             f"{'PixCorr':>9}{'SSIM':>7}{'2-way':>7}{'s/img':>8}{'x T':>7}"]
    for row in rows:
        s = row.scores
        lines.append(f"{row.who:22}{row.sampler + ('*' if id(row) in best else ''):>13}{row.steps:>6}"
                     f"{row.evals_per_image:>9.0f}{s['rmse_t']:>9.4f}{s['dssim_t']:>10.4f}{s['pixcorr']:>9.3f}"
                     f"{s['ssim']:>7.3f}{s['two_way']:>7.3f}{row.s_per_image:>8.3f}"
                     f"{row.s_per_image / reference.s_per_image:>7.3f}")
    return lines


def verdict(student: Row, rows: list[Row], reference: Row, independent: Row) -> list[str]:
    teacher = best_teacher_samplers(rows)[max(FEW_STEPS)]
    s, t, ref = student.scores, teacher.scores, reference.scores
    beats = s["rmse_t"] < t["rmse_t"] and s["dssim_t"] < t["dssim_t"]
    floor = next(row for row in rows if row.who == "teacher (another draw)").scores["rmse_t"]
    return [
        f"{student.steps}-step student ({student.sampler}) vs the {teacher.steps}-step teacher's best sampler "
        f"({teacher.sampler}): "
        f"{'BEATS it' if beats else 'does NOT beat it'} on both distances to the full teacher (RMSE->T {s['rmse_t']:.4f} "
        f"vs {t['rmse_t']:.4f}, 1-SSIM->T {s['dssim_t']:.4f} vs {t['dssim_t']:.4f}); against the seen images "
        f"2-way {s['two_way']:.3f} vs {t['two_way']:.3f}, PixCorr {s['pixcorr']:.3f} vs {t['pixcorr']:.3f}, "
        f"SSIM {s['ssim']:.3f} vs {t['ssim']:.3f}",
        f"{student.steps}-step student ({student.sampler}) vs the full teacher ({reference.steps} steps): 2-way "
        f"{s['two_way']:.3f} vs "
        f"{ref['two_way']:.3f}, PixCorr {s['pixcorr']:.3f} vs {ref['pixcorr']:.3f}, SSIM {s['ssim']:.3f} vs "
        f"{ref['ssim']:.3f}; RMSE->T {s['rmse_t']:.4f} (the full teacher from the same noise with another "
        f"unconditional draw: {floor:.4f}; from other noise: {independent.scores['rmse_t']:.4f}); {reference.s_per_image / student.s_per_image:.1f}x faster, "
        f"{reference.evals_per_image / student.evals_per_image:.0f}x fewer UNet evaluations"]


def sweep_line(sweep: dict[float, Row], steps: int, sampler: str, default: float) -> str:
    parts = [f"g={g:g}: 2-way {row.scores['two_way']:.3f}, PixCorr {row.scores['pixcorr']:.3f}"
             for g, row in sweep.items()]
    top = max(sweep, key=lambda g: (sweep[g].scores["two_way"], sweep[g].scores["pixcorr"]))
    return (f"guidance sweep (teacher {sampler}, {steps} steps): " + "; ".join(parts)
            + f" -> highest 2-way at g={top:g} (now {default:g})")


def timesteps_line(base) -> str:
    """The training timesteps each few-step teacher sampler evaluates the UNet at."""
    walked = []
    for name in TEACHER_SAMPLERS:
        sampler = make_scheduler(name, base)
        for n in FEW_STEPS:
            sampler.set_timesteps(n)
            walked.append(f"{name} {n}: {[round(float(t)) for t in sampler.timesteps]}")
    return "timesteps walked: " + "; ".join(walked)


# ---------------------------------------------------------------- main

def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])
    print(f"Command: {command}", flush=True)

    seen = held_out_scenes(args.world, args.images)
    clip_cfg = world_clip_config(args.world)
    features = ClipTokenFeatures(build_clip_embedder(clip_cfg))
    seen_features = features(seen)
    tokens_nld = torch.from_numpy(seen_features).reshape(len(seen), -1, features.embedder.dim)
    teacher = load_pipeline(args.teacher, clip_id=clip_identity(clip_cfg))
    students = [load_pipeline(folder, clip_id=clip_identity(clip_cfg)) for folder in args.student]
    if teacher.is_student or not all(student.is_student for student in students):
        raise SystemExit("--teacher must be a full-step generator and --student distilled ones")
    sampling = teacher_sampling(args.teacher)
    steps, guidance = int(sampling["steps"]), float(sampling["guidance_scale"])
    full_sampler, base = sampler_name(teacher.scheduler), teacher.scheduler
    size, seed = seen.shape[1], args.seed

    reference = run(teacher, "teacher (reference)", steps, guidance, tokens_nld, seed, size, REFERENCE_DRAWS)
    rows = [reference, run(teacher, "teacher (another draw)", steps, guidance, tokens_nld, seed, size)]
    for n in FEW_STEPS:
        for name in TEACHER_SAMPLERS:
            teacher.scheduler = make_scheduler(name, base)
            rows.append(run(teacher, "teacher", n, guidance, tokens_nld, seed, size))
    teacher.scheduler = base
    rows.append(run(teacher, "teacher (T's draw)", max(FEW_STEPS), guidance, tokens_nld, seed, size, REFERENCE_DRAWS))
    rows += [run(student, "student", n, guidance, tokens_nld, seed, size) for student in students for n in FEW_STEPS]
    independent = run(teacher, "teacher (other seeds)", steps, guidance, tokens_nld, seed + OTHER_SEEDS, size)
    rows.append(independent)
    sweep = {g: reference if g == guidance else run(teacher, "teacher", steps, g, tokens_nld, seed, size,
                                                     REFERENCE_DRAWS)
             for g in GUIDANCE_SWEEP}
    for row in {id(r): r for r in [*rows, *sweep.values()]}.values():
        score(row, reference.images, seen, seen_features, features)

    header = [f"Command: {command}",
              f"teacher {args.teacher} ({full_sampler}, {steps} steps, guidance {guidance:g}); students "
              + ", ".join(f"{folder} ({sampler_name(student.scheduler)})"
                          for folder, student in zip(args.student, students))
              + f", guidance {guidance:g} folded in",
              f"{len(seen)} held-out scenes (the world's shared images, {args.world}), true CLIP tokens "
              f"{tuple(tokens_nld.shape[1:])}, {size} px, starting noise of seed {seed} + i for image i in every method, "
              f"the pipelines' other draws (unconditional tokens, LCM's noise) of seed {seed} + {DRAWS} + i and "
              f"the reference's of seed {seed} + {REFERENCE_DRAWS} + i; batch 1, "
              f"{torch.get_num_threads()} CPU thread(s), load average {os.getloadavg()[0]:.2f}",
              "T = the reference (first row); * = the teacher sampler closest to T at its step count; "
              "2-way on world CLIP features (chance 0.5)", ""]
    four_step = [r for r in rows if r.who == "student" and r.steps == max(FEW_STEPS)]
    verdicts = [line for student in four_step for line in verdict(student, rows, reference, independent)]
    lines = [*header, *table(rows, reference), "", *verdicts,
             sweep_line(sweep, steps, full_sampler, guidance), timesteps_line(base),
             f"total {time.perf_counter() - started:.0f} s"]
    print("\n" + "\n".join(lines[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
