"""Packaging and typing: the wheel and sdist build, pass ``twine check``, hold the
PEP 561 marker, the top-level stub, every subpackage and the C kernel source the
fast path compiles at run time; the installed wheel imports and runs a q8 AdamW
step; mypy passes as configured in pyproject.toml. The stub lists exactly what
``optimkit/__init__.py`` exports.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest

import optimkit as ok

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "optimkit"
#: files the installed package needs besides its .py modules
DATA_FILES = ("optimkit/py.typed", "optimkit/__init__.pyi", "optimkit/kernels/q8_adamw.c")


def _stub_names() -> dict[str, str]:
    """{exported name: module it is imported from (absolute)} read from src/optimkit/__init__.pyi."""
    tree = ast.parse((SRC / "__init__.pyi").read_text())
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = "optimkit" + ("." + node.module if node.module else "")
            for alias in node.names:
                if node.module:  # from .mod import X as X (an explicit re-export)
                    assert alias.asname == alias.name, f"stub: {alias.name} must be re-exported as itself"
                    out[alias.name] = base
                else:  # from . import submodule as name
                    out[alias.asname or alias.name] = f"optimkit.{alias.name}"
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = "<annotation>"
    return out


def test_stub_lists_the_public_names():
    stub = _stub_names()
    assert set(stub) == set(ok.__all__) | {"__version__", "__all__"}, \
        f"missing in __init__.pyi: {sorted(set(ok.__all__) - set(stub))}; extra: " \
        f"{sorted(set(stub) - set(ok.__all__) - {'__version__', '__all__'})}"
    for name in ok.__all__:
        obj = getattr(ok, name)
        where = obj.__name__ if isinstance(obj, types.ModuleType) else obj.__module__
        assert stub[name] == where, f"stub imports {name} from {stub[name]}, it is defined in {where}"


def test_version():
    assert isinstance(ok.__version__, str) and ok.__version__[0].isdigit()
    with open(ROOT / "pyproject.toml", "rb") as fh:
        text = fh.read().decode()
    assert f'version = "{ok.__version__}"' in text


def test_typed_usage_file_runs():
    """tests/typing/public_api.py is real code, not only a mypy fixture."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "typing" / "public_api.py")], capture_output=True,
                         text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def _subpackages() -> set[str]:
    return {str(p.parent.relative_to(SRC.parent)).replace(os.sep, "/") for p in SRC.rglob("__init__.py")
            if "__pycache__" not in p.parts}


def _copy_tree(dst: Path) -> Path:
    """The project's files (no VCS, caches or build outputs), so that building writes nothing into the checkout."""
    skip = {".git", ".venv", ".ci-venv", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache",
            "examples_out", "optimkit-results", "bench-out"}
    shutil.copytree(ROOT, dst, ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".egg-info")])
    return dst


@pytest.mark.slow
def test_build_check_install_and_mypy(tmp_path):
    tree = _copy_tree(tmp_path / "tree")
    dist = tmp_path / "dist"
    # offline: build in this environment (setuptools >= 70.1, which writes wheels itself, is in the test extra)
    assert importlib.util.find_spec("setuptools")
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir",
                          str(dist), str(tree)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    assert wheels[0].name.startswith(f"optimkit-{ok.__version__}-")

    res = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr

    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
    for f in DATA_FILES:
        assert f in names, f"{f} not in the wheel"
    for pkg in _subpackages():
        assert f"{pkg}/__init__.py" in names, f"subpackage {pkg} not in the wheel"
    modules = {str(p.relative_to(SRC.parent)).replace(os.sep, "/") for p in SRC.rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert not any(n.startswith(("tests/", "examples/")) for n in names)
    with tarfile.open(sdists[0]) as t:
        snames = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in DATA_FILES:
        assert f"src/{f}" in snames, f"{f} not in the sdist"

    # the installed wheel: metadata version, the marker next to the code, the C kernel found and run
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                          str(target), str(wheels[0])], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    probe = ("import os, torch, optimkit as ok; from optimkit.kernels import q8_adamw as k\n"
             "assert os.path.dirname(ok.__file__) == os.path.join(os.environ['TARGET'], 'optimkit'), ok.__file__\n"
             "assert os.path.isfile(os.path.join(os.path.dirname(ok.__file__), 'py.typed'))\n"
             "assert k._SOURCE.is_file(), k._SOURCE\n"
             "torch.manual_seed(0); p = torch.nn.Parameter(torch.randn(64, 64))\n"
             "opt = ok.AdamW([p], state_precision='q8', min_quant_size=0); p.grad = torch.randn(64, 64); opt.step()\n"
             "print(k.available()); print(ok.__version__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), TARGET=str(target), OPTIMKIT_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, env=env,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    fast_path, version = res.stdout.strip().splitlines()[-2:]
    assert version == ok.__version__
    if os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc"):  # the kernel built from the wheel's C source
        assert fast_path == "True", res.stderr[-2000:]

    # mypy as configured ([tool.mypy] in pyproject.toml), on the project's own files
    res = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")],
                         capture_output=True, text=True, timeout=300, cwd=str(tree))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Success" in res.stdout
