"""Patch application g_gamma(x, delta): paste a patch into frames through a homography, with an exact mask.

Geometry: every placement becomes a quadrilateral (4 corners TL, TR, BR, BL as (x, y) in continuous pixel
coordinates, pixel (i, j) covering [j, j+1) x [i, i+1)). A per-sample homography maps image points to
patch points; a pixel belongs to the patch iff its centre maps inside [0, w) x [0, h). That hard test is
the mask, and the same mask composites ``x * (1 - m) + warped * m``, so "mask == changed pixels" is exact.
The patch colours are sampled bilinearly with border padding (pixels on the mask edge get pure patch
colour, never a blend with black), which keeps the paste differentiable w.r.t. the patch.

Capture simulation (physical printing + camera) acts on the warped patch only, before compositing:
lighting (contrast, brightness, per-channel gain), then optical blur, sensor noise and a JPEG-like
quantisation. Acting on the patch only is a deliberate approximation: a real camera blurs/noises the whole
frame, but then the mask would not equal the changed pixels. Blur is applied to the full-frame warped
patch (border-extended outside the quad) and cut by the hard mask afterwards, so it never moves the mask
boundary. JPEG: 8x8 block DCT in YCbCr (no chroma subsampling) quantised with the standard IJG tables
scaled by quality, rounding through a straight-through estimator (identity gradient).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PATCH_SIZES_1024x2048: Dict[str, Tuple[int, int]] = {"S": (150, 300), "M": (200, 400), "L": (300, 600)}
PAPER_FRAME_HW: Tuple[int, int] = (1024, 2048)


# Detection (paper, COCO): squares of 100/150/200 px on frames whose short side is ~480 (640x480).
DETECTION_PATCH_SIDES_480: Dict[str, int] = {"S": 100, "M": 150, "L": 200}


def patch_size_for(name: str, input_hw: Tuple[int, int], task: str = "segmentation") -> Tuple[int, int]:
    """Paper patch size ``name`` (S/M/L) scaled to ``input_hw`` as (h, w).

    Segmentation: each side scales with its own axis (so the patch covers the same fraction of the frame
    as in the paper, 8.6% for L) and rounds half up, minimum 1: 360x480 -> L = (105, 141), M = (70, 94),
    S = (53, 70). Detection: the paper's COCO squares scaled by short side / 480 (same frame fraction,
    13 % for L on 4:3 frames): 360x480 -> L = 150, M = 113, S = 75.
    """
    key = name.upper()
    if task not in ("segmentation", "detection"):
        raise ValueError(f"task must be 'segmentation' or 'detection', got {task!r}")
    if task == "detection":
        if key not in DETECTION_PATCH_SIDES_480:
            raise KeyError(f"unknown patch size '{name}'; choose from {sorted(DETECTION_PATCH_SIDES_480)}")
        side = max(1, int(math.floor(DETECTION_PATCH_SIDES_480[key] * min(input_hw) / 480 + 0.5)))
        return side, side
    if key not in PATCH_SIZES_1024x2048:
        raise KeyError(f"unknown patch size '{name}'; choose from {sorted(PATCH_SIZES_1024x2048)}")
    ph, pw = PATCH_SIZES_1024x2048[key]
    return (max(1, int(math.floor(ph * input_hw[0] / PAPER_FRAME_HW[0] + 0.5))),
            max(1, int(math.floor(pw * input_hw[1] / PAPER_FRAME_HW[1] + 0.5))))


@dataclass
class CaptureConfig:
    """Physical-capture simulation: each field's identity value disables that transform.

    Geometry (applied about the patch centre): ``scale`` multiplies the side lengths, ``rotation_deg`` is
    the max in-plane angle, ``perspective`` moves each corner independently by up to that fraction of the
    patch width/height. Photometric (on the patch): ``contrast`` multiplies around 0.5, ``brightness`` is an
    additive shift, ``color_gain`` the max per-channel gain deviation, ``blur_sigma`` Gaussian sigma in
    frame pixels, ``noise_std`` Gaussian sensor noise, ``jpeg_quality`` the IJG quality range.
    ``p_*`` are per-sample probabilities that each group is applied.
    """
    scale: Tuple[float, float] = (1.0, 1.0)
    rotation_deg: float = 0.0
    perspective: float = 0.0
    brightness: Tuple[float, float] = (0.0, 0.0)
    contrast: Tuple[float, float] = (1.0, 1.0)
    color_gain: float = 0.0
    blur_sigma: Tuple[float, float] = (0.0, 0.0)
    noise_std: Tuple[float, float] = (0.0, 0.0)
    jpeg_quality: Tuple[float, float] = (100.0, 100.0)
    p_geometric: float = 0.0
    p_photometric: float = 0.0
    p_blur: float = 0.0
    p_noise: float = 0.0
    p_jpeg: float = 0.0

    @classmethod
    def none(cls) -> "CaptureConfig":
        """No transform at all (digital paste)."""
        return cls()

    @classmethod
    def physical(cls) -> "CaptureConfig":
        """Printed patch seen by a car camera: mild pose change, lighting, focus, noise and compression."""
        return cls(scale=(0.8, 1.2), rotation_deg=10.0, perspective=0.08, brightness=(-0.1, 0.1),
                   contrast=(0.8, 1.2), color_gain=0.08, blur_sigma=(0.0, 1.0), noise_std=(0.0, 0.03),
                   jpeg_quality=(50.0, 95.0), p_geometric=1.0, p_photometric=1.0, p_blur=0.5, p_noise=0.5,
                   p_jpeg=0.3)


@dataclass
class Placement:
    """Where the patch goes. ``fixed``: unscaled top-left at ``top_left`` = (y, x) pixels (capture geometry
    jitters about its centre). ``random``: uniform position keeping the (jittered) patch inside the frame.
    ``quad``: ``corners_xy`` = 4 (x, y) points TL, TR, BR, BL (e.g. a wall or road area), perspective warp."""
    mode: str = "random"
    top_left: Tuple[int, int] = (0, 0)
    corners_xy: Optional[Tuple[Tuple[float, float], ...]] = None

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "random", "quad"):
            raise ValueError(f"placement mode must be fixed, random or quad, got '{self.mode}'")
        if self.mode == "quad" and (self.corners_xy is None or len(self.corners_xy) != 4):
            raise ValueError("quad placement needs corners_xy = 4 (x, y) points (TL, TR, BR, BL)")


def _uniform(shape, lo: float, hi: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _coin(n: int, p: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


def _rect(h: int, w: int) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]], dtype=torch.float64)


def _convex(q: torch.Tensor) -> torch.Tensor:
    """(N,4,2) -> (N,) True where the quad is strictly convex with clockwise-in-image (TL,TR,BR,BL) order."""
    e = q.roll(-1, 1) - q
    cross = e[..., 0] * e.roll(-1, 1)[..., 1] - e[..., 1] * e.roll(-1, 1)[..., 0]
    return (cross > 1e-6).all(1)


def sample_quads(n: int, image_hw: Tuple[int, int], patch_hw: Tuple[int, int], placement: Placement,
                 capture: Optional[CaptureConfig] = None, generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
    """Destination corners (N,4,2) float64 (x, y), all inside [0, W] x [0, H].

    Geometric jitter acts about the centroid; a non-convex jittered quad falls back to the unjittered
    one. Then the quad is shrunk (about its centroid) if larger than the frame and translated: uniformly
    (integer offsets when that fits) for ``random``, minimally back inside for ``fixed``/``quad``.
    """
    H, W = image_hw
    h, w = patch_hw
    if placement.mode == "quad":
        base = torch.tensor(placement.corners_xy, dtype=torch.float64).view(1, 4, 2).repeat(n, 1, 1)
        if not bool(_convex(base[:1])[0]):
            raise ValueError("quad corners must form a convex quadrilateral ordered TL, TR, BR, BL")
    else:
        base = _rect(h, w).view(1, 4, 2).repeat(n, 1, 1)
        if placement.mode == "fixed":
            y0, x0 = placement.top_left
            base = base + torch.tensor([x0, y0], dtype=torch.float64)
    if placement.mode != "random":
        if base.min() < 0 or (base[..., 0] > W).any() or (base[..., 1] > H).any():
            raise ValueError(f"{placement.mode} placement puts the patch outside the {H}x{W} frame")
    q = base
    if capture is not None:
        on = _coin(n, capture.p_geometric, generator).view(n, 1, 1)
        c = base.mean(1, keepdim=True)
        s = _uniform((n, 1, 1), *capture.scale, generator)
        a = _uniform(n, -capture.rotation_deg, capture.rotation_deg, generator) * math.pi / 180
        rot = torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)
        size = base.amax(1, keepdim=True) - base.amin(1, keepdim=True)
        jit = _uniform((n, 4, 2), -capture.perspective, capture.perspective, generator) * size
        moved = c + s * (base - c) @ rot.transpose(1, 2) + jit
        q = torch.where(on & _convex(moved).view(n, 1, 1), moved, base)
    lo, hi = q.amin(1), q.amax(1)                                       # (N,2) bounding boxes
    frame = torch.tensor([W, H], dtype=torch.float64)
    shrink = (frame / (hi - lo)).amin(1).clamp(max=1.0) * (1 - 1e-9)   # fit oversized quads
    c = q.mean(1, keepdim=True)
    q = c + (q - c) * shrink.view(n, 1, 1)
    lo, hi = q.amin(1), q.amax(1)
    if placement.mode == "random":
        t = -lo + torch.rand(n, 2, generator=generator, dtype=torch.float64) * (frame - (hi - lo))
        ti = t.round()
        t = torch.where((lo + ti >= 0) & (hi + ti <= frame), ti, t)
    else:
        t = (-lo).clamp(min=0) - (hi - frame).clamp(min=0)
    q = q + t.view(n, 1, 2)
    return torch.minimum(q.clamp(min=0), frame)


def _homographies(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(N,3,3) float64 H with dst ~ H @ src for 4 point pairs each (DLT with h33 = 1)."""
    n = src.shape[0]
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    z, o = torch.zeros_like(x), torch.ones_like(x)
    a = torch.cat([torch.stack([x, y, o, z, z, z, -u * x, -u * y], -1),
                   torch.stack([z, z, z, x, y, o, -v * x, -v * y], -1)], 1)      # (N,8,8)
    b = torch.cat([u, v], 1).unsqueeze(-1)
    h = torch.linalg.solve(a, b).squeeze(-1)
    return torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], 1).view(n, 3, 3)


