"""Every console script in setup.py points at an importable ``main`` that answers ``--help`` with exit 0."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def console_scripts():
    for node in ast.walk(ast.parse(SETUP.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            spec = ast.literal_eval(node.value)
            return [tuple(s.strip() for s in line.split("=")) for line in spec["console_scripts"]]
    return []


def test_setup_declares_console_scripts():
    names = [n for n, _ in console_scripts()]
    assert "zmask-run" in names and "zmask-calibrate" in names and len(names) == len(set(names))


@pytest.mark.parametrize("name,target", console_scripts())
def test_console_script_target(name, target, capsys):
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out.lower()
