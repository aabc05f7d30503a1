"""The Triton model repository (``python -m engines.export --format triton``) and the client's requests.

The server cannot run here: the repository's files are checked against Triton's layout and against the
exported graphs' own I/O (names, element types, per-frame shapes), and the client's request building
is checked without a server (``tritonclient`` is optional; a stand-in module plays ``tritonclient.http``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.export import main as export_main
from engines.triton_client import build_request, json_body, preprocess, to_tritonclient
from engines.triton_repo import TritonSettings, config_pbtxt, defended_outputs, model_names

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.UINT8: "TYPE_UINT8",
                  onnx.TensorProto.BOOL: "TYPE_BOOL"}


def _blocks(text: str, section: str):
    body = re.search(section + r" \[\n(.*?)\n\]", text, re.S).group(1)
    out = []
    for blk in re.findall(r"\{(.*?)\n  \}", body, re.S):
        dims = [int(v) for v in re.search(r"dims: \[ ([^\]]*) \]", blk).group(1).split(",") if v.strip()]
        out.append((re.search(r'name: "([^"]+)"', blk).group(1), re.search(r"data_type: (\w+)", blk).group(1),
                    dims, "reshape" in blk))
    return out


def test_config_text_and_settings():
    text = config_pbtxt("zmask_x", (64, 96), defended_outputs(64, 96), TritonSettings(max_batch_size=4,
                                                                                     preferred_batch_sizes=(1, 4)))
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 4" in text
    assert "preferred_batch_size: [ 1, 4 ]" in text and "max_queue_delay_microseconds:" in text
    assert _blocks(text, "input") == [("input", "TYPE_FP32", [3, 64, 96], False)]
    assert ("score", "TYPE_FP32", [1], True) in _blocks(text, "output")
    with pytest.raises(ValueError):
        TritonSettings(max_batch_size=2, preferred_batch_sizes=(4,))
    with pytest.raises(ValueError):
        TritonSettings(instance_kind="KIND_TPU")


def test_export_triton_repository_matches_the_graphs(tmp_path: Path):
    repo = tmp_path / "repo"
    assert export_main(["--model", "ddrnet23_slim", "--format", "triton", "--out", str(repo),
                        "--imgsz", "64x96", "--max-batch", "4"]) == 0
    defended, plain = model_names("ddrnet23_slim")
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted([defended, plain])
    doc = json.loads((repo / "ddrnet23_slim_export.json").read_text())
    assert doc["triton_models"] == [defended, plain] and doc["lambda0"] > 0
    for name in (defended, plain):
        text = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in text and "dynamic_batching" in text and "max_batch_size: 4" in text
        proto = onnx.load(str(repo / name / "1" / "model.onnx"))
        graph_io = {}
        for v in (*proto.graph.input, *proto.graph.output):
            t = v.type.tensor_type
            dims = [d.dim_value if d.dim_value else d.dim_param for d in t.shape.dim]
            assert dims[0] == "batch"                       # dynamic batch axis
            graph_io[v.name] = (ONNX_TO_TRITON[t.elem_type], dims[1:])
        declared = _blocks(text, "input") + _blocks(text, "output")
        assert {n for n, *_ in declared} == set(graph_io)
        for n, dtype, dims, scalar in declared:
            assert graph_io[n][0] == dtype, n
            assert (graph_io[n][1] == [] and dims == [1] and scalar) or graph_io[n][1] == dims, n


class _FakeHttp:
    """Stands in for ``tritonclient.http``: records what the client builds."""

    class InferInput:
        def __init__(self, name, shape, datatype):
            self.name, self.shape, self.datatype, self.data = name, shape, datatype, None

        def set_data_from_numpy(self, arr, binary_data=True):
            assert list(arr.shape) == list(self.shape) and arr.dtype == np.float32
            self.data = arr

    class InferRequestedOutput:
        def __init__(self, name, binary_data=True):
            self.name = name


def test_client_request_building():
    frames = [np.full((64, 96, 3), v, np.uint8) for v in (0, 255)]
    req = build_request(frames, "zmask_ddrnet23_slim")
    assert req.shape == [2, 3, 64, 96] and req.datatype == "FP32"
    assert req.array.dtype == np.float32 and req.array[0].max() == 0.0 and req.array[1].min() == 1.0
    assert req.outputs == ("labels", "score", "flag", "keep_mask")
    body = json_body(req)
    assert body["inputs"][0]["shape"] == [2, 3, 64, 96] and len(body["inputs"][0]["data"]) == 2 * 3 * 64 * 96
    assert [o["name"] for o in body["outputs"]] == list(req.outputs)
    inputs, outputs = to_tritonclient(req, _FakeHttp)
    assert inputs[0].name == "input" and inputs[0].data is req.array
    assert [o.name for o in outputs] == list(req.outputs)
    with pytest.raises(ValueError):
        preprocess([np.zeros((4, 4), np.uint8)])
