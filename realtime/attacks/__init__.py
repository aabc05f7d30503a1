"""Adversarial patches: differentiable patch application with capture simulation, universal EOT
crafting against segmentation models, BPDA for non-differentiable defenses, and patch evaluation
(mIoU outside the patch). Objectives that need the defense (beta-controlled, Adv-Mask/Flag) live in
``realtime.attacks.adaptive``."""
from .apply import (PATCH_SIZES_1024x2048, CaptureConfig, Placement, apply_patch, load_patch_png, patch_size_for,
                    random_patch, render_quads, sample_quads, save_patch_png)
from .bpda import DefendedModel, bpda
from .eot import (EOTConfig, accuracy_outside, adversarial_loss, craft_universal_patch, default_palette,
                  non_printability, total_variation)


def __getattr__(name: str):
    """Lazy ``evaluate_patch``: importing .evaluate eagerly would make ``python -m realtime.attacks.evaluate``
    warn that the module was already in sys.modules (runpy)."""
    if name == "evaluate_patch":
        from .evaluate import evaluate_patch
        return evaluate_patch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PATCH_SIZES_1024x2048", "CaptureConfig", "Placement", "apply_patch", "load_patch_png",
           "patch_size_for", "random_patch", "render_quads", "sample_quads", "save_patch_png", "EOTConfig",
           "accuracy_outside", "adversarial_loss", "craft_universal_patch", "default_palette", "non_printability",
           "total_variation", "evaluate_patch", "DefendedModel", "bpda"]
