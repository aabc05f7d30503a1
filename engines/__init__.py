"""Backbone runtimes (torch eager/compile, ONNX Runtime, TensorRT) behind one ``run(batch) -> (output, taps)``
interface. Optional runtimes (tensorrt, torch_tensorrt, pycuda) are imported lazily and guarded."""
