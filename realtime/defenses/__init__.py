"""Z-Mask defense: activation taps, SPR heatmaps, the fusion block, and the detector/masker itself."""
from .fusion import PARAM_NAMES, FusionBlock
from .spr import (SPRConfig, aggregate, box_mean, cascade, layer_heatmap, pooled_map, resize,
                  spr_heatmap, to_work, zscore)
from realtime.core.taps import ActivationTaps, EngineTaps, first_tensor, model_mean_color
from .zmask import (ChannelStats, Detection, ZMask, ZMaskConfig, ZMaskResult, fit_channel_stats, merge_batch,
                    validate_input)

__all__ = ["Detection", "PARAM_NAMES", "FusionBlock", "SPRConfig", "aggregate", "box_mean", "cascade", "layer_heatmap",
           "pooled_map", "resize", "spr_heatmap", "to_work", "zscore", "ActivationTaps", "EngineTaps",
           "first_tensor", "model_mean_color", "ChannelStats", "ZMask", "ZMaskConfig", "ZMaskResult",
           "fit_channel_stats", "merge_batch", "validate_input"]
