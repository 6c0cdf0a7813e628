"""The bundle's ONNX graphs as TensorRT engines (TensorRT 10's Python API), built on the GPU host.

An engine is specific to the GPU model and the TensorRT version that built it, so engines are built
where they run, from the bundle's ONNX, on first load (or ahead of time by `mindeye-export
backend=tensorrt` on that host), and kept in the bundle's engines/ folder under a name that holds the
graph, the GPU model, the TensorRT version, the precision, the batch range and the ONNX file's hash:
another GPU or TensorRT builds its own, a re-exported graph never meets a stale engine. One timing cache
per GPU model and TensorRT version (engines/timing-<gpu>-trt<version>.cache) makes later builds fast.

Precision: fp16 or bf16 for the layers TensorRT picks, with every normalisation layer (LayerNorm,
GroupNorm: their mean and variance) and reduction held in fp32 (OBEY_PRECISION_CONSTRAINTS), as the
norms' variance over-/underflows in 16 bits; fp32 keeps everything in fp32. Inputs and outputs stay float32.
Dynamic batch: one optimisation profile per engine, batch 1..max_batch, tuned for `opt_batch`.

TensorRT is not a dependency (its wheels fetch NVIDIA's libraries): without it, `require_tensorrt`
fails with what to install.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from mindeye.bundle.graphs import GraphSpec
from mindeye.bundle.manifest import BATCH, ENGINES_DIR, Bundle
from mindeye.errors import ConfigValueError

PRECISIONS = ("fp32", "fp16", "bf16")
INSTALL = "pip install '.[tensorrt]' on a GPU host (an NVIDIA driver and CUDA 12)"


def require_tensorrt():
    """The tensorrt module and a CUDA device, or a ConfigValueError naming what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ConfigValueError(f"decode.backend=tensorrt needs NVIDIA TensorRT, which is not installed: {INSTALL}; "
                               "or choose decode.backend=onnxruntime / eager") from None
    if not torch.cuda.is_available():
        raise ConfigValueError("decode.backend=tensorrt needs a CUDA GPU, and torch sees none; choose "
                               "decode.backend=onnxruntime or eager on this machine")
    return trt


def engine_key(name: str, graph_sha256: str, precision: str, max_batch: int, trt_version: str, gpu: str) -> str:
    """The engine's file name: what it was built from, for which GPU model and TensorRT version."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    return f"{name}.{graph_sha256[:12]}.{slug}.trt{trt_version}.{precision}.b{max_batch}.engine"


def _keep_norms_fp32(trt, network) -> int:
    """Pin normalisation and reduction layers (and their outputs) to fp32; returns how many were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: Path, spec: GraphSpec, engine_path: Path, timing_cache_path: Path, *,
                 precision: str = "fp16", max_batch: int = 8, opt_batch: int = 1, workspace_gb: float = 8.0) -> Path:
    """Build (and save) a serialized engine from an ONNX graph; the timing cache is read and updated."""
    trt = require_tensorrt()
    if precision not in PRECISIONS:
        raise ConfigValueError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only kind in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _keep_norms_fp32(trt, network)
    profile = builder.create_optimization_profile()
    for tensor in spec.inputs:
        shapes = [tuple(batch if d == BATCH else d for d in tensor.shape) for batch in (1, opt_batch, max_batch)]
        profile.set_shape(tensor.name, *shapes)  # min, opt, max
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigValueError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


class TensorRTGraphs:
    """The bundle's graphs as engines on one GPU (built on first load if absent), run on torch's stream."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, *, device: str = "cuda", precision: str = "fp16", max_batch: int = 8,
                 names: list[str] | None = None):
        trt = require_tensorrt()
        self.trt, self.device = trt, torch.device(device if device != "cpu" else "cuda")
        gpu = torch.cuda.get_device_name(self.device)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
        engines = bundle.root / ENGINES_DIR
        timing_cache = engines / f"timing-{slug}-trt{trt.__version__}.cache"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.specs, self.engines, self.contexts = {}, {}, {}
        for name, record in bundle.graphs.items():
            if names is not None and name not in names:
                continue
            spec = bundle.interface(name)
            path = engines / engine_key(name, record["sha256"], precision, max_batch, trt.__version__, gpu)
            if not path.is_file():
                build_engine(bundle.graph_path(name), spec, path, timing_cache, precision=precision,
                             max_batch=max_batch)
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            self.specs[name], self.engines[name] = spec, engine
            self.contexts[name] = engine.create_execution_context()

    def __contains__(self, name: str) -> bool:
        return name in self.contexts

    def __call__(self, name: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trt, spec, engine, context = self.trt, self.specs[name], self.engines[name], self.contexts[name]
        kept = []
        for tensor, x in zip(spec.inputs, inputs):
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(tensor.name))
            x = x.detach().to(self.device, dtype).contiguous()
            kept.append(x)
            context.set_input_shape(tensor.name, tuple(x.shape))
            context.set_tensor_address(tensor.name, x.data_ptr())
        outputs = []
        for tensor in spec.outputs:
            y = torch.empty(tuple(context.get_tensor_shape(tensor.name)),
                            dtype=_torch_dtype(trt, engine.get_tensor_dtype(tensor.name)), device=self.device)
            context.set_tensor_address(tensor.name, y.data_ptr())
            outputs.append(y)
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {name} engine")
        stream.synchronize()
        return tuple(y.float() for y in outputs)


def _torch_dtype(trt, dtype) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32}[dtype]
