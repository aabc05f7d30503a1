"""Backbone runtimes behind one interface: ``engine(x) -> (logits, {layer: map})``, ``engine.plain(x)``.

Backends (``--engine NAME``): ``torch`` (eager; channels_last, autocast, CUDA graphs), ``compile``
(torch.compile), ``onnxruntime`` (cached ONNX export), ``tensorrt`` (TensorRT plans built from that
export) and ``torch_tensorrt``. Optional runtimes are imported lazily and guarded, so this package
imports on any machine; ``available_engines()`` says which backends work here and why not.

    from engines import EngineConfig, build_engine
    eng = build_engine("ddrnet23_slim", ["layer2", "layer3"], EngineConfig(backend="onnxruntime"))
    logits, taps = eng(x)          # x: float (N,3,H,W) in [0,1]
    zmask = ZMask(eng, cal.config, cal.stats, fusion)   # Z-Mask on any backend
"""
from .base import Engine
from .config import CACHE_ENV, DEFAULT_CACHE, PRECISIONS, EngineConfig, EngineError, EngineUnavailable
from .registry import available_engines, build_engine, engine_class, list_engines, register_engine

__all__ = ["CACHE_ENV", "DEFAULT_CACHE", "PRECISIONS", "Engine", "EngineConfig", "EngineError", "EngineUnavailable",
           "available_engines", "build_engine", "engine_class", "list_engines", "register_engine"]