def render_quads(images: torch.Tensor, patch: torch.Tensor, quads: torch.Tensor,
                 capture: Optional[CaptureConfig] = None, generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paste ``patch`` onto ``images`` at ``quads`` (N,4,2); returns (patched, hard mask (N,1,H,W))."""
    n, _, H, W = images.shape
    h, w = patch.shape[-2:]
    dev, dt = images.device, images.dtype
    hinv = _homographies(quads.double().cpu(), _rect(h, w).expand(n, 4, 2))      # image -> patch
    cen = torch.cat([quads.double().cpu().mean(1), torch.ones(n, 1, dtype=torch.float64)], 1)
    sign = torch.sign((hinv[:, 2] * cen).sum(1)).view(n, 1, 1)                  # make w' > 0 inside
    hinv = (hinv * sign).to(device=dev, dtype=torch.float32)
    ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    pts = torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W), torch.ones(H, W, device=dev)], -1)
    uvw = torch.einsum("hwk,njk->nhwj", pts, hinv)
    den = uvw[..., 2]
    ok = den > 1e-8
    den = torch.where(ok, den, torch.ones_like(den))
    u, v = uvw[..., 0] / den, uvw[..., 1] / den
    inside = ok & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    grid = torch.stack([(2 * u / w - 1).clamp(-2, 2), (2 * v / h - 1).clamp(-2, 2)], -1)
    grid = torch.where(ok.unsqueeze(-1), grid, torch.zeros_like(grid))
    src = patch.to(device=dev, dtype=dt).unsqueeze(0).expand(n, -1, -1, -1)
    warped = F.grid_sample(src, grid.to(dt), mode="bilinear", padding_mode="border", align_corners=False)
    if capture is not None:
        warped = _photometric(warped, capture, generator)
    m = inside.unsqueeze(1).to(dt)
    return images * (1 - m) + warped * m, m


def apply_patch(images: torch.Tensor, patch: torch.Tensor, placement: Placement,
                capture: Optional[CaptureConfig] = None, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """g_gamma(x, delta): ``images`` (N,3,H,W) in [0,1], ``patch`` (3,h,w) in [0,1] -> (patched, mask).

    Differentiable w.r.t. ``patch``; ``mask`` is float {0,1} and equals the pixels the paste changed
    (pixels where the captured patch happens to equal the frame are in the mask but unchanged).
    All random draws come from ``generator`` (CPU), so a seed gives the same placements on any device.
    """
    if images.dim() != 4 or images.shape[1] != 3 or patch.dim() != 3 or patch.shape[0] != 3:
        raise ValueError(f"expected images (N,3,H,W) and patch (3,h,w), got {tuple(images.shape)}, "
                         f"{tuple(patch.shape)}")
    quads = sample_quads(images.shape[0], tuple(images.shape[-2:]), tuple(patch.shape[-2:]), placement,
                         capture, generator)
    return render_quads(images, patch, quads, capture, generator)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable per-sample Gaussian blur (replicate padding); sigma (N,) in pixels, 0 = identity."""
    n, c, H, W = x.shape
    r = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-t.view(1, -1) ** 2 / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x).repeat_interleave(c, 0)               # (N*C, 2r+1)
    y = F.pad(x.reshape(1, n * c, H, W), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, H, W)


