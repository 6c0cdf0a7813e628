"""Where a small-world pretraining step spends its time on this CPU, in float32 and in bfloat16 autocast.

One global batch as `mindeye-train world=small model=small train=small` makes it (7 subjects x 24 trials,
~2,500 voxels each, 64 x 128 CLIP tokens; the claim benchmark's `model.low_level.enabled=false`), with
random weights and inputs. Each stage is timed on its own, the precisions alternating step by step so that
load falls on both alike: the target rows read from an hdf5 cache laid out as mindeye.targets writes it
(float16, one chunk per image) or held in memory (`data.targets_in_memory_mb`), the aligners + backbone +
retrieval head, the prior's loss, the backward pass and the AdamW step. Medians over `--steps` steps.
bfloat16 pays off where the CPU has AMX or AVX512-BF16 (the flags are printed); elsewhere it is emulated.

    .venv/bin/python benchmarks/train_step_profile.py > benchmarks/results/train_step_profile.txt
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch

from mindeye.models import build_model
from mindeye.models.prior import draw_noise
from mindeye.targets import TargetRows
from offline_training.losses import soft_clip_loss, unit_rows
from offline_training.trainer import TargetTable, TrainingModule, make_optimizer

SUBJECTS, BATCH_PER_SUBJECT, VOXELS, TOKENS, DIM = 7, 24, 2500, 64, 128
IMAGES = 150 + 8 * 850  # the small world's stimuli: shared + unique per subject


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").is_file() else ""
    return " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()) or "none"


class StageTimes:
    def __init__(self):
        self.seconds: dict[tuple[str, str], list[float]] = {}

    @contextmanager
    def stage(self, precision: str, name: str):
        start = time.perf_counter()
        yield
        self.seconds.setdefault((precision, name), []).append(time.perf_counter() - start)

    def median(self, precision: str, name: str) -> float:
        return statistics.median(self.seconds[(precision, name)])


def write_cache(path: Path, rng: np.random.Generator) -> None:
    """A target cache of the small world's size and layout (float16 rows, one hdf5 chunk per image)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("computed", data=np.ones(IMAGES, bool))
        f.create_dataset("tokens", data=rng.standard_normal((IMAGES, TOKENS, DIM)).astype(np.float16),
                         chunks=(1, TOKENS, DIM))
        f.create_dataset("low_level", data=rng.standard_normal((IMAGES, 3, 28, 28)).astype(np.float16),
                         chunks=(1, 3, 28, 28))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision (after one warm-up)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    names = [f"subj0{i}" for i in range(1, SUBJECTS + 1)]
    model = build_model("small", voxels_per_subject=dict.fromkeys(names, VOXELS), clip_tokens=TOKENS, clip_dim=DIM,
                        low_level={"enabled": False})
    module = TrainingModule(model).train()
    optimizer = make_optimizer(module, 1e-4, 1e-2)
    batch = SUBJECTS * BATCH_PER_SUBJECT
    voxels = [(name, torch.randn(BATCH_PER_SUBJECT, VOXELS)) for name in names]
    times = StageTimes()

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "targets.hdf5"
        write_cache(cache, rng)
        from_file = TargetTable(TargetRows(cache, np.arange(IMAGES)))
        held = TargetTable(TargetRows(cache, np.arange(IMAGES)), memory_budget_mb=1024)

        def step(precision: str, record: bool) -> None:
            ids = rng.choice(IMAGES, batch)
            for label, table in (("targets, hdf5 per batch", from_file), ("targets, held in memory", held)):
                with times.stage(precision, label):
                    image_bnd, _ = table.get(ids)
            t_b, noise_bnd, keep_b = draw_noise(batch, TOKENS, DIM, 100, 0.2)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                with times.stage(precision, "aligners + backbone + retrieval head"):
                    aligned_bh = torch.cat([model.aligner(v, name) for name, v in voxels])
                    _, tokens_bnd = model.backbone(aligned_bh)
                    retrieval_bnd = model.retrieval_head(tokens_bnd)
                with times.stage(precision, "prior loss"):
                    prior = model.prior.loss_per_row(tokens_bnd, image_bnd, t_b, noise_bnd, keep_b).mean()
                loss = 30 * prior + soft_clip_loss(unit_rows(retrieval_bnd), unit_rows(image_bnd), 0.005)
            with times.stage(precision, "backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with times.stage(precision, "AdamW step"):
                optimizer.step()
            if not record:
                times.seconds = {}

        precisions = ("float32", "bfloat16")
        for precision in precisions:
            step(precision, record=False)
        for _ in range(args.steps):
            for precision in precisions:
                step(precision, record=True)

    print(f"# train step profile: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"bf16 CPU flags: {cpu_flags()}; torch {torch.__version__}")
    print(f"# batch {batch} trials ({SUBJECTS} subjects x {BATCH_PER_SUBJECT}), {VOXELS} voxels, {TOKENS} x {DIM} "
          f"tokens, model=small without the low-level head; median of {args.steps} steps")
    stages = list(dict.fromkeys(name for _, name in times.seconds))
    print(f"{'stage':40s} {'float32 ms':>11s} {'share':>6s} {'bfloat16 ms':>12s} {'share':>6s} {'speed-up':>9s}")
    compute = [s for s in stages if not s.startswith("targets")]
    totals = {}
    for precision in precisions:  # a step: the per-batch hdf5 read (as before) or the held rows, plus compute
        totals[precision] = {label: sum(times.median(precision, s) for s in compute) + times.median(precision, label)
                             for label in ("targets, hdf5 per batch", "targets, held in memory")}
    reference = totals["float32"]["targets, hdf5 per batch"]
    for s in stages:
        f32, b16 = times.median("float32", s), times.median("bfloat16", s)
        print(f"{s:40s} {1e3 * f32:11.1f} {f32 / reference:6.1%} {1e3 * b16:12.1f} {b16 / reference:6.1%} "
              f"{f32 / b16:8.2f}x")
    print()
    for label in ("targets, hdf5 per batch", "targets, held in memory"):
        f32, b16 = totals["float32"][label], totals["bfloat16"][label]
        print(f"step with {label:26s} float32 {1e3 * f32:7.1f} ms  bfloat16 {1e3 * b16:7.1f} ms  "
              f"speed-up over float32 + hdf5: {reference / f32:.2f}x / {reference / b16:.2f}x")


if __name__ == "__main__":
    main()
