import subprocess
import sys

import pytest
import torch

from benchmarks import accuracy
from realtime.data import IGNORE_INDEX, CamVid
from realtime.core.losses import segmentation_loss
from realtime.models import build_model
from realtime.train import Trainer, TrainConfig, lr_at, make_optimizer


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="ddrnet23_slim", out=str(tmp_path / "run"), epochs=2, batch_size=2, limit=4, val_limit=2,
                crop=(96, 128), base_scale=0.3, eval_every=100, amp=False, device="cpu", seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_then_poly():
    cfg = TrainConfig(lr=1.0, warmup_epochs=2)
    assert lr_at(cfg, 0, 10, 10) == pytest.approx(0.05)
    assert lr_at(cfg, 19, 10, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 20, 10, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60, 10, 10) == pytest.approx(0.5 ** 0.9)
    assert lr_at(cfg, 100, 10, 10) == 0.0


def test_training_steps_reduce_loss_on_real_frames(camvid_root):
    torch.manual_seed(0)
    ds = CamVid(camvid_root, "train")
    x = torch.stack([ds[i][0] for i in (0, 50)])[:, :, ::3, ::3].contiguous()
    y = torch.stack([ds[i][1] for i in (0, 50)])[:, ::3, ::3].contiguous()
    model = build_model("ddrnet23_slim", weights=None).train()
    opt = make_optimizer(TrainConfig(lr=3e-3), model)

    def loss_now():
        out, aux = model(x)
        return segmentation_loss(out, y, IGNORE_INDEX, ohem_thresh=None) + 0.4 * segmentation_loss(
            aux[0], y, IGNORE_INDEX, ohem_thresh=None)

    first = loss_now()
    for _ in range(12):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.7 * first.item()


class _Interrupt(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run(camvid_root, tmp_path):
    straight = Trainer(small_cfg(tmp_path / "a"))
    straight.fit()

    cut = Trainer(small_cfg(tmp_path / "b"))
    original = cut.train_epoch
    calls = {"n": 0}

    def dying_epoch():
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Interrupt
        return original()

    cut.train_epoch = dying_epoch
    with pytest.raises(_Interrupt):
        cut.fit()
    resumed = Trainer(small_cfg(tmp_path / "b"))
    assert resumed.epoch == 1
    resumed.fit()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "b" / "run" / "best.pt").is_file()


def test_evaluate_perfect_and_shipped_model(camvid_root):
    ds = CamVid(camvid_root, "val")
    images, labels = ds.to_tensors(range(6))

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.labels = labels

        def forward(self, x):
            y = self.labels[: len(x)].long().clamp(max=10)
            return torch.nn.functional.one_hot(y, 11).permute(0, 3, 1, 2).float()

    assert accuracy.evaluate(Oracle(), images, labels, batch_size=6)["miou"] == pytest.approx(1.0)
    res = accuracy.evaluate(build_model("ddrnet23_slim"), images, labels, batch_size=3)
    assert res["miou"] > 0.5 and res["frames"] == 6 and set(res["per_class_iou"]) >= {"road", "car"}


def test_cli_help_and_clear_errors(tmp_path):
    for mod in ("realtime.train", "benchmarks.accuracy", "realtime.demo"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--model" in r.stdout
    r = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--model", "ddrnet23_slim",
                        "--data", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
