"""The documentation site: a strict MkDocs build, API coverage of the public surface,
and the migration page's calls checked against the real signatures.

* ``mkdocs build --strict`` (a subprocess, into a temporary directory) must succeed:
  broken links, missing nav files and griffe docstring warnings all fail it.
* Every name in ``optimkit.__all__`` must have an entry in the API reference pages
  (``::: module.path.Name``, or the module itself for ``schedules``, ``scaling``,
  ``curvature``), and each entry must resolve to that very object.
* Every ``ok.X(...)`` call in ``docs/migration.md`` must name a public optimkit
  object and use keywords it accepts; every peer call (``torch.optim``,
  ``bnb.optim``, ``torchao.optim``, ``po``, ``schedulefree``, ``prodigyopt``)
  must use keywords the installed peer accepts (skipped for peers not installed).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import optimkit as ok

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
ENTRY = re.compile(r"^:::\s+([\w.]+)", re.M)


def _api_entries() -> dict[str, str]:
    """``{dotted path: page}`` for every mkdocstrings entry under docs/api."""
    out = {}
    for page in sorted(API.glob("*.md")):
        for path in ENTRY.findall(page.read_text()):
            out[path] = page.name
    return out


def _resolve(path: str):
    """Import the object a dotted path names (longest importable module prefix)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    site = tmp_path / "site"
    # the checkout's sources win over an installed optimkit (the API pages import it)
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": path}
    # no -q: mkdocs 1.6 then stops counting warnings, and --strict passes a broken link
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    assert (site / "index.html").is_file()
    # the API pages rendered the docstrings, with the real constructor signatures
    first_order = (site / "api" / "first_order" / "index.html").read_text()
    assert "Decoupled Weight Decay Regularization" in first_order
    assert "state_precision" in first_order and "amsgrad" in first_order
    assert (site / "choosing" / "index.html").is_file()
    for png in (DOCS / "assets").glob("*.png"):
        assert (site / "assets" / png.name).is_file()
    shutil.rmtree(site)


def test_every_public_name_has_an_api_entry():
    entries = _api_entries()
    by_name: dict[str, list[str]] = {}
    for path in entries:
        by_name.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    modules = [m for m in map(_resolve, entries) if inspect.ismodule(m)]
    missing = []
    for name in ok.__all__:
        obj = getattr(ok, name)
        paths = by_name.get(name, [])
        if any(_resolve(p) is obj for p in paths):
            continue
        # or a documented member of a module rendered whole (``::: optimkit.scaling``):
        # defined there, and with a docstring (members without one are not shown)
        if any(getattr(m, name, None) is obj and getattr(obj, "__module__", None) == m.__name__
               and inspect.getdoc(obj) for m in modules):
            continue
        missing.append(name)
    assert not missing, f"public names without an API entry: {missing}"


def test_every_registered_optimizer_is_documented_once():
    entries = _api_entries()
    classes = {ok.info(n).cls for n in ok.available()}
    documented = [p for p in entries if isinstance(_resolve(p), type) and _resolve(p) in classes]
    assert len(documented) == len(set(documented)) == len(classes)


def test_api_entries_resolve():
    bad = []
    for path, page in _api_entries().items():
        try:
            _resolve(path)
        except (ImportError, AttributeError):
            bad.append(f"{page}: {path}")
    assert not bad, bad


def test_nav_lists_every_page_and_no_missing_file():
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    listed = set(re.findall(r"^\s*-\s*[^#\n]*?:\s*([\w/]+\.md)\s*$", nav, re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed <= pages, f"nav names missing files: {listed - pages}"
    assert pages <= listed, f"pages not in the nav: {pages - listed}"


# ------------------------------------------------------------------ migration page

PEERS = {"torch.optim": "torch.optim", "bnb.optim": "bitsandbytes.optim", "torchao.optim": "torchao.optim",
         "po": "pytorch_optimizer", "schedulefree": "schedulefree", "prodigyopt": "prodigyopt"}


def _migration_calls() -> list[ast.Call]:
    text = (DOCS / "migration.md").read_text()
    calls = []
    for span in re.findall(r"`([^`\n]+\))`", text):
        try:
            tree = ast.parse(span, mode="eval")
        except SyntaxError:
            continue
        calls += [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    return calls


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _accepts(fn, keywords: list[str]) -> list[str]:
    """The keywords ``fn`` does not accept. An optimkit class's ``__signature__`` lists
    its hyperparameters; its ``__init__`` adds ``state_dir`` and
    ``state_precision_overrides`` (named there, not swallowed by ``**hyperparameters``)."""
    params = dict(inspect.signature(fn).parameters)
    if isinstance(fn, type) and issubclass(fn, ok.Optimizer):
        params.update({k: v for k, v in inspect.signature(fn.__init__).parameters.items()
                       if v.kind is v.KEYWORD_ONLY})
    elif any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in keywords if k not in params]


def _peer(prefix: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(PEERS[prefix])
        except Exception:  # not installed, or no usable backend
            return None


def test_migration_calls_use_real_keywords():
    calls = _migration_calls()
    ours = [c for c in calls if (_dotted(c.func) or "").startswith("ok.")]
    assert len(ours) >= 40, len(ours)
    problems, checked_peers = [], 0
    for call in calls:
        name = _dotted(call.func)
        if not name:
            continue
        keywords = [k.arg for k in call.keywords if k.arg]
        if name.startswith("ok."):
            fn = getattr(ok, name[3:], None)
            if fn is None:
                problems.append(f"{name}: not in optimkit")
                continue
            if name[3:] not in ok.__all__:
                problems.append(f"{name}: not public")
            bad = _accepts(fn, keywords)
            if bad:
                problems.append(f"{name}: no keyword {bad}")
            continue
        prefix = next((p for p in sorted(PEERS, key=len, reverse=True) if name.startswith(p + ".")), None)
        if prefix is None:
            continue
        mod = _peer(prefix)
        if mod is None:
            continue
        fn = mod
        for attr in name[len(prefix) + 1:].split("."):
            fn = getattr(fn, attr, None)
        if fn is None:
            problems.append(f"{name}: not in the installed {PEERS[prefix]}")
            continue
        bad = _accepts(fn, keywords)
        if bad:
            problems.append(f"{name}: no keyword {bad}")
        checked_peers += 1
    assert not problems, problems
    if checked_peers == 0:
        pytest.skip("no peer package installed: only optimkit's calls were checked")


def test_migration_calls_construct_and_step():
    """The optimkit calls of the migration page build optimizers that step."""
    import tempfile

    import torch

    made = 0
    with tempfile.TemporaryDirectory() as state_dir:
        for call in _migration_calls():
            name = _dotted(call.func) or ""
            cls = getattr(ok, name[3:], None) if name.startswith("ok.") else None
            if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
                continue
            if not (call.args and isinstance(call.args[0], ast.Name) and call.args[0].id == "params"):
                continue
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            src = ast.unparse(call).replace("ckpt/opt-state", state_dir)
            opt = eval(src, {"ok": ok, "params": list(model.parameters()), "model": model})
            before = [p.detach().clone() for p in model.parameters()]
            for _ in range(6):  # ADOPT, SOAP: the first step only initializes state; RAdam-SF: silent to step 5
                opt.zero_grad()
                loss = model(torch.randn(5, 8)).square().mean()
                loss.backward(create_graph=getattr(opt, "requires_create_graph", False))
                if opt.requires_closure:
                    opt.step(lambda: model(torch.randn(5, 8)).square().mean())
                else:
                    opt.step()
            assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), src
            made += 1
    assert made >= 30, made
