"""A small Triton client for the defended graph: one frame in, label map, score, flag and keep-mask out.

    python -m engines.triton_client --url localhost:8000 --model zmask_ddrnet23_slim frame.png

``build_request(frames, model)`` turns uint8 HxWx3 frames into the request (input ``input`` FP32
(N,3,H,W) in [0,1], the four outputs asked for) as plain data, so it is testable without a server
or the ``tritonclient`` package; ``to_tritonclient`` makes ``tritonclient.http`` inputs/outputs
from it, ``json_body`` the KServe-v2 JSON body any HTTP client can POST to
``/v2/models/<model>/infer``. Serving: docs/deployment.md.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

DEFENDED_OUTPUTS = ("labels", "score", "flag", "keep_mask")


@dataclass
class Request:
    """What one inference call sends: model, input tensor (name, Triton datatype, array), outputs wanted."""
    model: str
    input_name: str
    datatype: str
    array: np.ndarray
    outputs: Tuple[str, ...]

    @property
    def shape(self) -> List[int]:
        return [int(v) for v in self.array.shape]


def preprocess(frames: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 HxWx3 RGB frames (same size) -> float32 (N,3,H,W) in [0,1], what the graph's ``input`` takes."""
    if not frames:
        raise ValueError("no frames")
    arr = np.stack([np.asarray(f) for f in frames])
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 HxWx3 of one size, got {arr.dtype} {arr.shape[1:]}")
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def build_request(frames: Sequence[np.ndarray], model: str, outputs: Sequence[str] = DEFENDED_OUTPUTS) -> Request:
    return Request(model=model, input_name="input", datatype="FP32", array=preprocess(frames), outputs=tuple(outputs))


def json_body(req: Request) -> Dict[str, Any]:
    """The KServe-v2 (Triton HTTP) JSON request body."""
    return {"inputs": [{"name": req.input_name, "shape": req.shape, "datatype": req.datatype,
                        "data": req.array.ravel().tolist()}],
            "outputs": [{"name": n} for n in req.outputs]}


def to_tritonclient(req: Request, http: Any) -> Tuple[List[Any], List[Any]]:
    """(inputs, outputs) for ``tritonclient.http`` (``http`` is that module), binary tensors."""
    inp = http.InferInput(req.input_name, req.shape, req.datatype)
    inp.set_data_from_numpy(req.array, binary_data=True)
    return [inp], [http.InferRequestedOutput(n, binary_data=True) for n in req.outputs]


def infer(url: str, req: Request) -> Dict[str, np.ndarray]:
    """Send ``req`` to a running server (needs ``pip install tritonclient[http]``)."""
    try:
        import tritonclient.http as http
    except ImportError as exc:
        raise RuntimeError(f"the Triton client needs `pip install tritonclient[http]` ({exc})") from None
    client = http.InferenceServerClient(url=url)
    inputs, outputs = to_tritonclient(req, http)
    res = client.infer(req.model, inputs, outputs=outputs)
    return {n: res.as_numpy(n) for n in req.outputs}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.triton_client", description=__doc__.split("\n")[0])
    p.add_argument("frames", nargs="+", help="image files (resized to the model's input size)")
    p.add_argument("--url", default="localhost:8000")
    p.add_argument("--model", default="zmask_ddrnet23_slim")
    p.add_argument("--imgsz", default="360x480", help="HxW the repository was exported for")
    a = p.parse_args(argv)
    import cv2
    h, w = (int(v) for v in a.imgsz.split("x"))
    frames = [cv2.resize(cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB), (w, h)) for f in a.frames]
    out = infer(a.url, build_request(frames, a.model))
    for i, f in enumerate(a.frames):
        masked = int((out["keep_mask"][i] == 0).sum())
        print(f"{f}: score {float(out['score'][i]):.4f} flag {bool(out['flag'][i])} masked px {masked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
