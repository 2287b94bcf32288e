"""The house rules on imports, read statically from the source (ast), for bankd,
bankd_client and tinyalign: no import circle between modules, and no private name
(``_x``) imported from another module.

Every import counts, at module level or inside a function, and those under
``if TYPE_CHECKING:`` too: a lazy import only hides a circle from the interpreter,
not from a reader. ``from pkg import mod`` is an edge to the submodule ``pkg.mod``
when there is one, else to ``pkg`` itself; importing a submodule is not counted as an
import of its package's ``__init__``. A private name is flagged when it is imported
(``from m import _x``) or read off an imported module (``m._x``). Cases built in a
temporary package show that each check can fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"bankd": ROOT / "bankd", "bankd_client": ROOT / "client", "tinyalign": ROOT / "trainer"}
GENERATED = ("bankd_client.proto.",)  # protoc's stubs: not ours to shape


@dataclass
class Imports:
    """The import graph of some packages: module -> the modules it imports (with the
    line of the first import of each), and the private names taken across modules."""

    modules: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, dict[str, int]] = field(default_factory=dict)
    private: list[str] = field(default_factory=list)


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under each package root."""
    out = {}
    for name, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([name, *parts])] = path
    return out


def _absolute(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute name of a (possibly relative) ``from`` import's module."""
    if level == 0:
        return target or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def read_imports(packages: dict[str, Path]) -> Imports:
    found = Imports(modules=module_files(packages))
    for module, path in found.modules.items():
        if not module.startswith(GENERATED):
            found.edges[module] = _module_imports(module, path, found, tuple(packages))
    return found


def _module_imports(module: str, path: Path, found: Imports, ours: tuple[str, ...]) -> dict:
    """The modules of ours that ``module`` imports; private names go to found.private."""
    edges: dict[str, int] = {}
    aliases: dict[str, str] = {}  # local name -> our module it is bound to
    where = path.relative_to(ROOT) if ROOT in path.parents else path
    tree = ast.parse(path.read_text(), filename=str(path))

    def add(target: str, line: int) -> None:
        if target != module and target in found.modules:
            edges.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ours:
                    add(a.name, node.lineno)
                    aliases[a.asname or a.name.split(".")[0]] = (
                        a.name if a.asname else a.name.split(".")[0]
                    )
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node.level, node.module)
            if source.split(".")[0] not in ours:
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in found.modules:
                    add(sub, node.lineno)
                    aliases[a.asname or a.name] = sub
                    continue
                add(source, node.lineno)
                if _is_private(a.name) and source != module:
                    found.private.append(
                        f"{where}:{node.lineno}: {module} imports {a.name} from {source}"
                    )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and aliases.get(node.value.id, module) != module
        ):
            found.private.append(
                f"{where}:{node.lineno}: {module} reads {node.attr} of {aliases[node.value.id]}"
            )
    return edges


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan), as a cycle
    through it for the message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def describe(group: list[str], edges: dict[str, dict[str, int]]) -> str:
    members = set(group)
    lines = [
        f"  {a} -> {b} (line {line})"
        for a in group
        for b, line in sorted(edges.get(a, {}).items())
        if b in members
    ]
    return "circle among " + ", ".join(group) + ":\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def house() -> Imports:
    return read_imports(PACKAGES)


def test_the_walk_sees_the_packages(house):
    assert {"bankd.cli", "bankd_client.client", "tinyalign.model"} <= set(house.modules)
    assert "bankd.cli" in house.edges and house.edges["bankd.cli"]


def test_no_import_circle(house):
    found = circles(house.edges)
    assert not found, "\n".join(describe(g, house.edges) for g in found)


def test_no_private_name_imported_from_another_module(house):
    assert not house.private, "\n".join(house.private)


# -- the checks can fail ----------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": '"""A package."""\n', **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {"pkg": root}


def test_a_circle_is_found_even_through_a_lazy_import(tmp_path):
    found = read_imports(
        _package(
            tmp_path,
            {
                "a.py": "from pkg.b import g\n",
                "b.py": "def g():\n    from . import c\n",
                "c.py": "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .a import x\n",
                "d.py": "import pkg.a\n",
            },
        )
    )
    assert circles(found.edges) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.a -> pkg.b (line 1)" in describe(circles(found.edges)[0], found.edges)


def test_no_circle_in_a_tree(tmp_path):
    found = read_imports(
        _package(tmp_path, {"a.py": "from pkg import b\n", "b.py": "import os\n", "c.py": ""})
    )
    assert circles(found.edges) == [] and found.edges["pkg.a"] == {"pkg.b": 1}


def test_a_private_name_is_found_imported_or_read(tmp_path):
    found = read_imports(
        _package(
            tmp_path,
            {
                "a.py": "_HIDDEN = 1\n__version__ = '1'\ndef _own():\n    return _HIDDEN\n",
                "b.py": "from pkg.a import _HIDDEN, __version__\n",
                "c.py": "from pkg import a\nx = a._own()\n",
                "d.py": "from os import _exit\nfrom pkg.a import __version__\n",
            },
        )
    )
    assert len(found.private) == 2
    assert "pkg.b imports _HIDDEN from pkg.a" in found.private[0]
    assert "pkg.c reads _own of pkg.a" in found.private[1]
