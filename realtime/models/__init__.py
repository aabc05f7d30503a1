"""Segmentation models and the ``--model NAME`` registry."""
from .base import CAMVID_MEAN, CAMVID_STD, LayerSpec, SegmentationModel
from .registry import (build_model, default_weights_path, fingerprint, list_models, load_weights,
                       save_weights)

__all__ = ["CAMVID_MEAN", "CAMVID_STD", "LayerSpec", "SegmentationModel", "build_model",
           "default_weights_path", "fingerprint", "list_models", "load_weights", "save_weights"]
