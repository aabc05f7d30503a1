"""Offline compile check of ``zmask_spr.cu`` for every deployment architecture, no GPU needed.

Two toolchains are looked for:

* ``system``: the machine's CUDA toolkit (``nvcc`` to PTX, then its ``ptxas`` to a cubin).
* ``cuda12``: CUDA 12 from pip (``requirements/cuda-tools.txt``): NVRTC (``libnvrtc.so.12``, loaded with
  ctypes, the compiler CuPy uses at run time) to PTX, then that wheel set's ``ptxas`` to a cubin. CUDA 13
  dropped compute_72, so Jetson Xavier (sm_72) is only reachable through this one.

Every (toolchain, architecture) pair the toolchain targets is compiled and assembled; ``ptxas -v`` gives
registers, stack and spills per kernel. ``python -m kernels.toolchain --check`` prints the table and exits 1
when a pair fails or an architecture has no toolchain that built it.

Overrides: ``ZMASK_NVCC`` (nvcc path), ``ZMASK_NVRTC12`` (libnvrtc.so.12 path), ``ZMASK_PTXAS12`` (ptxas path).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Protocol, Sequence, Tuple

from .launch import THREADS_MAX
from .runtime import KERNEL_NAMES, SOURCE

ARCHS: Tuple[str, ...] = ("72", "80", "87", "90")
# What CuPy's RawModule adds to an option-less compile (kernels/runtime.py passes none of its own).
CUPY_NVRTC_OPTIONS: Tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")
REGS_MAX = 65536 // THREADS_MAX          # registers per thread that still allow a full ZM_THREADS_MAX block
_TIMEOUT_S = 300


class ToolError(RuntimeError):
    """A compiler or assembler is missing, broken, or rejected the source (message carries its log)."""


# ---------------------------------------------------------------------------------------------- discovery
def _wheel_dir(package: str) -> Optional[Path]:
    """Directory of an installed ``nvidia.*`` wheel package, or None."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_nvcc() -> Optional[Path]:
    """The system nvcc: $ZMASK_NVCC, then PATH, then $CUDA_HOME/$CUDA_PATH, then /usr/local/cuda."""
    if os.environ.get("ZMASK_NVCC"):
        return Path(os.environ["ZMASK_NVCC"])
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return Path(root) / "bin" / "nvcc"
    return None


def _wheel_file(env: str, package: str, relpath: str) -> Optional[Path]:
    """``$env`` if set, else ``relpath`` inside the installed wheel ``package`` (None when absent)."""
    if os.environ.get(env):
        return Path(os.environ[env])
    root = _wheel_dir(package)
    path = root / relpath if root else None
    return path if path is not None and path.exists() else None


def find_nvrtc12() -> Optional[Path]:
    """libnvrtc.so.12: $ZMASK_NVRTC12, else the nvidia-cuda-nvrtc-cu12 wheel."""
    return _wheel_file("ZMASK_NVRTC12", "nvidia.cuda_nvrtc", "lib/libnvrtc.so.12")


def find_ptxas12() -> Optional[Path]:
    """CUDA 12 ptxas: $ZMASK_PTXAS12, else the nvidia-cuda-nvcc-cu12 wheel."""
    return _wheel_file("ZMASK_PTXAS12", "nvidia.cuda_nvcc", "bin/ptxas")


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolError(f"{cmd[0]}: {type(exc).__name__}: {exc}") from exc


