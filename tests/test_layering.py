"""The import contract (README "Layers"): every import, lazy ones included, points down the layer list.

Two independent checks of the same contract: this file's own walk over every ``import`` statement in
the source (no dependency), and import-linter's ``lint-imports`` with ``.importlinter``. Each is also
run once on a copy of the tree with a deliberately added back-edge, which it must reject.
"""
from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("realtime", "engines", "kernels", "calibration", "benchmarks")


def layers(repo: Path = REPO) -> List[List[str]]:
    """The layers of ``.importlinter``, top first; each a list of independent siblings."""
    cp = configparser.ConfigParser()
    cp.read(repo / ".importlinter")
    text = cp["importlinter:contract:layers"]["layers"]
    return [[m.strip() for m in line.split("|")] for line in text.strip().splitlines() if line.strip()]


def modules(repo: Path) -> Dict[str, Path]:
    out = {}
    for root in ROOTS:
        for path in (repo / root).rglob("*.py"):
            name = ".".join(path.relative_to(repo).with_suffix("").parts)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(name: str, path: Path, known: Dict[str, Path]) -> List[Tuple[str, int]]:
    """(imported project module, line) for every import statement, wherever it sits in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                found.append((t, node.lineno))
    return found


def layer_of(module: str, table: List[List[str]]) -> Optional[Tuple[int, str]]:
    """(rank, member) of the most specific layer member containing ``module``; rank 0 = top."""
    best = None
    for rank, members in enumerate(table):
        for m in members:
            if module == m or module.startswith(m + "."):
                if best is None or len(m) > len(best[1]):
                    best = (rank, m)
    return best


def violations(repo: Path) -> List[str]:
    """Every import that goes up a layer or sideways between independent siblings."""
    table, known, bad = layers(repo), modules(repo), []
    for name, path in known.items():
        src = layer_of(name, table)
        for target, line in imports(name, path, known):
            dst = layer_of(target, table)
            if src is None or dst is None or src[1] == dst[1]:
                continue
            if dst[0] <= src[0]:
                bad.append(f"{name}:{line} imports {target} ({src[1]} must not depend on {dst[1]})")
    return sorted(set(bad))


def unlisted(repo: Path) -> Set[str]:
    """Modules of the root packages that no layer covers (other than the package roots themselves)."""
    table = layers(repo)
    return {m for m in modules(repo) if layer_of(m, table) is None and m not in ROOTS}


def test_every_import_points_down():
    assert violations(REPO) == []


def test_every_module_belongs_to_a_layer():
    assert unlisted(REPO) == set()


def _tree_with_back_edge(tmp_path: Path) -> Path:
    """A copy of the sources plus ``.importlinter``, with realtime.core importing benchmarks lazily."""
    copy = tmp_path / "repo"
    for root in ROOTS:
        shutil.copytree(REPO / root, copy / root, ignore=shutil.ignore_patterns("results", "__pycache__", "*.pt",
                                                                               "*.png", "*.safetensors", "weights"))
    shutil.copy(REPO / ".importlinter", copy / ".importlinter")
    target = copy / "realtime" / "core" / "types.py"
    target.write_text(target.read_text(encoding="utf-8") + "\n\ndef _back_edge():\n    import benchmarks.accuracy  # noqa\n",
                      encoding="utf-8")
    return copy


def test_a_back_edge_is_caught(tmp_path):
    found = violations(_tree_with_back_edge(tmp_path))
    assert any("realtime.core.types" in v and "benchmarks.accuracy" in v for v in found), found


def _lint_imports() -> Optional[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.is_file() else shutil.which("lint-imports")


@pytest.mark.skipif(_lint_imports() is None, reason="import-linter is not installed (requirements/cpu.txt has it)")
def test_import_linter_contract(tmp_path):
    ok = subprocess.run([_lint_imports(), ".importlinter"], cwd=REPO, capture_output=True, encoding="utf-8")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    copy = _tree_with_back_edge(tmp_path)
    bad = subprocess.run([_lint_imports(), ".importlinter"], cwd=copy, capture_output=True, encoding="utf-8",
                         env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert bad.returncode != 0 and "benchmarks" in bad.stdout, bad.stdout + bad.stderr
