"""``backend="rotatek"`` resolves through the ``torch_dynamo_backends`` entry point, in a fresh
interpreter that never imports ``rotatek_compile`` itself; the distribution ships one top-level
package only."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in a clean interpreter, from a directory outside the repository (so that the installed
# distribution, not the checkout on sys.path, is what answers).
LOOKUP_AND_COMPILE = textwrap.dedent("""
    import sys
    import torch
    from torch._dynamo.backends.registry import lookup_backend

    assert "rotatek_compile" not in sys.modules, "imported before lookup"
    backend = lookup_backend("rotatek")
    assert callable(backend), backend
    print("resolved", backend.__module__, backend.__name__)

    def fn(x, y):
        return torch.softmax(x @ y.T, dim=-1).sum(0) + 1

    x, y = torch.randn(4, 8), torch.randn(3, 8)
    compiled = torch.compile(fn, backend="rotatek", options={"key_channels": 8, "inner": "eager"})
    torch.testing.assert_close(compiled(x, y), fn(x, y))
    print("compiled ok")
""")

BAD_OPTION = textwrap.dedent("""
    import torch

    compiled = torch.compile(lambda x: x * 2, backend="rotatek", options={"solver": "bogus"})
    try:
        compiled(torch.ones(3))
    except ValueError as error:  # the backend's own error, not wrapped by Dynamo
        print("raised", type(error).__name__, isinstance(error, ValueError))
        print("first line:", str(error).splitlines()[0])
    else:
        print("no error")
""")

TOP_LEVEL = textwrap.dedent("""
    import importlib.metadata
    import importlib.util

    dist = importlib.metadata.distribution("rotatek_compile")
    tops = {str(f).split("/")[0] for f in dist.files or ()}
    print("files_top", sorted(tops))
    print("top_level", (dist.read_text("top_level.txt") or "").split())
    print("entry_points", [(e.group, e.name, e.value) for e in dist.entry_points])
    for name in ("passes", "kernels"):
        print("spec", name, importlib.util.find_spec(name) is not None)
""")


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)


def test_backend_resolves_without_importing_the_package(tmp_path):
    result = _run(LOOKUP_AND_COMPILE, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resolved rotatek_compile.backend rotatek_backend" in result.stdout
    assert "compiled ok" in result.stdout


def test_bad_option_through_torch_compile_names_it(tmp_path):
    result = _run(BAD_OPTION, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "no error" not in result.stdout
    assert "raised" in result.stdout and " True" in result.stdout  # a ValueError, unwrapped
    first = next(line for line in result.stdout.splitlines() if line.startswith("first line:"))
    assert "solver='bogus'" in first and "'eigh'" in first


def test_distribution_ships_no_top_level_passes_or_kernels(tmp_path):
    result = _run(TOP_LEVEL, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert "('torch_dynamo_backends', 'rotatek', 'rotatek_compile.backend:rotatek_backend')" in lines["entry_points"]
    for package in ("passes", "kernels"):
        assert f"'{package}'" not in lines["files_top"]
        assert f"'{package}'" not in lines["top_level"]
    assert "spec passes False" in result.stdout
    assert "spec kernels False" in result.stdout


def test_package_discovery_keeps_subpackages_under_rotatek_compile():
    # What a (non-editable) build would package, from pyproject's own find configuration.
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(where=str(REPO / find.get("where", ["."])[0]),
                                        include=find.get("include", ("*",)), exclude=find.get("exclude", ()))
    assert {"rotatek_compile", "rotatek_compile.passes", "rotatek_compile.kernels"} <= set(packages)
    assert all(p == "rotatek_compile" or p.startswith("rotatek_compile.") for p in packages), packages
