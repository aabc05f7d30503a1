"""kernels/zmask_spr.cu compiles and assembles for every deployment target, no GPU needed.

* sm_80 (A100), sm_87 (Jetson Orin), sm_90 (H100): system nvcc to PTX, its ptxas to a cubin.
* sm_72 (Jetson Xavier): CUDA 13 dropped compute_72, so CUDA 12 NVRTC (ctypes) + CUDA 12 ptxas from pip
  (requirements/cuda-tools.txt, installed by ``make install``); sm_87 too, Orin's JetPack 6 being CUDA 12.
* NVRTC as CuPy drives it at run time (cupy-cuda13x + nvidia-cuda-nvrtc, also in cuda-tools.txt).

Every ptxas run must show all entry points, no spills, no stack, registers within __launch_bounds__.
A missing tool skips with the reason; ``ZMASK_REQUIRE_CUDA_TOOLS=1`` turns those skips into failures.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kernels import toolchain as tc
from kernels.runtime import KERNEL_NAMES, SOURCE

REQUIRE = os.environ.get("ZMASK_REQUIRE_CUDA_TOOLS", "") not in ("", "0")


def _missing(why: str) -> None:
    (pytest.fail if REQUIRE else pytest.skip)(why)


@pytest.fixture(scope="module")
def system() -> tc.Toolchain:
    return tc.system_toolchain()


@pytest.fixture(scope="module")
def cuda12() -> tc.Toolchain:
    return tc.cuda12_toolchain()


def _built(chain: tc.Toolchain, arch: str) -> tc.ArchResult:
    if chain.missing:
        _missing(chain.missing)
    res = tc.compile_arch(chain, arch)
    assert res.status != "FAIL", res.detail
    if res.status == "skip":
        _missing(res.detail)
    assert set(res.kernels) == set(KERNEL_NAMES)
    return res


def test_source_is_nvrtc_friendly() -> None:
    """No includes (NVRTC has no system headers), only extern "C" entry points, all launched ones present."""
    src = SOURCE.read_text()
    assert not re.search(r"^\s*#\s*include", src, flags=re.M)
    entries = re.findall(r'extern "C" __global__ void(?: __launch_bounds__\(\w+\))? (\w+)\(', src)
    assert sorted(entries) == sorted(KERNEL_NAMES)
    assert "__host__" not in src and "printf" not in src


@pytest.mark.parametrize("arch", ["80", "87", "90"])
def test_system_nvcc_ptx_and_ptxas(system: tc.Toolchain, arch: str) -> None:
    _built(system, arch)


def test_system_nvcc_sm72_builds_or_is_cuda13(system: tc.Toolchain) -> None:
    """A CUDA <= 12 nvcc must build Xavier; only CUDA >= 13 may decline (sm_72 then comes from the CUDA 12
    NVRTC test below)."""
    if system.missing:
        _missing(system.missing)
    res = tc.compile_arch(system, "72")
    assert res.status != "FAIL", res.detail
    if res.status == "skip":
        assert system.compiler is not None and int(system.compiler.version.split(".")[0]) >= 13, res.detail


@pytest.mark.parametrize("arch", ["72", "87"])
def test_cuda12_nvrtc_ptx_and_ptxas(cuda12: tc.Toolchain, arch: str) -> None:
    res = _built(cuda12, arch)
    assert res.tools.startswith("nvrtc 12.")


def test_cuda12_nvrtc_reports_compile_errors(cuda12: tc.Toolchain, tmp_path: Path) -> None:
    """A broken source fails with NVRTC's own log in the message, not a bare status code."""
    if cuda12.missing:
        _missing(cuda12.missing)
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k(float* x) { x[0] = undeclared_name; }\n')
    res = tc.compile_arch(cuda12, "72", bad)
    assert res.status == "FAIL" and "undeclared_name" in res.detail, res.detail


def test_parse_ptxas_log() -> None:
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function 'a' for 'sm_72'\n"
           "ptxas info    : Function properties for a\n"
           "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, 380 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function 'b' for 'sm_72'\n"
           "ptxas info    : Function properties for b\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 12 registers, 360 bytes cmem[0]\n")
    uses = tc.parse_ptxas_log(log)
    assert uses == {"a": tc.KernelUse(40, 8, 4, 4), "b": tc.KernelUse(12, 0, 0, 0)}
    ptx = "".join(f".target sm_72\n.entry {n}(\n" for n in KERNEL_NAMES)
    assert any("spills 4/4" in p for p in tc.problems(ptx, "72", {**uses, **{n: uses["b"] for n in KERNEL_NAMES}}))


def test_failures_flag_unbuilt_archs_and_table_renders() -> None:
    ok = tc.ArchResult("80", "system", "nvcc 13.0 + ptxas 13.0", ptx_bytes=10,
                       kernels={n: tc.KernelUse(32, 0, 0, 0) for n in KERNEL_NAMES})
    skipped = tc.ArchResult("72", "system", status="skip", detail="nvcc 13.0 does not target compute_72")
    assert tc.failures([ok, skipped], ["72", "80"]) == ["sm_72: no available toolchain built it"]
    assert tc.failures([ok], ["80"]) == []
    text = tc.table([ok, skipped])
    assert "sm_80" in text and "skip: nvcc 13.0 does not target compute_72" in text


@pytest.mark.parametrize("arch", ["80", "87", "90"])
def test_cupy_nvrtc_compiles(arch: str) -> None:
    """The run-time path: CuPy's NVRTC bindings with the options CuPy's RawModule adds (no driver needed)."""
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 - any import/loader failure means: not installed here
        _missing(f"CuPy NVRTC not available (pip install -r requirements/cuda-tools.txt): "
                 f"{type(exc).__name__}: {exc}")
    prog = nvrtc.createProgram(SOURCE.read_text(), SOURCE.name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, (f"-arch=compute_{arch}", *tc.CUPY_NVRTC_OPTIONS))
        except Exception as exc:  # noqa: BLE001 - show the compiler log
            pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        assert sorted(re.findall(r"\.entry (\w+)\(", ptx)) == sorted(KERNEL_NAMES)
    finally:
        nvrtc.destroyProgram(prog)
