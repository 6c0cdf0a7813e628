"""The bundle's graphs as ONNX files: torch.onnx.export's current (dynamo) exporter, checked by onnx.checker.

Each graph (mindeye.bundle.graphs) is exported with a dynamic batch dimension, its inputs and outputs named
as its spec says. A graph whose weights pass 1.5 GiB keeps them in `<file>.data` beside it (ONNX's
external data): one protobuf cannot exceed 2 GB and torch's exporter switches at that size too; the
paper-size heads graph (the backbone's 1.7 B-parameter token linear) is one. `quantize_int8` writes ONNX
Runtime's dynamic int8 quantisation of a graph: int8 weights of its MatMul/Gemm, activations quantised per
call; convolutions stay float, as ONNX Runtime's int8 convolution (ConvInteger) ran a UNet step 2.6x
slower than float on this CPU (benchmarks/results/backend_latency.txt).
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from torch import nn

from mindeye.bundle import BATCH, sha256_file
from mindeye.bundle.graphs import GraphSpec

EXTERNAL_DATA_BYTES = 1536 << 20
log = logging.getLogger(__name__)


def export_graph(module: nn.Module, spec: GraphSpec, path: Path) -> dict:
    """Write `module` as ONNX at `path`, check it, and return its manifest record (file, hash, external data)."""
    module = module.eval()
    batch = torch.export.Dim(BATCH, min=1, max=1024)
    # example batch 2: a batch of 1 would let the exporter specialise the batch dimension to a constant
    example = tuple(tensor.example(2) for tensor in spec.inputs)
    dynamic = tuple({0: batch} for _ in spec.inputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, example, str(path), dynamo=True, input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_shapes=dynamic,
                          external_data=external, verbose=False)
    onnx.checker.check_model(str(path), full_check=False)  # by path: works beyond 2 GB with external data
    data = path.with_name(path.name + ".data")
    record = {"file": path.relative_to(path.parents[1]).as_posix(), "sha256": sha256_file(path),
              "weight_bytes": weight_bytes, "external_data": []}
    if data.is_file():
        record["external_data"].append({"file": data.relative_to(path.parents[1]).as_posix(),
                                        "sha256": sha256_file(data)})
    log.info("exported %s (%.1f MB of weights%s)", path.name, weight_bytes / 1e6, ", external data" if external else "")
    return record


def quantize_int8(path: Path) -> dict:
    """ONNX Runtime's dynamic int8 quantisation of the graph at `path`, written beside it as `<stem>.int8.onnx`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    external = path.with_name(path.name + ".data").is_file()
    # the exporter's recorded intermediate shapes trip the quantiser's own shape inference (an initializer's
    # transposed shape "differs"); without them it infers every shape afresh
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    # 7-bit weights (reduce_range): on x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels add pairs of
    # products in 16 bits, which 8-bit weights saturate (the heads graph's int8 error was 97 % on an AVX2-only
    # EPYC, within its 10 % budget elsewhere); a bundle is exported once and runs on whatever CPU it meets
    quantize_dynamic(model, str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     reduce_range=True, use_external_data_format=external)
    onnx.checker.check_model(str(out), full_check=False)
    return {"file": out.relative_to(out.parents[1]).as_posix(), "sha256": sha256_file(out)}
