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

Host needs: one CUDA GPU with >= 40 GB, ~60 GB RAM and ~40 GB disk (the fp32 ONNX graphs), ~15 minutes.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backend_latency import SUBJECT, Size, random_sources  # noqa: E402  benchmarks/: the same sources
from timing import timed  # noqa: E402  and the same clock

from export.cli import export_bundle  # noqa: E402
from mindeye.bundle import GENERATOR_DECODER, GENERATOR_UNET, PRIOR_DENOISER, heads_graph  # noqa: E402
from mindeye.generator import GenerationSettings  # noqa: E402
from realtime.backends import load_backend  # noqa: E402

PAPER = Size("paper", 15724, "paper", 96)
PRIOR_STEPS, GENERATOR_STEPS = 15, 4
FLOORS_MS = {"heads": 1.2, "prior step": 0.26, "unet step": 3.8, "image decode": 5.8,
             "decode+generate": 1.2 + PRIOR_STEPS * 0.26 + GENERATOR_STEPS * 3.8 + 5.8}


def synchronized(call):
    def run():
        call()
        torch.cuda.synchronize()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None, help="where the bundle goes (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_paper_size.py needs a CUDA GPU (torch sees none); on a CPU run benchmarks/backend_latency.py")
    lines = [f"# paper size on {torch.cuda.get_device_name()}, torch {torch.__version__}, batch 1, "
             f"{args.repeats} timed calls after warm-up; floors: REFERENCE.md section 6 (H100 bf16 estimates)"]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        checkpoint, generator = random_sources(PAPER, tmp)
        started = time.perf_counter()
        bundle = export_bundle(checkpoint, tmp / "bundle", clip_id="benchmark", generator=generator,
                               backend="onnxruntime", parity_batches=(1,))
        lines.append(f"# export + ONNX Runtime parity: {time.perf_counter() - started:.0f} s")
        backends = {"eager-bf16": dict(backend="eager", dtype=torch.bfloat16),
                    "compile-bf16": dict(backend="compile", dtype=torch.bfloat16),
                    "onnxruntime-cuda": dict(backend="onnxruntime")}
        if importlib.util.find_spec("tensorrt") is not None:
            backends["tensorrt-fp16"] = dict(backend="tensorrt", precision="fp16", max_batch=4)
        lines.append(f"{'part':16s} {'backend':17s} {'median ms':>10s} {'p95 ms':>9s} {'floor ms':>9s} {'x floor':>8s}")
        betas_1v = np.random.default_rng(0).normal(size=(1, PAPER.voxels)).astype(np.float32)
        for name, options in backends.items():
            backend = load_backend(bundle.root, device="cuda", image_size=768, prior_steps=PRIOR_STEPS,
                                   prior_sampler="dpmpp", generation=GenerationSettings(GENERATOR_STEPS, 3.0, 0.0),
                                   **options)
            graphs = backend.graphs
            for part, graph in (("heads", heads_graph(SUBJECT)), ("prior step", PRIOR_DENOISER),
                                ("unet step", GENERATOR_UNET), ("image decode", GENERATOR_DECODER)):
                spec = bundle.interface(graph)
                inputs = [t.example(1, torch.Generator().manual_seed(0)).cuda() for t in spec.inputs]
                median, p95 = timed(synchronized(lambda: graphs(graph, *inputs)), 5, args.repeats)
                lines.append(f"{part:16s} {name:17s} {median:10.2f} {p95:9.2f} {FLOORS_MS[part]:9.2f} "
                             f"{median / FLOORS_MS[part]:7.1f}x")
            median, p95 = timed(synchronized(lambda: backend.decode(SUBJECT, betas_1v)), 2, max(5, args.repeats // 3))
            floor = FLOORS_MS["decode+generate"]
            lines.append(f"{'decode+generate':16s} {name:17s} {median:10.2f} {p95:9.2f} {floor:9.2f} "
                         f"{median / floor:7.1f}x")
            del graphs, backend
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
