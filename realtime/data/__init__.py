"""Datasets: CamVid frames/labels, sequence views, and the device-side augmentation used in training."""
from .camvid import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, CamVid, SequenceView, colorize
from .paths import DataNotFoundError, resolve_data_dir

__all__ = ["CLASSES", "IGNORE_INDEX", "NUM_CLASSES", "PALETTE", "CamVid", "SequenceView", "colorize",
           "DataNotFoundError", "resolve_data_dir"]
