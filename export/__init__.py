"""Export: checkpoint -> export bundle (ONNX, TensorRT engines, torch.compile) and few-step distillation.

Not built yet (see the open issues); realtime/ will load only what this stage writes.
"""
