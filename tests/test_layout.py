"""The shape a reviewer relies on: library code never imports a script, and no function grows past a screen."""

import ast
import glob
import os

import pytest

from conftest import ROOT

SCRIPTS = {"train", "sample", "evaluate"}
PACKAGES = ("ldm", "dp", "kernels", "metrics")


def modules():
    return sorted(p for pkg in PACKAGES for p in glob.glob(os.path.join(ROOT, pkg, "*.py")))


def imported(path):
    """Top-level module names that `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", modules(), ids=lambda p: os.path.relpath(p, ROOT))
def test_library_modules_never_import_a_script(path):
    assert not imported(path) & SCRIPTS


def test_the_readme_grep_finds_nothing():
    hits = [f"{os.path.relpath(p, ROOT)}:{i}" for p in modules()
            for i, line in enumerate(open(p), 1) if "import train" in line or "import sample" in line]
    assert hits == []


def test_every_function_of_the_library_and_scripts_fits_about_sixty_lines():
    paths = modules() + [os.path.join(ROOT, f"{s}.py") for s in sorted(SCRIPTS)]
    long = [f"{os.path.relpath(p, ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in paths for node in ast.walk(ast.parse(open(p).read()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 65]
    assert long == []
