"""Per-call latency of each decode backend present, and its speed-up over eager PyTorch (random weights).

For each size, a random-weight checkpoint and a student-shaped generator (guidance folded in) are exported
into a bundle with ONNX graphs and int8 graphs (`export.cli.export_bundle`, parity checked), then each backend
runs, batch 1, after warm-up calls:
- heads: one subject's aligner + backbone + retrieval and low-level heads (one graph call);
- prior step: one call of the prior's denoiser;
- unet step: one call of the generator's UNet;
- image decode: one call of an SDXL-layout VAE decoder (the world's generators work in pixels and have
  none, so it is timed on its own at the size's latent side);
- model path: heads + `--prior-steps` prior steps (ModelBackend.decode without a generator);
- decode+generate: the whole path, model path + `--generator-steps` student steps (ModelBackend.decode).
Median and p95 in ms, and eager's median over the backend's. Sizes: tiny (the tiny world's model and
generator, a 64 px VAE decode), medium (configs/model/small + configs/generator/small, a 128 px VAE
decode), paper (what fits this machine: the paper prior's step; the 7 GB heads graph, the 10 GB UNet and
the 768 px decode do not, see the output). torch.compile is measured with --compile (its inductor takes
minutes per graph on this CPU).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/backend_latency.py --threads 1 \
        > benchmarks/results/backend_latency.txt
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.cli import export_bundle
from export.onnx_graphs import export_graph
from mindeye.bundle import GENERATOR_UNET, PRIOR_DENOISER, Bundle, TorchGraphs, heads_graph, load_graphs
from mindeye.bundle.graphs import DecoderGraph, PriorDenoiserGraph
from mindeye.bundle.ort_runner import OrtGraphs
from mindeye.generator import GenerationSettings, build_pipeline, generator_config
from mindeye.models import build_model, load_config, save_calibration, save_checkpoint
from mindeye.models.prior import DiffusionPrior
from realtime.backends import load_backend
from timing import timed  # benchmarks/, the script's folder

SUBJECT = "subj01"


@dataclass(frozen=True)
class Size:
    model: str
    voxels: int
    generator: str
    vae_latent: int  # latent side of the image-decode VAE (x8 pixels); 0: not timed here
    model_overrides: dict = field(default_factory=dict)
    full: bool = True  # False: only the prior step is timed (the rest does not fit this machine)


SIZES = {
    "tiny": Size("tiny", 400, "tiny", 8, {"clip_dim": 64}),
    "medium": Size("small", 2500, "small", 16),
    "paper": Size("paper", 15724, "paper", 0, full=False),
}
PAPER_SKIPPED = ("heads and model path: the backbone's token linear alone is 4096 x 425,984 = 1.74 B parameters, "
                 "7.0 GB in fp32, and the exporter holds ~3 copies: beyond this 23 GB machine shared with other jobs",
                 "unet step and decode+generate: the unCLIP UNet is 2.6 B parameters, 10.4 GB in fp32, one 96 x 96 "
                 "step minutes on 2 cores: measured on a GPU host by benchmarks/gpu_paper_size.py",
                 "image decode at 768 px: ~1 TFLOP a call, minutes a call on this shared 2-core CPU (the 64 px decode "
                 "took 3.3 s eager here): gpu_paper_size.py")


def random_sources(size: Size, folder: Path, device: str = "cpu") -> tuple[Path, Path]:
    """A random-weight checkpoint (with a live-unit calibration) and a student-shaped generator, saved;
    `device`: where the weights are initialised (a GPU draws a paper size's 4 B in seconds, a CPU in minutes)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(size.model, voxels_per_subject={SUBJECT: size.voxels}, **size.model_overrides).eval()
    save_checkpoint(model, folder / "checkpoint")
    save_calibration(folder / "checkpoint", {SUBJECT: (np.zeros(size.voxels, np.float32),
                                                       np.ones(size.voxels, np.float32))},
                     units="percent_signal_change", estimator="random")
    cfg = generator_config(size.generator)
    cfg["unet"]["time_cond_proj_dim"] = 256  # a distilled student: guidance folded in, one UNet call a step
    pipe = build_pipeline(cfg, clip_id="benchmark", clip_tokens=model.config.clip_tokens, sampler="lcm", device=device)
    pipe.save_pretrained(folder / "generator")
    return folder / "checkpoint", folder / "generator"


def graph_backends(bundle: Bundle, threads: int, with_compile: bool) -> dict:
    backends = {"eager": load_graphs(bundle, "eager"),
                "onnxruntime": load_graphs(bundle, "onnxruntime", threads=threads),
                "onnxruntime-int8": load_graphs(bundle, "onnxruntime", threads=threads, int8=True)}
    if with_compile:
        backends["compile"] = load_graphs(bundle, "compile")
    return backends


def time_graph(graphs, bundle_or_specs, name: str, warmup: int, repeats: int) -> tuple[float, float]:
    spec = bundle_or_specs.interface(name)
    inputs = [tensor.example(1, torch.Generator().manual_seed(0)) for tensor in spec.inputs]
    return timed(lambda: graphs(name, *inputs), warmup, repeats)


def standalone_bundle(folder: Path, modules: dict) -> Bundle:
    """A graphs-only Bundle of `modules` exported to ONNX in `folder` (parts timed outside a full bundle)."""
    records = {name: export_graph(module, module.spec(), folder / "graphs" / f"{name}.onnx")
               for name, module in modules.items()}
    return Bundle(folder, {"graphs": records, "interface": {n: m.spec().to_json() for n, m in modules.items()}})


def measure(name: str, size: Size, args, rows: list) -> list[str]:
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warmup, repeats = (3, args.repeats) if size.full else (1, max(3, args.repeats // 4))
        vae_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in generator_config("paper")["vae"].items()}
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        parts = {}
        if size.vae_latent:
            parts["image decode"] = DecoderGraph(AutoencoderKL(**vae_cfg).eval(), size.vae_latent)
        if not size.full:
            config = load_config(size.model)
            parts["prior step"] = PriorDenoiserGraph(DiffusionPrior(config.clip_tokens, config.clip_dim,
                                                                    config.prior).eval())
        names = {"image decode": "generator_decoder", "prior step": PRIOR_DENOISER}
        standalone = standalone_bundle(tmp / "parts", {names[part]: module for part, module in parts.items()})
        for part in parts:
            graphs = {"eager": TorchGraphs({names[part]: parts[part]}),
                      "onnxruntime": OrtGraphs(standalone, threads=args.threads, names=[names[part]])}
            runs = (1, 3) if part == "image decode" else (warmup, repeats)  # seconds a call on this CPU
            figures = {b: time_graph(g, standalone, names[part], *runs) for b, g in graphs.items()}
            rows += [(name, part, b, *f, figures["eager"][0] / f[0]) for b, f in figures.items()]
        if not size.full:
            return list(PAPER_SKIPPED)

        checkpoint, generator = random_sources(size, tmp)
        started = time.perf_counter()
        bundle = export_bundle(checkpoint, tmp / "bundle", clip_id="benchmark", generator=generator,
                               backend="onnxruntime", quantize_int8=True)
        int8_errors = ", ".join(f"{g} {r['relative_error']:.1e}"
                                for g, r in bundle.manifest["parity"]["onnxruntime-int8"].items())
        notes.append(f"export with parity checks: {time.perf_counter() - started:.0f} s; int8 error vs eager: "
                     f"{int8_errors}")
        backends = graph_backends(bundle, args.threads, args.compile)
        for part, graph in (("heads", heads_graph(SUBJECT)), ("prior step", PRIOR_DENOISER),
                            ("unet step", GENERATOR_UNET)):
            figures = {b: time_graph(g, bundle, graph, warmup, repeats) for b, g in backends.items()}
            rows += [(name, part, b, *f, figures["eager"][0] / f[0]) for b, f in figures.items()]
        betas_1v = np.random.default_rng(0).normal(size=(1, size.voxels)).astype(np.float32)
        image_size = bundle.manifest["generator"]["image_size"]
        for part, with_generator in (("model path", False), ("decode+generate", True)):
            figures = {}
            for b in backends:
                backend = load_backend(bundle.root, "onnxruntime" if b.startswith("onnxruntime") else b,
                                       int8=b.endswith("int8"), threads=args.threads, with_generator=with_generator,
                                       image_size=image_size, prior_steps=args.prior_steps, prior_sampler="dpmpp",
                                       generation=GenerationSettings(args.generator_steps, 3.0, 0.0))
                figures[b] = timed(lambda: backend.decode(SUBJECT, betas_1v), 2, max(3, repeats // 2))
            rows += [(name, part, b, *f, figures["eager"][0] / f[0]) for b, f in figures.items()]
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, torch's and ONNX Runtime's")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (paper size: a quarter)")
    parser.add_argument("--prior-steps", type=int, default=15)
    parser.add_argument("--generator-steps", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# backend latency, batch 1, {args.threads} intra-op thread(s); torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# model path = heads + {args.prior_steps} prior steps (dpmpp); decode+generate = that + "
          f"{args.generator_steps} student steps")
    for name in args.sizes:
        rows: list = []
        notes = measure(name, SIZES[name], args, rows)
        print(f"\n## {name}\n{'part':16s} {'backend':17s} {'median ms':>10s} {'p95 ms':>10s} {'speed-up':>9s}")
        for _, part, backend, median, p95, speedup in rows:
            print(f"{part:16s} {backend:17s} {median:10.3f} {p95:10.3f} {speedup:8.2f}x")
        for note in notes:
            print(f"- {note}")
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
