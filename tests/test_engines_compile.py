"""``compile`` backend: the taps are outputs of the compiled graph (one graph, no breaks) and match eager.

Kept small on purpose: inductor compiles C++ on CPU (~20 s for this toy model, minutes for DDRNet).
Tolerance vs eager: atol 1e-5 + rtol 1e-5 (measured ~1e-7 on the toy model, ~7e-6 on DDRNet).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engines import EngineConfig, available_engines, build_engine
from engines.tapped import TapModule
from realtime.defenses import ActivationTaps


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(self.stem(x))
        return nn.functional.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_taps_are_one_graph_without_breaks():
    torch._dynamo.reset()
    explained = torch._dynamo.explain(TapModule(Toy().eval(), ["stem", "body"]))(torch.rand(1, 3, 16, 16))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.skipif(not available_engines()["compile"][0], reason=available_engines()["compile"][1])
def test_compiled_engine_matches_eager():
    torch._dynamo.reset()
    model = Toy().eval()
    eng = build_engine(model, ["stem", "body"], EngineConfig(backend="compile", input_shape=(16, 24)))
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    got, taps = eng(x)
    with torch.no_grad(), ActivationTaps(model, ["stem", "body"]) as ref:
        want, want_taps = ref(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for k in ("stem", "body"):
        torch.testing.assert_close(taps[k], want_taps[k], atol=1e-5, rtol=1e-5)
    d = eng.describe()
    assert d["engine"] == "compile" and d["compile_backend"] == "inductor"