_JPEG_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
              14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_JPEG_CHROMA = [17, 18, 24, 47] + [99] * 4 + [18, 21, 26, 66] + [99] * 4 + [24, 26, 56] + [99] * 5 + \
    [47, 66] + [99] * 6 + [99] * 32
_RGB2YCC = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]


def _dct_matrix() -> torch.Tensor:
    i = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * i.view(1, 8) + 1) * i.view(8, 1) * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d                                                             # orthonormal: d @ d.T = I


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Differentiable JPEG-like compression of (N,3,H,W) in [0,1] at per-sample ``quality`` (1..100)."""
    n, _, H, W = x.shape
    ph, pw = (-H) % 8, (-W) % 8
    m = torch.tensor(_RGB2YCC, dtype=x.dtype, device=x.device)
    y = torch.einsum("ij,njhw->nihw", m, F.pad(x, (0, pw, 0, ph), mode="replicate") * 255)
    y = y + torch.tensor([-128.0, 0.0, 0.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    hb, wb = y.shape[2] // 8, y.shape[3] // 8
    blocks = y.reshape(n, 3, hb, 8, wb, 8).permute(0, 1, 2, 4, 3, 5)          # (N,3,hb,wb,8,8)
    d = _dct_matrix().to(x)
    coef = d @ blocks @ d.T
    q = quality.double().clamp(1, 100)
    s = torch.where(q < 50, 5000 / q, 200 - 2 * q).view(n, 1, 1, 1)
    base = torch.tensor([_JPEG_LUMA, _JPEG_CHROMA, _JPEG_CHROMA], dtype=torch.float64).view(1, 3, 8, 8)
    table = torch.floor((base * s + 50) / 100).clamp(min=1).to(x).view(n, 3, 1, 1, 8, 8)
    z = coef / table
    z = z + (torch.round(z) - z).detach()                              # straight-through rounding
    y = (d.T @ (z * table) @ d).permute(0, 1, 2, 4, 3, 5).reshape(n, 3, hb * 8, wb * 8)
    y = y + torch.tensor([128.0, 0.0, 0.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    rgb = torch.einsum("ij,njhw->nihw", torch.linalg.inv(m.double()).to(x), y) / 255
    return rgb[:, :, :H, :W]


def _photometric(x: torch.Tensor, cap: CaptureConfig, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Lighting, blur, noise and compression of the warped patch; every draw is made (fixed RNG use)."""
    n, dev = x.shape[0], x.device

    def per_sample(on: torch.Tensor, val: torch.Tensor, off: float) -> torch.Tensor:
        return torch.where(on.view(-1, *[1] * (val.dim() - 1)), val, torch.full_like(val, off))

    on = _coin(n, cap.p_photometric, gen)
    con = per_sample(on, _uniform(n, *cap.contrast, gen), 1.0).view(n, 1, 1, 1)
    bri = per_sample(on, _uniform(n, *cap.brightness, gen), 0.0).view(n, 1, 1, 1)
    gain = per_sample(on, _uniform((n, 3), 1 - cap.color_gain, 1 + cap.color_gain, gen), 1.0).view(n, 3, 1, 1)
    sig = per_sample(_coin(n, cap.p_blur, gen), _uniform(n, *cap.blur_sigma, gen), 0.0)
    std = per_sample(_coin(n, cap.p_noise, gen), _uniform(n, *cap.noise_std, gen), 0.0).view(n, 1, 1, 1)
    jon = _coin(n, cap.p_jpeg, gen)
    qual = _uniform(n, *cap.jpeg_quality, gen)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    x = ((x - 0.5) * con.to(x) + 0.5 + bri.to(x)) * gain.to(x)
    if float(sig.max()) > 0:
        x = _gaussian_blur(x, sig)
    if float(std.max()) > 0:
        noise_gen = torch.Generator(device=dev).manual_seed(seed)
        x = x + std.to(x) * torch.randn(x.shape, generator=noise_gen, device=dev, dtype=x.dtype)
    if bool(jon.any()):
        x = torch.where(jon.to(dev).view(n, 1, 1, 1), _jpeg(x.clamp(0, 1), qual), x)
    return x.clamp(0, 1)


def random_patch(hw: Tuple[int, int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform-noise patch (3,h,w): the paper's random control."""
    return torch.rand(3, *hw, generator=generator)


def save_patch_png(patch: torch.Tensor, path: str | Path, meta: Optional[Dict] = None) -> Path:
    """Write the patch as 8-bit RGB PNG (values quantised to k/255) and ``meta`` + hw as a JSON sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = patch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(path)
    info = dict(meta or {})
    info["hw"] = [int(patch.shape[1]), int(patch.shape[2])]
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def load_patch_png(path: str | Path) -> Tuple[torch.Tensor, Dict]:
    """(patch float (3,h,w) in [0,1], meta from the JSON sidecar or {} when it is absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch file {path} not found")
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"))
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.is_file() else {}
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(255), meta
