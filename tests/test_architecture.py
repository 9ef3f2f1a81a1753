"""The layout's dependency rules, read from the imports themselves (``ast``, not grep).

The flow runs one way: server -> discovery <- client -> wire; events -> alerts. Each rule is
checked twice: on the real package, and on a small synthetic package that breaks it, so that
the check itself is shown able to fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import geventpool

PACKAGE = Path(geventpool.__file__).parent


def module_name(path: Path, root: Path) -> str:
    """``geventpool/client/pool.py`` -> ``geventpool.client.pool`` (``__init__`` -> package)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules(root: Path) -> dict[str, tuple[str, bool]]:
    """Every module below ``root``: its source and whether it is a package's ``__init__``."""
    return {
        module_name(path, root): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for path in sorted(root.rglob("*.py"))
    }


def imports_of(
    name: str, source: str, is_package: bool, known: Iterable[str], top: str
) -> set[str]:
    """The modules of package ``top`` that module ``name`` imports, anywhere in its code
    (a lazy import inside a function is still a dependency). ``from a import b`` depends on
    ``a.b`` when that is a module, else on ``a``; relative imports are resolved."""
    modules = set(known)
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
    return {m for m in found if m == top or m.startswith(top + ".")}


def dependency_graph(modules: Mapping[str, tuple[str, bool]], top: str) -> dict[str, set[str]]:
    """Module -> the modules of ``top`` it imports (itself excluded)."""
    return {
        name: imports_of(name, source, is_package, modules, top) - {name}
        for name, (source, is_package) in modules.items()
    }


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: Mapping[str, set[str]], top: str) -> list[str]:
    """Every broken rule, one line each (empty when the layout holds)."""
    found = []
    client, server, discovery = f"{top}.client", f"{top}.server", f"{top}.discovery"
    wire, alerts, errors = f"{top}.wire", f"{top}.alerts", f"{top}.errors"
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if inside(module, client) and inside(target, server):
                found.append(f"{module} imports {target}: the client never imports the server")
            if inside(module, discovery) and (inside(target, client) or inside(target, server)):
                found.append(
                    f"{module} imports {target}: discovery imports neither client nor server"
                )
            if inside(module, wire) and not (inside(target, wire) or target == errors):
                found.append(f"{module} imports {target}: wire imports nothing but errors")
            if (
                inside(target, alerts)
                and not inside(module, alerts)
                and module not in (top, f"{top}.config")
            ):
                found.append(
                    f"{module} imports {target}: only config and the public API import alerts"
                )
            integration = module == f"{top}.locust_user" or inside(module, f"{top}.testing")
            if module != top and target == top and not integration:
                found.append(f"{module} imports the public API {top}: a cycle through it")
    found.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph))
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [[*group, group[0]] for group in groups]


def test_the_package_keeps_every_dependency_rule() -> None:
    graph = dependency_graph(read_modules(PACKAGE), "geventpool")
    assert graph.get("geventpool.client.service")
    assert violations(graph, "geventpool") == []


def test_the_client_side_loads_without_the_server() -> None:
    graph = dependency_graph(read_modules(PACKAGE), "geventpool")
    reached, todo = set(), ["geventpool.client.service"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert not any(inside(m, "geventpool.server") for m in reached)
    assert "geventpool.wire.codecs" in reached


BROKEN = {
    "client": "from pkg.server.serve import Server\n",
    "discovery": "import pkg.client.pool\n",
    "wire": "from pkg import events\n",
    "alerts": "from pkg.alerts.channel import Channel\n",
    "cycle": "from . import other\n",
}
EXPECTED = {
    "client": "the client never imports the server",
    "discovery": "discovery imports neither client nor server",
    "wire": "wire imports nothing but errors",
    "alerts": "only config and the public API import alerts",
    "cycle": "import cycle: pkg.discovery.membership -> pkg.discovery.other",
}


def synthetic_package(tmp_path: Path, broken: str) -> Path:
    """A tiny package laid out like geventpool, with one forbidden import added."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "from pkg.client.pool import Pool\nfrom pkg.alerts.channel import Channel\n",
        "errors.py": "",
        "events.py": "",
        "config.py": "from pkg.alerts.channel import Channel\n",
        "alerts/__init__.py": "",
        "alerts/channel.py": "from pkg import events\n",
        "wire/__init__.py": "",
        "wire/codecs.py": "from pkg.errors import Error\n",
        "discovery/__init__.py": "",
        "discovery/membership.py": "from pkg.wire.codecs import codecs\n",
        "discovery/other.py": "from .membership import Membership\n",
        "client/__init__.py": "",
        "client/pool.py": "from ..discovery.membership import Membership\n",
        "server/__init__.py": "",
        "server/serve.py": "from pkg.discovery import membership\n",
    }
    target = {
        "client": "client/pool.py",
        "discovery": "discovery/membership.py",
        "wire": "wire/codecs.py",
        "alerts": "client/pool.py",
        "cycle": "discovery/membership.py",
    }[broken]
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + (BROKEN[broken] if name == target else ""))
    return root


def test_the_synthetic_package_is_clean_before_a_rule_is_broken(tmp_path: Path) -> None:
    root = synthetic_package(tmp_path, "client")
    (root / "client/pool.py").write_text("from ..discovery.membership import Membership\n")
    assert violations(dependency_graph(read_modules(root), "pkg"), "pkg") == []


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_each_forbidden_import_is_reported(tmp_path: Path, broken: str) -> None:
    root = synthetic_package(tmp_path, broken)
    found = violations(dependency_graph(read_modules(root), "pkg"), "pkg")
    assert any(EXPECTED[broken] in line for line in found), found


def test_the_docs_name_every_module_of_the_library() -> None:
    """docs/architecture.md has a line for every module, and the README's layout lists every
    module outside ``testing/``: a module added without a word in either fails here."""
    root = PACKAGE.parent
    architecture = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :].split("```")[1]
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"]
    assert len(modules) > 30
    for path in modules:
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "testing":
            assert "testing/" in layout and f"`{path.name}`" in architecture, relative
            continue
        assert f"`{path.name}`" in architecture, f"docs/architecture.md does not name {relative}"
        assert path.name in layout, f"the README layout does not list {relative}"
    for listed in ("discovery/", "wire/", "client/", "server/", "alerts/"):
        assert listed in layout and (PACKAGE / listed).is_dir()
