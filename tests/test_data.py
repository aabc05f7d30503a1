import numpy as np
import pytest
import torch
from PIL import Image

from realtime.data import IGNORE_INDEX, CamVid, DataNotFoundError, resolve_data_dir
from realtime.data import paths as paths_mod
from realtime.data.augment import AugmentConfig, augment_batch


def test_missing_data_error_names_all_three_places(tmp_path, monkeypatch):
    monkeypatch.delenv("REALTIME_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths_mod, "_REPO_ROOT", tmp_path)
    with pytest.raises(DataNotFoundError) as e:
        resolve_data_dir(None)
    msg = str(e.value)
    assert "--data" in msg and "REALTIME_DATA" in msg and "shared/datasets/camvid" in msg


def test_explicit_and_env_dirs(tiny_camvid, tmp_path, monkeypatch):
    assert resolve_data_dir(tiny_camvid) == tiny_camvid.resolve()
    with pytest.raises(DataNotFoundError):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("REALTIME_DATA", str(tiny_camvid))
    assert resolve_data_dir(None) == tiny_camvid.resolve()
    monkeypatch.setenv("REALTIME_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataNotFoundError, match="REALTIME_DATA"):
        resolve_data_dir(None)


def test_loader_order_void_and_sequences(tiny_camvid):
    ds = CamVid(tiny_camvid, "train")
    assert [(s.sequence, s.frame) for s in ds.samples] == [("SeqA", 10), ("SeqA", 30), ("SeqA", 90), ("SeqB", 30)]
    x, y = ds[0]
    assert x.shape == (3, 12, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y[0, 0] == IGNORE_INDEX and y.dtype == torch.int64
    assert ds.sequences == ["SeqA", "SeqB"]
    seq = ds.sequence("SeqA")
    assert seq.frames == [10, 30, 90] and [f for f, _, _ in seq] == [10, 30, 90]
    with pytest.raises(KeyError, match="SeqZ"):
        ds.sequence("SeqZ")
    with pytest.raises(FileNotFoundError, match="present"):
        CamVid(tiny_camvid, "test")


def test_grayscale_frame_is_converted(tiny_camvid):
    p = tiny_camvid / "val" / "SeqC_00001.png"
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(p)
    x, _ = CamVid(tiny_camvid, "val")[0]
    assert x.shape == (3, 12, 16)


def test_real_camvid_splits(camvid_root):
    train, val = CamVid(camvid_root, "train"), CamVid(camvid_root, "val")
    assert len(train) == 367 and len(val) == 101
    assert train.sequences == ["0001TP", "0006R0", "0016E5"] and val.sequences == ["0016E5"]
    frames = val.sequence("0016E5").frames
    assert frames == sorted(frames) and len(frames) == 101
    x, y = val[0]
    assert x.shape == (3, 360, 480) and y.shape == (360, 480)
    assert set(torch.unique(y).tolist()) <= set(range(12))


def test_augment_identity_and_flip():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 8, 10), dtype=torch.uint8)
    lab = torch.randint(0, 11, (2, 8, 10), dtype=torch.uint8)
    cfg = AugmentConfig(crop=(8, 10), scale=(1.0, 1.0), flip=False, brightness=0, contrast=0, saturation=0)
    x, y = augment_batch(img, lab, cfg, g)
    assert torch.allclose(x, img.float() / 255, atol=1e-5) and torch.equal(y, lab.long())
    cfg.flip = True
    seen_flip = False
    for _ in range(8):
        x, y = augment_batch(img, lab, cfg, g)
        for b in range(2):
            if torch.equal(y[b], lab[b].long().flip(-1)):
                seen_flip = True
                assert torch.allclose(x[b], img[b].float().flip(-1) / 255, atol=1e-5)
            else:
                assert torch.equal(y[b], lab[b].long())
    assert seen_flip


def test_augment_padding_is_void():
    g = torch.Generator().manual_seed(0)
    img = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    lab = torch.zeros((1, 8, 8), dtype=torch.uint8)
    cfg = AugmentConfig(crop=(16, 16), scale=(1.0, 1.0), flip=False, brightness=0, contrast=0, saturation=0)
    x, y = augment_batch(img, lab, cfg, g)
    assert (y == 0).sum() == 64 and (y == IGNORE_INDEX).sum() == 256 - 64


def _plain(**kw):
    return AugmentConfig(crop=(32, 40), scale=(1.0, 1.0), flip=False, brightness=0, contrast=0, saturation=0, **kw)


def test_capture_effects_blur_noise_jpeg():
    img = torch.randint(0, 256, (4, 3, 32, 40), dtype=torch.uint8)
    lab = torch.zeros((4, 32, 40), dtype=torch.uint8)
    base, _ = augment_batch(img, lab, _plain(), torch.Generator().manual_seed(0))
    g0 = torch.Generator().manual_seed(0)
    augment_batch(img, lab, _plain(), g0)
    g1 = torch.Generator().manual_seed(0)
    augment_batch(img, lab, _plain(blur=0.0, noise=0.0, jpeg=0.0), g1)
    assert torch.equal(g0.get_state(), g1.get_state())              # disabled effects draw nothing

    def hf(x):                                                       # high-frequency energy
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()
    blurred, y = augment_batch(img, lab, _plain(blur=1.0), torch.Generator().manual_seed(0))
    assert hf(blurred) < 0.6 * hf(base) and torch.equal(y, lab.long())
    flat = torch.full((4, 3, 32, 40), 128, dtype=torch.uint8)
    noisy, _ = augment_batch(flat, lab, _plain(noise=0.1), torch.Generator().manual_seed(0))
    assert 0.005 < noisy.std().item() < 0.1 and noisy.min() >= 0 and noisy.max() <= 1
    jp, _ = augment_batch(img, lab, _plain(jpeg=1.0, jpeg_quality=(10, 10)), torch.Generator().manual_seed(0))
    assert jp.shape == base.shape and (jp - base).abs().mean() > 0.02
    again, _ = augment_batch(img, lab, _plain(blur=0.5, noise=0.05, jpeg=0.5), torch.Generator().manual_seed(3))
    same, _ = augment_batch(img, lab, _plain(blur=0.5, noise=0.05, jpeg=0.5), torch.Generator().manual_seed(3))
    assert torch.equal(again, same)                                  # seeded: reproducible
    import pytest
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(blur=1.5)
