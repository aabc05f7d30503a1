"""Z-Mask and the bare model behind the common defense interface (``zmask``, ``none``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import torch


from .base import Defense, DefenseResult, StageTimer
from .registry import DefenseContext, register_defense
from .artifact import load_calibration
from .refine import RefineConfig, parse_refine, refine_keep
from .zmask import ZMask


class NoDefense(Defense):
    """The bare backbone: the baseline every other defense is compared with."""
    name = "none"

    def __init__(self, model: Any, forward: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
        super().__init__(model)
        self.forward = forward or model

    def run(self, x: torch.Tensor, timer: StageTimer) -> DefenseResult:
        with timer("backbone"):
            out = self.forward(x)
        return DefenseResult(output=out, defended_input=x, first_output=out)

    def plain(self, x: torch.Tensor) -> Any:
        return self.forward(x)


class ZMaskDefense(Defense):
    """The one Z-Mask orchestration, used by the live pipeline, the benchmarks and calibration.evaluate.

    Stages: (optional) shield with the ``prior`` keep-mask carried from earlier frames -> backbone
    with taps -> heatmaps, fusion, score, flag, keep-mask (``ZMask.detect``) -> shield the flagged
    frames with the union of the fresh and the prior mask -> second pass on the flagged frames only.
    Unflagged frames keep the first pass (run on the prior-masked input when a prior is given).
    With ``refine`` set, the keep-mask of each flagged frame is snapped to the patch's edges in the frame
    (``refine.refine_keep``, stage "refine") before anything uses it. A carried ``prior`` is not refined:
    it arrives dilated for motion, and a seed that already covers the facade teaches the colour models the
    facade (measured: the live mask's precision fell to 0.51 and the damage grew).
    ``extras["detected_mask"]`` is this frame's own keep-mask, before the prior is merged in.
    """
    name = "zmask"
    masks = True
    flags = True
    accepts_prior = True
    second_pass_flagged_only = True     # the second pass re-runs the flagged frames of a batch only

    def __init__(self, zm: ZMask, refine: Optional[RefineConfig] = None) -> None:
        super().__init__(getattr(zm.taps, "model", zm))
        self.zm = zm
        self.refine = refine

    def plain(self, x: torch.Tensor) -> Any:
        return self.zm.taps.plain(x)

    def run(self, x: torch.Tensor, timer: StageTimer, prior: Optional[torch.Tensor] = None) -> DefenseResult:
        zm = self.zm
        x1 = x
        if prior is not None:
            with timer("mask"):
                x1 = zm.shield(x, prior)
        with timer("backbone"):
            out, taps = zm.taps(x1)
        det = zm.detect(taps, (x.shape[-2], x.shape[-1]), timer)
        any_flag = bool(det.flagged.any())      # one host sync for both uses
        if self.refine is not None and any_flag:
            with timer("refine"):
                det = det._replace(mask=refine_keep(x, det.mask, det.flagged, self.refine))
        keep = det.mask if prior is None else torch.minimum(det.mask, prior.to(det.mask.dtype))
        with timer("mask"):
            xd = zm.shield(x, keep) if any_flag else x1
        with timer("second_pass"):
            final = zm.second_pass(xd, det.flagged, out)
        return DefenseResult(output=final, defended_input=xd, mask=keep, flagged=det.flagged, score=det.score,
                             first_output=out, extras={"h_s": det.h_s, "h_d": det.h_d, "soft_mask": det.soft_mask,
                                                       "detected_mask": det.mask})

    def describe(self) -> Dict[str, Any]:
        cfg = self.zm.cfg
        return {**super().describe(), "shallow": list(cfg.shallow), "deep": list(cfg.deep),
                "lambda0": cfg.lambda0, "work_size": list(cfg.spr.work_size), "heatmaps": self.zm.heatmaps_in_use(),
                **({"refine": dataclasses.asdict(self.refine)} if self.refine is not None else {})}


@register_defense("none")
def _build_none(ctx: DefenseContext) -> Defense:
    return NoDefense(ctx.model, ctx.forward())


def context_calibration(ctx: DefenseContext):
    """The context's Z-Mask artifact: the one already loaded, else read from ``ctx.calibration_path()``
    (fingerprint checked); a missing file says how to make one."""
    if ctx.loaded_calibration is not None:
        return ctx.loaded_calibration
    path = ctx.calibration_path()
    if not path.is_file():
        raise FileNotFoundError(f"Z-Mask calibration {path} not found; make one with "
                                f"`python -m calibration.fit --model {ctx.model_name}`")
    return load_calibration(path, ctx.model)             # refuses a calibration made for another model


@register_defense("zmask")
def _build_zmask(ctx: DefenseContext, threshold: Optional[float] = None, refine: Any = None,
                 **zmask_options: Any) -> Defense:
    """Z-Mask from the calibration artifact (fingerprint checked); ``threshold`` overrides lambda0;
    ``refine`` ("grabcut" or a ``RefineConfig``) snaps flagged frames' masks to the patch's edges."""
    cal = context_calibration(ctx)
    # On an engine the taps come out of the engine, and the module is left unhooked.
    # The artifact was checked against ctx.model when it was loaded: no second fingerprint.
    # An engine that can run the whole first pass as one graph (``engines.ort_defended``) computes the
    # heatmaps, score, flag and keep-mask inside it; ZMask then reads them through the engine's router.
    # A heatmap backend whose CPU kernel is ready beats the graph's heatmaps (1.7 vs ~11 ms per frame measured
    # on the 2-core CPU), so the engine's plain tapped graph then hands the taps to it.
    taps = ctx.engine
    defended = getattr(taps, "defended", None)
    backend = zmask_options.get("heatmap_backend", "reference")
    kernel_first = ctx.device.type == "cpu" and bool(getattr(backend, "cpu_kernel_ready", lambda: False)())
    graph = defended(cal) if callable(defended) and not kernel_first else None
    if graph is not None:
        taps = graph
        zmask_options = {**zmask_options, "heatmap_backend": graph.zmask_backend}
    zm = cal.build_zmask(ctx.model, check=False, taps=taps, **zmask_options)
    if threshold is not None:
        zm.cfg = dataclasses.replace(zm.cfg, lambda0=float(threshold))
    return ZMaskDefense(zm.eval(), parse_refine(refine))


