"""The layout's dependency rules, read from the imports themselves (``ast``, not grep).

The flow runs one way: server -> discovery <- client -> wire; events -> alerts. Each rule is
checked twice: on the real package, and on a small synthetic package that breaks it, so that
the check itself is shown able to fail.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
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
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            found.add(node.args[0].value)  # type: ignore[attr-defined]
    return {m for m in found if m == top or m.startswith(top + ".")}


def _dynamic_import(call: ast.Call) -> bool:
    """``importlib.import_module("x")``, ``import_module("x")`` or ``__import__("x")`` with a
    constant name (a computed name cannot be checked, and the rules forbid none here)."""
    function = call.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    return (
        name in ("import_module", "__import__")
        and bool(call.args)
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    )


def dependency_graph(modules: Mapping[str, tuple[str, bool]], top: str) -> dict[str, set[str]]:
    """Module -> the modules of ``top`` it imports (itself excluded)."""
    return {
        name: imports_of(name, source, is_package, modules, top) - {name}
        for name, (source, is_package) in modules.items()
    }


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def reachable(graph: Mapping[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` loads, directly or through others, with one import chain to it."""
    chains: dict[str, list[str]] = {start: [start]}
    todo = [start]
    while todo:
        module = todo.pop()
        for target in sorted(graph.get(module, ())):
            if target not in chains:
                chains[target] = [*chains[module], target]
                todo.append(target)
    del chains[start]
    return chains


def violations(graph: Mapping[str, set[str]], top: str) -> list[str]:
    """Every broken rule, one line each (empty when the layout holds). The rules hold for
    what a module loads through others too: the line shows the chain."""
    found = []
    client, server, discovery = f"{top}.client", f"{top}.server", f"{top}.discovery"
    wire, alerts, errors = f"{top}.wire", f"{top}.alerts", f"{top}.errors"
    for module in sorted(graph):
        integration = (  # built on the public API, like an application: the command line too
            module in (f"{top}.locust_user", f"{top}.__main__")
            or inside(module, f"{top}.testing")
            or inside(module, f"{top}.cli")
        )
        if module != top and top in graph[module] and not integration:
            found.append(f"{module} imports the public API {top}: a cycle through it")
        for target, chain in sorted(reachable(graph, module).items()):
            via = " -> ".join(chain)
            if inside(module, client) and inside(target, server):
                found.append(f"{via}: the client never imports the server")
            if inside(module, discovery) and (inside(target, client) or inside(target, server)):
                found.append(f"{via}: discovery imports neither client nor server")
            if inside(module, wire) and not (inside(target, wire) or target == errors):
                found.append(f"{via}: wire imports nothing but errors")
            if inside(target, f"{top}.observe") and not (
                inside(module, f"{top}.observe") or module == top or integration
            ):
                found.append(f"{via}: nothing on the call path imports observe")
            if (
                inside(target, alerts)
                and not inside(module, alerts)
                and module not in (top, f"{top}.config")
                and not integration
            ):
                found.append(f"{via}: only config and the public API import alerts")
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


LOADED = (
    "import sys\n"
    "import {module}\n"
    "print(' '.join(m for m in sys.modules if m.startswith(('geventpool', 'gevent.server'))))\n"
)


def modules_loaded_by(module: str) -> set[str]:
    """What importing ``module`` really loads, in a fresh interpreter (the top-level package's
    ``__init__`` included, which Python runs first)."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(done.stdout.split())


def test_at_run_time_a_client_loads_neither_server_nor_alerts_and_a_server_no_client() -> None:
    client = modules_loaded_by("geventpool.client.service")
    assert "geventpool.client.pool" in client and "geventpool.wire.codecs" in client
    unwanted = ("gevent.server", "geventpool.server", "geventpool.alerts", "geventpool.config")
    assert not {m for m in client if m.startswith(unwanted)}, client
    server = modules_loaded_by("geventpool.server.thrift_server")
    assert "gevent.server" in server
    assert not {m for m in server if m.startswith(("geventpool.client", "geventpool.alerts"))}
    public = modules_loaded_by("geventpool")  # names load from their modules on first use
    assert not {m for m in public if m.startswith(unwanted)}, public


BROKEN = {
    "client": "from pkg.server.serve import Server\n",
    "discovery": "import pkg.client.pool\n",
    "wire": "from pkg import events\n",
    "alerts": "from pkg.alerts.channel import Channel\n",
    "cycle": "from . import other\n",
    "client_dynamic": "import importlib\nimportlib.import_module('pkg.server.serve')\n",
    "alerts_via_config": "from pkg.config import Config\n",
    "discovery_via_top_level": "from pkg.secret import Secret\n",
}
EXTRA_FILES = {  # what a broken rule needs besides the one forbidden import
    "discovery_via_top_level": {
        "secret.py": "from pkg.client.balancer import Balancer\n",
        "client/balancer.py": "",
    },
}
EXPECTED = {
    "client": "the client never imports the server",
    "discovery": "discovery imports neither client nor server",
    "wire": "wire imports nothing but errors",
    "alerts": "only config and the public API import alerts",
    "cycle": "import cycle: pkg.discovery.membership -> pkg.discovery.other",
    "client_dynamic": "pkg.client.pool -> pkg.server.serve: the client never imports the server",
    "alerts_via_config": "pkg.client.pool -> pkg.config -> pkg.alerts.channel: only config",
    "discovery_via_top_level": (
        "pkg.discovery.membership -> pkg.secret -> pkg.client.balancer: discovery imports neither"
    ),
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
        "client_dynamic": "client/pool.py",
        "alerts_via_config": "client/pool.py",
        "discovery_via_top_level": "discovery/membership.py",
    }[broken]
    files.update(EXTRA_FILES.get(broken, {}))
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


@pytest.mark.parametrize(
    ("library", "home"),
    [("prometheus_client", "observe/prometheus.py"), ("opentelemetry", "observe/tracing.py")],
)
def test_only_observe_imports_the_metrics_and_tracing_libraries(library: str, home: str) -> None:
    package = Path(geventpool.__file__).parent
    importing = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(rf"^\s*(from|import) {library}\b", path.read_text(), re.MULTILINE)
    )
    assert home in importing
    assert all(name.startswith("observe/") for name in importing), importing
