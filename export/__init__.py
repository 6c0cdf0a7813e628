"""Export: checkpoint -> export bundle, and few-step distillation of the generator.

`cli` (mindeye-export) writes the bundle (docs/export.md): the checkpoint and generator, ONNX graphs
(`onnx_graphs`), parity against eager (`parity`). Reading and running bundles is the core's
(mindeye.bundle), so realtime/ never imports this package. `distill` (mindeye-distill) makes the student.
"""
