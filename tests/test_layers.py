"""The import order of the layers: serve -> cluster -> actors -> engine -> model -> kernels.

An arrow may skip layers; none may point up. The import root (`v4ray`, the `api/` folder: the public names and the
CLI) may import every layer. Imports are read from the source (every `import` and `from ... import`, at any depth,
relative ones resolved), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = ["kernels", "model", "engine", "actors", "cluster", "serve"]  # bottom to top
ROOT_FOLDER = "api"  # the package `v4ray` itself
STANDALONE = ["testing"]  # beside the tree: imports none of the layers (test infrastructure people run too)


def imported_layers(source: str, layer: str, module: str) -> list[tuple[int, str]]:
    """(line, layer) of every v4ray layer that `source` (module `module` of `layer`) imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the module's own package (or, at level 2, the root)
                base = ["v4ray", layer][: 3 - node.level] if layer != ROOT_FOLDER else ["v4ray"]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "v4ray" and len(parts) > 1 and parts[1] in LAYERS:
                found.append((node.lineno, parts[1]))
    return found


def upward_imports(repo: Path) -> list[str]:
    bad = []
    for layer in LAYERS:
        for path in sorted((repo / layer).glob("*.py")):
            for line, target in imported_layers(path.read_text(), layer, path.stem):
                if LAYERS.index(target) > LAYERS.index(layer):
                    bad.append(f"{path.relative_to(repo)}:{line}: {layer} imports {target}")
    return bad


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(REPO) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """A synthetic tree: the same check fails on one upward import, lazy or relative, and passes downward ones."""
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "engine" / "ok.py").write_text("from v4ray.model.config import V4Config\nimport v4ray.kernels\n")
    (tmp_path / "serve" / "top.py").write_text("from v4ray.cluster import llm\nfrom .config import X\n")
    assert upward_imports(tmp_path) == []
    (tmp_path / "engine" / "bad.py").write_text("def f():\n    from v4ray.actors.router import Router\n")
    (tmp_path / "model" / "worse.py").write_text("import v4ray.serve.app\n")
    assert upward_imports(tmp_path) == ["model/worse.py:1: model imports serve", "engine/bad.py:2: engine imports actors"]


def test_every_package_folder_is_a_layer():
    """A new top-level package must take its place in the order (or this test says where it is missing)."""
    import tomllib

    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(dirs.values()) == set(LAYERS) | {ROOT_FOLDER} | set(STANDALONE)


def test_standalone_packages_import_no_layer():
    bad = [f"{path.relative_to(REPO)}:{line}: imports {target}" for folder in STANDALONE
           for path in sorted((REPO / folder).glob("*.py"))
           for line, target in imported_layers(path.read_text(), folder, path.stem)]
    assert bad == []
