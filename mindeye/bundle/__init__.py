"""Export bundles: the artefact between `mindeye-export` and the realtime service (docs/export.md).

    bundle = read_manifest("runs/export/subj01")          # format, version and every file's hash checked
    graphs = load_graphs(bundle, "auto", device="cpu")    # the bundle's graphs on the fastest backend here
    graphs("heads.subj01", voxels_bv)                     # -> (backbone tokens, retrieval tokens, low-level latent)

Backends, fastest first where present (benchmarks/results/backend_latency.txt): TensorRT engines (a CUDA
GPU with TensorRT), ONNX Runtime (the bundle's ONNX graphs), torch.compile (on a GPU only: on a CPU it
does not beat eager by enough to pay its minutes of compiling), eager PyTorch (always).
"""
from __future__ import annotations

import importlib.util

import torch

from mindeye.bundle.graphs import GraphSet, TorchGraphs, generator_graphs, model_graphs
from mindeye.bundle.manifest import (BATCH, FORMAT, FORMAT_VERSION, GENERATOR_DECODER, GENERATOR_UNET, MANIFEST_FILE,
                                     PRIOR_DENOISER, Bundle, heads_graph, read_manifest, sha256_file, sha256_folder,
                                     write_manifest)
from mindeye.bundle.sampling import sample_prior
from mindeye.errors import ConfigValueError

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")

__all__ = ["BACKENDS", "BATCH", "FORMAT", "FORMAT_VERSION", "GENERATOR_DECODER", "GENERATOR_UNET", "MANIFEST_FILE",
           "PRIOR_DENOISER", "Bundle", "GraphSet", "TorchGraphs", "available_backends", "generator_graphs",
           "heads_graph", "load_graphs", "model_graphs", "read_manifest", "resolve_backend", "sample_prior",
           "sha256_file", "sha256_folder", "write_manifest"]


def available_backends(bundle: Bundle, device: str = "cpu") -> list[str]:
    """The backends that can run `bundle` on `device` here, fastest first."""
    on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
    present = []
    if bundle.graphs and on_gpu and importlib.util.find_spec("tensorrt") is not None:
        present.append("tensorrt")
    if bundle.graphs and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        if not on_gpu or "CUDAExecutionProvider" in ort.get_available_providers():
            present.append("onnxruntime")
    if on_gpu:
        present.append("compile")
    present.append("eager")
    return present


def resolve_backend(backend: str, bundle: Bundle, device: str = "cpu") -> str:
    """`backend`, or for "auto" the fastest of `available_backends`; unknown names are refused."""
    if backend == "auto":
        return available_backends(bundle, device)[0]
    if backend not in BACKENDS:
        raise ConfigValueError(f"unknown decode backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    return backend


def load_graphs(bundle: Bundle, backend: str = "auto", *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                threads: int | None = None, int8: bool = False, precision: str = "fp16",
                max_batch: int = 8) -> GraphSet:
    """The bundle's graphs (model and generator) on `backend` ("auto": the fastest present).

    eager / compile load the bundle's checkpoint and generator weights into torch (`dtype`); onnxruntime
    runs its ONNX graphs (`threads` intra-op threads; `int8`: the quantised graphs where exported);
    tensorrt builds or loads engines of `precision` for batches up to `max_batch`.
    """
    backend = resolve_backend(backend, bundle, device)
    if backend in ("onnxruntime", "tensorrt") and not bundle.graphs:
        raise ConfigValueError(f"the bundle {bundle.root} was exported for {bundle.manifest['backend']} and holds no "
                               f"ONNX graphs, which {backend} runs: re-export it with mindeye-export backend={backend}")
    if backend in ("eager", "compile"):
        from mindeye.generator import load_pipeline
        from mindeye.models import load_checkpoint

        model = load_checkpoint(bundle.checkpoint_dir, verify_hash=False)  # read_manifest checked its hash
        modules = model_graphs(model, list(bundle.subjects))
        if bundle.generator_dir is not None:
            modules.update(generator_graphs(load_pipeline(bundle.generator_dir)))
        return TorchGraphs(modules, device=device, dtype=dtype, compile=backend == "compile")
    if backend == "onnxruntime":
        from mindeye.bundle.ort_runner import OrtGraphs

        return OrtGraphs(bundle, device=device, threads=threads, int8=int8)
    from mindeye.bundle.tensorrt import TensorRTGraphs

    return TensorRTGraphs(bundle, device=device, precision=precision, max_batch=max_batch)
