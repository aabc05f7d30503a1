"""Segmenters and detectors behind one ``--model NAME`` registry (``@register_model(name, task)``)."""
from .base import CAMVID_MEAN, CAMVID_STD, LayerSpec, SegmentationModel
from .registry import (MODELS, build_model, default_weights_path, fingerprint, list_models, load_weights,
                       model_arg, model_slug, model_task, register_model, save_weights)

__all__ = ["CAMVID_MEAN", "CAMVID_STD", "LayerSpec", "MODELS", "SegmentationModel", "build_model",
           "default_weights_path", "fingerprint", "list_models", "load_weights", "model_arg", "model_slug", "model_task", "register_model",
           "save_weights"]
