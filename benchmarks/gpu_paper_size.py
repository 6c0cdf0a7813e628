"""The paper-size decode path end to end on one GPU, per backend, against REFERENCE.md section 6's floors.

Prepared for a GPU host (not run on the CPU machine this was written on). Random weights at the paper
sizes (configs/model/paper: aligner 15,724 voxels -> 4096, backbone, 256 x 1664 tokens, 6-layer prior;
configs/generator/paper: the SDXL-layout unCLIP UNet with a student's guidance embedding, 96 x 96 latents,
SDXL's VAE decoder to 768 px), exported into a bundle with ONNX graphs (`export.cli.export_bundle`, parity
checked on the GPU), then for each backend (eager bf16, torch.compile bf16, ONNX Runtime CUDA fp32,
TensorRT fp16 when installed), batch 1, after warm-up, median and p95 of:
heads, one prior step, one UNet step, one VAE decode, and the whole path (heads + 15 prior steps + 4
student steps + decode), each against its floor: backbone ~1.2 ms, prior ~0.26 ms a step, UNet ~3.8 ms a
call, VAE decode ~5.8 ms at 768 px (bf16 peak estimates, H100), so whole path ~ 1.2 + 15 x 0.26 + 4 x 3.8
+ 5.8 = 26 ms.

    pip install '.[tensorrt]'            # optional: the TensorRT rows
    python benchmarks/gpu_paper_size.py --out benchmarks/results/gpu_paper_size.txt

Host needs: one CUDA GPU with >= 40 GB, ~60 GB RAM and disk for the weights (~17 GB; ~40 GB more with the
fp32 ONNX graphs of the onnxruntime-cuda and tensorrt rows, which need onnxruntime-gpu / tensorrt). Each line
is printed as it is measured, so a run cut short keeps what it measured. `--size tiny --device cpu
--backends eager-bf16` runs the same script in seconds without a GPU (its floors are the paper's: ignore them).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_latency import SIZES as CPU_SIZES, SUBJECT, Size, random_sources  # noqa: E402  benchmarks/: the same sources
from timing import timed  # noqa: E402  and the same clock

from export.cli import export_bundle  # noqa: E402
from mindeye.bundle import GENERATOR_DECODER, GENERATOR_UNET, PRIOR_DENOISER, heads_graph  # noqa: E402
from mindeye.generator import GenerationSettings  # noqa: E402
from realtime.backends import load_backend  # noqa: E402

SIZES = {"paper": Size("paper", 15724, "paper", 96), "tiny": CPU_SIZES["tiny"]}
PRIOR_STEPS, GENERATOR_STEPS = 15, 4
FLOORS_MS = {"heads": 1.2, "prior step": 0.26, "unet step": 3.8, "image decode": 5.8,
             "decode+generate": 1.2 + PRIOR_STEPS * 0.26 + GENERATOR_STEPS * 3.8 + 5.8}
BACKENDS = {"eager-bf16": dict(backend="eager", dtype=torch.bfloat16),
            "compile-bf16": dict(backend="compile", dtype=torch.bfloat16),
            "onnxruntime-cuda": dict(backend="onnxruntime"),
            "tensorrt-fp16": dict(backend="tensorrt", precision="fp16", max_batch=4)}
NEEDS_ONNX = ("onnxruntime-cuda", "tensorrt-fp16")


def missing(backend: str) -> str | None:
    """Why `backend` cannot run here, or None."""
    if backend == "onnxruntime-cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)"
    if backend == "tensorrt-fp16" and importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install '.[tensorrt]')"
    return None


def synchronized(call, device: str):
    def run():
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return run


def say(line: str, lines: list[str]) -> None:
    print(line, flush=True)
    lines.append(line)


def time_backend(name: str, bundle, size: Size, args, lines: list[str]) -> None:
    """One backend's rows: each graph alone, then the whole decode + generate path."""
    backend = load_backend(bundle.root, device=args.device, image_size=8 * size.vae_latent, prior_steps=PRIOR_STEPS,
                           prior_sampler="dpmpp", generation=GenerationSettings(GENERATOR_STEPS, 3.0, 0.0),
                           **BACKENDS[name])
    for part, graph in (("heads", heads_graph(SUBJECT)), ("prior step", PRIOR_DENOISER),
                        ("unet step", GENERATOR_UNET), ("image decode", GENERATOR_DECODER)):
        if graph not in bundle.manifest["interface"]:  # a pixel-space generator (tiny) has no decoder
            continue
        inputs = [t.example(1, torch.Generator().manual_seed(0)).to(args.device)
                  for t in bundle.interface(graph).inputs]
        median, p95 = timed(synchronized(lambda: backend.graphs(graph, *inputs), args.device), 5, args.repeats)
        say(f"{part:16s} {name:17s} {median:10.2f} {p95:9.2f} {FLOORS_MS[part]:9.2f} "
            f"{median / FLOORS_MS[part]:7.1f}x", lines)
    betas_1v = np.random.default_rng(0).normal(size=(1, size.voxels)).astype(np.float32)
    median, p95 = timed(synchronized(lambda: backend.decode(SUBJECT, betas_1v), args.device), 2,
                        max(5, args.repeats // 3))
    floor = FLOORS_MS["decode+generate"]
    say(f"{'decode+generate':16s} {name:17s} {median:10.2f} {p95:9.2f} {floor:9.2f} {median / floor:7.1f}x", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", choices=sorted(SIZES), default="paper", help="tiny: a smoke run of this script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=None,
                        help="default: every backend this host can run")
    parser.add_argument("--workdir", type=Path, default=None, help="where the bundle goes (default: a temporary one)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_paper_size.py needs a CUDA GPU (torch sees none); on a CPU run benchmarks/backend_latency.py")
    skipped = {name: missing(name) for name in args.backends or BACKENDS}
    if args.backends and any(skipped.values()):
        sys.exit("; ".join(f"{name}: {why}" for name, why in skipped.items() if why))
    backends = [name for name, why in skipped.items() if why is None]
    size, lines = SIZES[args.size], []
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.device}, nproc {os.cpu_count()}"
    say(f"# {size.model} size on {where}, torch {torch.__version__}, batch 1, {args.repeats} timed calls after "
        f"warm-up; floors: REFERENCE.md section 6 (H100 bf16 estimates)", lines)
    for name, why in skipped.items():
        if why:
            say(f"# skipped {name}: {why}", lines)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        checkpoint, generator = random_sources(size, tmp, device=args.device)
        with_onnx = any(name in NEEDS_ONNX for name in backends)
        bundle = export_bundle(checkpoint, tmp / "bundle", clip_id="benchmark", generator=generator,
                               backend="onnxruntime" if with_onnx else "eager", check_parity=with_onnx,
                               parity_batches=(1,))
        say(f"# random weights + export{' + ONNX Runtime parity' if with_onnx else ''}: "
            f"{time.perf_counter() - started:.0f} s", lines)
        say(f"{'part':16s} {'backend':17s} {'median ms':>10s} {'p95 ms':>9s} {'floor ms':>9s} {'x floor':>8s}", lines)
        for name in backends:
            started = time.perf_counter()
            time_backend(name, bundle, size, args, lines)
            say(f"# {name}: load, compile and timing {time.perf_counter() - started:.0f} s", lines)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the last backend's weights, before the next one loads
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
