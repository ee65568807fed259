"""The layout holds: a runtime core without torch, fastai or Starlette; serving and model building
beside each other, never importing each other; imports only downward; small documented modules;
and a server that runs with torch and fastai not installed at all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from support import BEARS, HEAVY, ROOT, AppProcess, drawn_teddy

APP = ROOT / "app"
# What each part may import from the project (besides itself). Entry modules (app/__main__.py,
# app/train.py, app/clean.py, app/evaluate.py, app/compile.py, app/predict.py) sit on top and may import anything.
ALLOWED = {
    "app.core": set(),
    "app.web": {"app.core"},
    "app.learner": {"app.core"},
    "app.serving": {"app.core", "app.learner", "app.web"},
    "app.building": {"app.core", "app.learner", "app.web", "app.arch"},
    "app.arch": set(),
}
ENTRY_MODULES = {"app", "app.__main__", "app.train", "app.clean", "app.evaluate", "app.compile", "app.predict"}
# app.arch registers backbones with fastai when imported (so it imports torch and fastai): it is
# imported where a backbone is needed, as the heavy library it wraps, and nowhere else lazily.
LAZY_ALLOWED = {"app.arch"}
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(name: str) -> str:
    for part in sorted(ALLOWED, key=len, reverse=True):
        if name == part or name.startswith(part + "."):
            return part
    return name


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(APP.rglob("*.py"))}


def imports(tree: ast.Module, top_level_only: bool = False) -> list[tuple[str, bool]]:
    """(module imported, whether at module level) for every import in the tree."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top))
    return [(name, at_top) for name, at_top in found if at_top or not top_level_only]


def test_each_part_imports_only_what_lies_below_it():
    wrong = []
    for name, tree in modules().items():
        if name in ENTRY_MODULES:
            continue
        part = part_of(name)
        for imported, _ in imports(tree):
            if imported.startswith("app.") or imported == "app":
                target = part_of(imported)
                if target != part and target not in ALLOWED[part]:
                    wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_no_lazy_imports_of_the_projects_own_modules():
    lazy = [f"{name} imports {imported} inside a function" for name, tree in modules().items()
            for imported, at_top in imports(tree)
            if not at_top and imported.startswith("app.") and part_of(imported) not in LAZY_ALLOWED]
    assert lazy == []


def test_the_core_needs_no_torch_fastai_or_starlette_and_nothing_imports_them_at_module_level_but_building():
    offending = []
    for name, tree in modules().items():
        for imported, at_top in imports(tree):
            root = imported.split(".")[0]
            if part_of(name) == "app.core" and root in (*HEAVY, "starlette", "uvicorn", "aiohttp"):
                offending.append(f"{name} imports {imported}")
            elif at_top and root in HEAVY and part_of(name) not in ("app.building", "app.arch"):
                offending.append(f"{name} imports {imported} at module level")
    assert offending == []


def test_no_import_circles():
    graph = {name: {imported for imported, _ in imports(tree) if imported.startswith("app")}
             for name, tree in modules().items()}

    def visit(node: str, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        if node in path:
            return [(*path[path.index(node):], node)]
        return [c for nxt in graph.get(node, ()) for c in visit(nxt, (*path, node))]

    assert [c for name in graph for c in visit(name, ())] == []


def test_modules_are_small_and_say_what_they_are_for():
    for path in sorted(APP.rglob("*.py")):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no docstring"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_importing_the_server_imports_no_torch_or_fastai():
    script = ("import sys, app.__main__, app.serving.app; "
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def default_model_checked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's compiled copy, checked against its learner once (`python -m app --check`)
    into a cache folder of this test's own."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**__import__("os").environ, "CACHE_DIR": str(cache)}
    check = subprocess.run([sys.executable, "-m", "app", "--check"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    return cache


def test_the_server_runs_with_torch_and_fastai_not_installed(default_model_checked, tmp_path):
    app = AppProcess({"CACHE_DIR": str(default_model_checked)}, tmp_path / "server.log", without=HEAVY)
    try:
        app.wait_ready(learner=False)
        photo = (sorted((BEARS / "teddys").iterdir())[0].read_bytes() if BEARS.is_dir() else drawn_teddy())
        answer = requests.post(app.url + "/upload", files={"file": ("t.jpg", photo)}, timeout=30).json()
        assert [label for label, _ in answer["predictions"]][0] == "teddys"
        assert isinstance(answer["unfamiliar"], bool)
        model = app.wait_ready(learner=True)  # returns once the background load is over
        info = requests.get(model.url + "/model", timeout=10).json()
        assert info["backend"] == "onnx" and info["detector"]["k"] == 5
        assert info["learner"].startswith("failed: ") and "made unimportable" in info["learner"]
    finally:
        assert app.stop() == 0
    assert "the learner failed to load in the background" in app.log()
