"""The bundle's ONNX graphs on ONNX Runtime: CPU or CUDA execution provider, all graph optimisations on.

On the CPU the tensors go through numpy (no copy for contiguous float32); on CUDA they stay on the device:
inputs and preallocated outputs are bound by pointer (I/O binding), so a call copies nothing to the host.
`int8=True` runs the dynamically quantised graphs (int8 weights, activations quantised per call) that
mindeye-export wrote beside the float ones (`quantize_int8=true`); graphs it did not quantise run in float.
"""
from __future__ import annotations

import numpy as np
import torch

from mindeye.bundle.graphs import GraphSpec
from mindeye.bundle.manifest import BATCH, Bundle
from mindeye.errors import ConfigValueError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
INSTALL_GPU = "pip install onnxruntime-gpu (in place of onnxruntime) on the GPU host"


class OrtGraphs:
    backend = "onnxruntime"

    def __init__(self, bundle: Bundle, *, device: str = "cpu", threads: int | None = None, int8: bool = False,
                 names: list[str] | None = None):
        import onnxruntime as ort

        self.device = torch.device(device)
        if self.device.type not in PROVIDERS:
            raise ConfigValueError(f"ONNX Runtime runs on cpu or cuda, got device {device!r}")
        providers = PROVIDERS[self.device.type]
        if providers[0] not in ort.get_available_providers():
            raise ConfigValueError(f"this onnxruntime has no {providers[0]} (it has {ort.get_available_providers()}): "
                                   f"{INSTALL_GPU}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.specs, self.sessions, self.int8_graphs = {}, {}, []
        for name, record in bundle.graphs.items():
            if names is not None and name not in names:
                continue
            path = bundle.graph_path(name)
            if int8 and record.get("int8"):
                path = bundle.root / record["int8"]["file"]
                self.int8_graphs.append(name)
            self.specs[name] = bundle.interface(name)
            self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)

    def __contains__(self, name: str) -> bool:
        return name in self.sessions

    def __call__(self, name: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec, session = self.specs[name], self.sessions[name]
        if self.device.type == "cpu":
            feeds = {s.name: np.ascontiguousarray(x.detach().cpu().numpy().astype(s.dtype, copy=False))
                     for s, x in zip(spec.inputs, inputs)}
            return tuple(torch.from_numpy(y) for y in session.run(None, feeds))
        return self._run_bound(spec, session, inputs)

    def _run_bound(self, spec: GraphSpec, session, inputs) -> tuple[torch.Tensor, ...]:
        binding = session.io_binding()
        index = self.device.index or 0
        kept = []  # the bound tensors must outlive the run
        for s, x in zip(spec.inputs, inputs):
            x = x.detach().to(self.device, getattr(torch, s.dtype)).contiguous()
            kept.append(x)
            binding.bind_input(s.name, "cuda", index, np.dtype(s.dtype), tuple(x.shape), x.data_ptr())
        batch = inputs[0].shape[0]
        outputs = [torch.empty([batch if d == BATCH else d for d in s.shape], dtype=getattr(torch, s.dtype),
                               device=self.device) for s in spec.outputs]
        for s, y in zip(spec.outputs, outputs):
            binding.bind_output(s.name, "cuda", index, np.dtype(s.dtype), tuple(y.shape), y.data_ptr())
        session.run_with_iobinding(binding)
        return tuple(outputs)
