"""realtime.core.memory: the fixed malloc thresholds the frame loop runs with."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from realtime.core.memory import steady_heap

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt thresholds are a glibc feature")

# A frame loop in a fresh process (the heap's state in the test process depends on the tests before): a small
# conv net whose three tapped maps stay alive until the frame's end, as Z-Mask's do; prints faults per frame.
LOOP = """
import resource, sys, torch
from torch import nn
from realtime.core.memory import steady_heap
from realtime.core.taps import ActivationTaps
print(steady_heap(sys.argv[1] == "on"), file=sys.stderr)
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                    nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 11, 1)).eval()
taps = ActivationTaps(net, ["1", "3", "5"])
x = torch.rand(1, 3, 360, 480)
with torch.inference_mode():
    for _ in range(10):
        out, maps = taps(x)
    del out, maps
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        out, maps = taps(x)
        del out, maps
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_disabled_changes_nothing_and_says_so() -> None:
    assert steady_heap(False) == "default malloc (not changed)"


@glibc
def test_a_tapped_frame_loop_reuses_its_memory_instead_of_faulting_it_in_again() -> None:
    res = subprocess.run([sys.executable, "-c", LOOP, "on"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.startswith("steady heap (glibc mallopt")
    faults = float(res.stdout.strip().splitlines()[-1])
    # one frame's maps are ~9 MB (2,300 pages): handed back to the OS and refaulted, that many faults a frame
    assert faults < 50, f"{faults} page faults per frame: freed memory went back to the OS"
