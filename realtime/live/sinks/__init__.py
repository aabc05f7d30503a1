"""Output sinks: annotated video, event logs, summaries."""
from .video import VideoWriter, overlay_segmentation

__all__ = ["VideoWriter", "overlay_segmentation"]
