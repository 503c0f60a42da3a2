"""The package's structure, held by tests: imports run one way (no module imports, at run
time, a module that imports it back), each module imports on its own, and no module reaches
into another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmtally
from llmtally._recorder import Recorder

SRC = Path(llmtally.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports when it runs (at import or in a function), not
    those imported only for type checking."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:  # from . import _scope
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    # importing a.b.c runs a/__init__ and a/b/__init__ first: not an edge of a cycle
    return {target for target in found if not name.startswith(target + ".")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := walk(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _modules()
    graph = {name: _runtime_imports(name, path, modules) for name, path in modules.items()}
    # the graph is read, lazy imports included (the integrations are imported when asked for)
    assert graph["llmtally._tally"] >= {"llmtally._events.event", "llmtally._adapters"}
    assert graph["llmtally._adapters"] >= {"llmtally.integrations.litellm",
                                           "llmtally.integrations.langchain"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_each_module_imports_on_its_own():
    """Each module first, in a fresh interpreter: an import-order dependency (a circle that
    only works from one side) fails here."""
    from concurrent.futures import ThreadPoolExecutor

    def import_alone(name: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                              text=True, timeout=240)
        return name, done.returncode, done.stderr[-2000:]

    with ThreadPoolExecutor(4) as pool:
        failed = [result for result in pool.map(import_alone, sorted(_modules())) if result[1]]
    assert failed == []


def test_no_module_reads_another_modules_private_names():
    """``x._name`` only for names the module itself defines (its own classes' state) or a
    NamedTuple's public ``_replace``-style methods, and no ``from .m import _name``."""
    found = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                defined.add(node.value)  # __slots__
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("llmtally")):
                found += [f"{name}: from {node.module} import {alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")
                          and not _is_module(alias.name, path)]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in defined
                    and node.attr not in ("_replace", "_asdict", "_fields", "_make")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and not (isinstance(node.value, ast.Name) and node.value.id == "sys")):
                found.append(f"{name}:{node.lineno}: .{node.attr}")
    assert found == []


def _is_module(alias: str, path: Path) -> bool:
    """``from . import _scope``: a private module of the package, not a private name."""
    return any((folder / f"{alias}.py").exists() or (folder / alias).is_dir()
               for folder in (path.parent, path.parent.parent))


def test_a_tally_is_what_the_integrations_ask_for(make_tally):
    """The integrations are written against Recorder; a Tally must have every member."""
    tally = make_tally()
    members = {name for name in vars(Recorder) if not name.startswith("_")}
    members |= set(Recorder.__annotations__)
    assert members >= {"record_event", "record_later", "reserve", "release", "now", "budgets",
                       "litellm_attached"}
    assert [name for name in sorted(members) if not hasattr(tally, name)] == []
