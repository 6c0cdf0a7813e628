"""Parity: every backend's graphs against eager PyTorch on the same random inputs, within documented tolerances.

The error of a graph's output is max |y - y_eager| / max |y_eager| (relative to the output's own scale,
so one tolerance serves tokens, latents and pixels alike); a graph's error is its worst output's, over
every batch size checked (the batch dimension is dynamic: 1 and a larger one). Tolerances (docs/export.md):
float32 backends compute the same operations in another order, which costs ~1e-6; fp16/bf16 engines
round every activation to 11/8 mantissa bits; int8 weights cost about a percent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mindeye.bundle import Bundle, GraphSet

TOLERANCES = {"eager": 0.0, "compile": 1e-4, "onnxruntime": 1e-4, "onnxruntime-int8": 0.1,
              "tensorrt-fp32": 1e-3, "tensorrt-fp16": 2e-2, "tensorrt-bf16": 5e-2}


@dataclass(frozen=True)
class GraphParity:
    graph: str
    error: float  # max |y - y_eager| / max |y_eager|, worst output and batch
    cosine: float  # lowest cosine similarity of a flattened output row with eager's
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def to_json(self) -> dict:
        return {"relative_error": self.error, "min_cosine": self.cosine, "tolerance": self.tolerance,
                "passed": self.passed}


def check_parity(bundle: Bundle, reference: GraphSet, candidate: GraphSet, tolerance: float, *,
                 batches: tuple[int, ...] = (1, 3), seed: int = 0) -> list[GraphParity]:
    """Each graph `candidate` runs, against `reference` (eager), on seeded random inputs of each batch size."""
    results = []
    for name in bundle.manifest["interface"]:
        if name not in candidate:
            continue
        spec = bundle.interface(name)
        error, cosine = 0.0, 1.0
        for batch in batches:
            generator = torch.Generator().manual_seed(seed + batch)
            inputs = [tensor.example(batch, generator) for tensor in spec.inputs]
            for want, got in zip(reference(name, *inputs), candidate(name, *inputs)):
                want, got = want.float().cpu(), got.float().cpu()
                error = max(error, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
                cosine = min(cosine, float(torch.nn.functional.cosine_similarity(
                    got.flatten(1), want.flatten(1), dim=1).min()))
        results.append(GraphParity(name, error, cosine, tolerance))
    return results


def format_parity(backend: str, results: list[GraphParity]) -> str:
    lines = [f"parity {backend} vs eager:"]
    lines += [f"  {r.graph:20s} relative error {r.error:.2e} (tolerance {r.tolerance:.0e}), min cosine "
              f"{r.cosine:.6f}: {'ok' if r.passed else 'FAILED'}" for r in results]
    return "\n".join(lines)