def _release(exe: Path) -> str:
    """``V13.0.88`` from ``--version`` of nvcc/ptxas."""
    out = _run([exe, "--version"])
    m = re.search(r"\bV(\d+\.\d+\.\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise ToolError(f"{exe} --version failed: {out.stdout}{out.stderr}")
    return m.group(1)


# ---------------------------------------------------------------------------------------------- ptxas
@dataclass(frozen=True)
class KernelUse:
    """ptxas -v resource use of one entry function."""

    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


def parse_ptxas_log(log: str) -> Dict[str, KernelUse]:
    """Per-entry resource use from ``ptxas -v`` output (entries without a ``Used N registers`` line are omitted)."""
    uses: Dict[str, KernelUse] = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        name = re.search(r"Compiling entry function '(\w+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        if not (name and regs):
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        stack, stores, loads = (int(g) for g in frame.groups()) if frame else (0, 0, 0)
        uses[name.group(1)] = KernelUse(int(regs.group(1)), stack, stores, loads)
    return uses


@dataclass(frozen=True)
class Ptxas:
    """A ptxas executable and its release."""

    path: Path
    version: str

    @classmethod
    def at(cls, path: Path) -> "Ptxas":
        return cls(path, _release(path))

    def assemble(self, ptx: str, arch: str, workdir: Path) -> Dict[str, KernelUse]:
        """``ptxas -arch=sm_<arch> -v`` to a cubin; per-kernel resource use, ToolError with the log on failure."""
        src, cubin = workdir / f"zm_{arch}.ptx", workdir / f"zm_{arch}.cubin"
        src.write_text(ptx)
        res = _run([self.path, f"-arch=sm_{arch}", "-v", "-o", cubin, src])
        if res.returncode != 0 or not cubin.exists():
            raise ToolError(f"ptxas {self.version} -arch=sm_{arch} failed (rc={res.returncode}):\n"
                            f"{res.stdout}{res.stderr}")
        return parse_ptxas_log(res.stdout + res.stderr)


# ---------------------------------------------------------------------------------------------- compilers
class Compiler(Protocol):
    """Source-to-PTX compiler."""

    label: str
    version: str

    def archs(self) -> FrozenSet[str]: ...

    def ptx(self, source: str, name: str, arch: str) -> str: ...


@dataclass
class Nvcc:
    """The system nvcc, used as ``nvcc -ptx -arch=compute_XX``."""

    path: Path
    version: str = ""
    label: str = "nvcc"
    _archs: Optional[FrozenSet[str]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.version = self.version or _release(self.path)

    def archs(self) -> FrozenSet[str]:
        if self._archs is None:
            out = _run([self.path, "--list-gpu-arch"])
            if out.returncode != 0:
                raise ToolError(f"{self.path} --list-gpu-arch failed: {out.stderr}")
            self._archs = frozenset(re.findall(r"compute_(\d+)", out.stdout))
        return self._archs

    def ptx(self, source: str, name: str, arch: str) -> str:
        with tempfile.TemporaryDirectory(prefix="zm_nvcc_") as tmp:
            src, out = Path(tmp) / name, Path(tmp) / "out.ptx"
            src.write_text(source)
            res = _run([self.path, "-ptx", f"-arch=compute_{arch}", "-o", out, src])
            if res.returncode != 0:
                raise ToolError(f"nvcc {self.version} -arch=compute_{arch} failed:\n{res.stdout}{res.stderr}")
            return out.read_text()


class Nvrtc:
    """NVRTC through ctypes (any major version; used here for libnvrtc.so.12)."""

    label = "nvrtc"

    def __init__(self, lib: Path, options: Sequence[str] = CUPY_NVRTC_OPTIONS) -> None:
        try:
            self._lib = ctypes.CDLL(str(lib))
        except OSError as exc:
            raise ToolError(f"cannot load {lib}: {exc}") from exc
        self.path, self.options = lib, tuple(options)
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def _check(self, status: int, call: str, log: str = "") -> None:
        if status != 0:
            msg = self._lib.nvrtcGetErrorString(status).decode()
            raise ToolError(f"{call} ({self.path.name} {getattr(self, 'version', '?')}): {msg}"
                            + (f"\n{log}" if log else ""))

    def archs(self) -> FrozenSet[str]:
        n = ctypes.c_int()
        self._check(self._lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        arr = (ctypes.c_int * n.value)()
        self._check(self._lib.nvrtcGetSupportedArchs(arr), "nvrtcGetSupportedArchs")
        return frozenset(str(a) for a in arr)

    def _read(self, prog: ctypes.c_void_p, size_fn: str, get_fn: str) -> str:
        size = ctypes.c_size_t()
        self._check(getattr(self._lib, size_fn)(prog, ctypes.byref(size)), size_fn)
        buf = ctypes.create_string_buffer(size.value)
        self._check(getattr(self._lib, get_fn)(prog, buf), get_fn)
        return buf.value.decode(errors="replace")

    def ptx(self, source: str, name: str, arch: str) -> str:
        """PTX for compute_<arch>; ToolError with the program log when compilation fails."""
        prog = ctypes.c_void_p()
        self._check(self._lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = [f"--gpu-architecture=compute_{arch}", *self.options]
            argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
            status = self._lib.nvrtcCompileProgram(prog, len(opts), argv)
            if status != 0:
                self._check(status, f"nvrtcCompileProgram {' '.join(opts)}",
                            self._read(prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog"))
            return self._read(prog, "nvrtcGetPTXSize", "nvrtcGetPTX")
        finally:
            self._lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------------------------------------- toolchains
@dataclass
class Toolchain:
    """A compiler plus the ptxas of the same CUDA major version, or why the pair is unavailable."""

    name: str
    compiler: Optional[Compiler]
    ptxas: Optional[Ptxas]
    missing: str = ""

    @property
    def describe(self) -> str:
        if self.missing:
            return f"{self.name}: unavailable ({self.missing})"
        assert self.compiler is not None and self.ptxas is not None
        return (f"{self.name}: {self.compiler.label} {self.compiler.version} + ptxas {self.ptxas.version} "
                f"({getattr(self.compiler, 'path', '')}, {self.ptxas.path})")


def system_toolchain() -> Toolchain:
    """nvcc from the system CUDA toolkit with the ptxas beside it."""
    nvcc = find_nvcc()
    if nvcc is None:
        return Toolchain("system", None, None, "nvcc not found: install the CUDA toolkit or set ZMASK_NVCC")
    ptxas = nvcc.with_name("ptxas")
    try:
        return Toolchain("system", Nvcc(nvcc), Ptxas.at(ptxas if ptxas.exists() else Path("ptxas")))
    except ToolError as exc:
        return Toolchain("system", None, None, str(exc))


def cuda12_toolchain() -> Toolchain:
    """CUDA 12 NVRTC + ptxas from the pip wheels in requirements/cuda-tools.txt."""
    hint = "pip install -r requirements/cuda-tools.txt"
    lib, ptxas = find_nvrtc12(), find_ptxas12()
    if lib is None:
        return Toolchain("cuda12", None, None, f"libnvrtc.so.12 not found (nvidia-cuda-nvrtc-cu12): {hint}")
    if ptxas is None:
        return Toolchain("cuda12", None, None, f"CUDA 12 ptxas not found (nvidia-cuda-nvcc-cu12): {hint}")
    try:
        nvrtc = Nvrtc(lib)
        if not nvrtc.version.startswith("12."):
            raise ToolError(f"{lib} is NVRTC {nvrtc.version}, expected 12.x")
        return Toolchain("cuda12", nvrtc, Ptxas.at(ptxas))
    except ToolError as exc:
        return Toolchain("cuda12", None, None, str(exc))


def toolchains() -> List[Toolchain]:
    """Both toolchains, available or not."""
    return [system_toolchain(), cuda12_toolchain()]


# ---------------------------------------------------------------------------------------------- the check
@dataclass
class ArchResult:
    """One (toolchain, architecture) compile + assemble, or why it was skipped or failed."""

    arch: str
    toolchain: str
    tools: str = ""
    status: str = "ok"                    # "ok", "skip", "FAIL"
    detail: str = ""
    ptx_bytes: int = 0
    kernels: Dict[str, KernelUse] = field(default_factory=dict)

    @property
    def max_registers(self) -> int:
        return max((k.registers for k in self.kernels.values()), default=0)


def problems(ptx: str, arch: str, kernels: Dict[str, KernelUse]) -> List[str]:
    """What is wrong with a compiled result: target, entry points, registers, spills, stack."""
    found: List[str] = []
    if f".target sm_{arch}" not in ptx:
        found.append(f"PTX lacks '.target sm_{arch}'")
    entries = sorted(re.findall(r"\.entry (\w+)\(", ptx))
    if entries != sorted(KERNEL_NAMES):
        found.append(f"PTX entries {entries} != {sorted(KERNEL_NAMES)}")
    if set(kernels) != set(KERNEL_NAMES):
        found.append(f"ptxas reported {sorted(kernels)}")
    for name, use in sorted(kernels.items()):
        if use.registers > REGS_MAX:
            found.append(f"{name}: {use.registers} registers > {REGS_MAX} (ZM_THREADS_MAX={THREADS_MAX})")
        if use.spill_stores or use.spill_loads or use.stack_bytes:
            found.append(f"{name}: stack {use.stack_bytes} B, spills {use.spill_stores}/{use.spill_loads} B")
    return found


def compile_arch(chain: Toolchain, arch: str, source: Path = SOURCE) -> ArchResult:
    """Compile ``source`` for ``arch`` with ``chain`` and assemble it; never raises for tool failures."""
    res = ArchResult(arch, chain.name)
    if chain.missing or chain.compiler is None or chain.ptxas is None:
        res.status, res.detail = "skip", chain.missing
        return res
    comp = chain.compiler
    res.tools = f"{comp.label} {comp.version} + ptxas {chain.ptxas.version}"
    try:
        if arch not in comp.archs():
            res.status, res.detail = "skip", f"{comp.label} {comp.version} does not target compute_{arch}"
            return res
        ptx = comp.ptx(source.read_text(), source.name, arch)
        res.ptx_bytes = len(ptx.encode())
        with tempfile.TemporaryDirectory(prefix="zm_ptxas_") as tmp:
            res.kernels = chain.ptxas.assemble(ptx, arch, Path(tmp))
        bad = problems(ptx, arch, res.kernels)
        if bad:
            res.status, res.detail = "FAIL", "; ".join(bad)
    except ToolError as exc:
        res.status, res.detail = "FAIL", str(exc)
    return res


def check(archs: Sequence[str] = ARCHS, chains: Optional[Sequence[Toolchain]] = None,
          source: Path = SOURCE) -> List[ArchResult]:
    """Every architecture through every toolchain."""
    chains = toolchains() if chains is None else chains
    return [compile_arch(c, a, source) for a in archs for c in chains]


def failures(results: Sequence[ArchResult], archs: Sequence[str] = ARCHS) -> List[str]:
    """Failed pairs, plus architectures no toolchain built."""
    out = [f"sm_{r.arch} via {r.toolchain}: {r.detail}" for r in results if r.status == "FAIL"]
    built = {r.arch for r in results if r.status == "ok"}
    out += [f"sm_{a}: no available toolchain built it" for a in archs if a not in built]
    return out


def table(results: Sequence[ArchResult]) -> str:
    """Plain-text table, one row per (architecture, toolchain)."""
    head = ("arch", "toolchain", "tools", "PTX bytes", "max regs", "registers per kernel", "status")
    rows = [head]
    for r in results:
        per = " ".join(f"{n}={u.registers}" for n, u in sorted(r.kernels.items()))
        status = r.status if r.status == "ok" else f"{r.status}: {r.detail.splitlines()[0] if r.detail else ''}"
        rows.append((f"sm_{r.arch}", r.toolchain, r.tools or "-", str(r.ptx_bytes or "-"),
                     str(r.max_registers or "-"), per or "-", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``--check`` compiles and assembles for ``--archs`` and prints the table; 1 on any failure."""
    ap = argparse.ArgumentParser(prog="python -m kernels.toolchain", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compile + assemble for every architecture")
    ap.add_argument("--archs", default=",".join(ARCHS),
                    help="comma-separated compute capabilities (default %(default)s)")
    args = ap.parse_args(argv)
    chains = toolchains()
    for c in chains:
        print(c.describe)
    if not args.check:
        return 0
    archs = [a.strip().removeprefix("sm_") for a in args.archs.split(",") if a.strip()]
    results = check(archs, chains)
    print(table(results))
    bad = failures(results, archs)
    for line in bad:
        print(f"FAILED {line}", file=sys.stderr)
    print("toolchain check: " + ("FAILED" if bad else "ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
