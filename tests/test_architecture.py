"""The shape of the package (docs/architecture.md), read from the source with ``ast``:

- no import cycle between the modules of ``deadneuron`` and ``arc_model``, counting the imports made
  inside functions too (a deferred import hides a cycle, it does not break it); imports under
  ``if TYPE_CHECKING:`` never run and are left out;
- the core (measuring and judging: activations, statistics, probe, slots, report values, rules, the patch
  operations and the activations they swap in) imports no presentation or file-format library and opens no file, and nothing it imports
  from the package does either;
- deadneuron never imports the bundled model package (it comes in through an entry point);
- no module over 400 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("deadneuron", "arc_model")
MAX_LINES = 400

# The core layer: modules that take values and return values.
CORE_MODULES = (
    "deadneuron.activations",
    "deadneuron.functional_kinds",
    "deadneuron.registry",
    "deadneuron.moments",
    "deadneuron.stats",
    "deadneuron.kernels",
    "deadneuron.slots",
    "deadneuron.report",
    "deadneuron.select",
    "deadneuron.errors",
    "deadneuron._parse",
    "deadneuron.ops",
    "deadneuron.replacements",
    "deadneuron.gate",
)
CORE_PACKAGES = ("deadneuron.probe", "deadneuron.rules")
# Where the core may reach below itself: the loader of the compiled statistics kernel builds and caches a
# shared library (files, a compiler); the statistics use it where it loads.
CORE_INFRASTRUCTURE = ("deadneuron._native", "deadneuron._cache")

PRESENTATION = ("rich", "matplotlib", "pandas", "typer")
FILE_FORMATS = ("tomllib", "tomli", "json5", "csv", "pickle", "shelve", "tempfile", "shutil", "safetensors")
FILE_CALLS = ("open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a module of the package, or a top-level external name)
    line: int
    deferred: bool  # inside a function


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _import_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules ``node`` imports: ``from a.b import c`` is ``a.b.c`` where that is a module, else ``a.b``."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join([*base, *([node.module] if node.module else [])])
    else:
        prefix = node.module or ""
    for alias in node.names:
        yield f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix


def _owner(name: str) -> str:
    """The package module ``name`` lives in (``deadneuron.rules.Rule`` -> ``deadneuron.rules``), or the
    top-level name of an external module."""
    if name.split(".")[0] not in PACKAGES:
        return name.split(".")[0]
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _walk(node: ast.AST, *, deferred: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, deferred
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.orelse:  # the else branch of `if TYPE_CHECKING:` runs
                yield from _walk(branch, deferred=deferred)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, deferred=True)
        else:
            yield from _walk(child, deferred=deferred)


def _imports() -> list[Import]:
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, deferred in _walk(tree, deferred=False):
            for name in _import_names(module, path.name == "__init__.py", node):
                target = _owner(name)
                if target and target != module:
                    out.append(Import(module, target, node.lineno, deferred))
    return out


IMPORTS = _imports()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.target in MODULES:
            graph[imp.source].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str]) -> str:
    members = set(component)
    edges = sorted({(i.source, i.target, i.line, i.deferred) for i in IMPORTS if i.source in members and i.target in members})
    lines = [f"  {s} -> {t} (line {line}{', in a function' if deferred else ''})" for s, t, line, deferred in edges]
    return "cycle between " + ", ".join(component) + ":\n" + "\n".join(lines)


def _is_core(module: str) -> bool:
    return module in CORE_MODULES or any(module == p or module.startswith(p + ".") for p in CORE_PACKAGES)


CORE = sorted(m for m in MODULES if _is_core(m))


# -- the checks ------------------------------------------------------------------------------------------


def test_the_walk_sees_the_package() -> None:
    """The checks below read something: the package's modules and their imports are found."""
    assert {"deadneuron.audit", "deadneuron.rules.engine", "arc_model.adapter"} <= set(MODULES)
    assert any((i.source, i.target, i.deferred) == ("deadneuron.rules.engine", "deadneuron.report", False) for i in IMPORTS)
    assert any((i.source, i.target, i.deferred) == ("deadneuron.rules.context", "deadneuron.patch.hooks", True) for i in IMPORTS)
    assert any((i.source, i.target) == ("deadneuron.stats", "torch") for i in IMPORTS)  # external: its top name
    assert {"deadneuron.activations", "deadneuron.stats", "deadneuron.rules.model", "deadneuron.probe.recorder"} <= set(CORE)
    assert set(CORE_MODULES) <= set(MODULES)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(_describe(c) for c in cycles)


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_presentation_or_file_format_library(module: str) -> None:
    bad = [f"line {i.line}: {i.target}" for i in IMPORTS if i.source == module and i.target in (*PRESENTATION, *FILE_FORMATS)]
    assert not bad, f"{module} (core) imports {', '.join(bad)}"


@pytest.mark.parametrize("module", CORE)
def test_the_core_opens_no_file(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        is_torch_io = isinstance(func, ast.Attribute) and ast.unparse(func) in ("torch.save", "torch.load")
        if name in FILE_CALLS or is_torch_io:
            calls.append(f"line {node.lineno}: {ast.unparse(func)}(...)")
    assert not calls, f"{module} (core) does file I/O: {', '.join(calls)}"


def test_nothing_the_core_imports_reaches_presentation_or_file_formats() -> None:
    """The core's imports within the package, followed to the end, stay clear of the presentation and
    file-format libraries (except through the kernel loader, which builds a shared library)."""
    graph = _graph()
    reached: dict[str, str] = {m: m for m in CORE}  # module -> the core module it was reached from
    todo = list(CORE)
    while todo:
        module = todo.pop()
        for target in graph[module]:
            if target not in reached and target not in CORE_INFRASTRUCTURE:
                reached[target] = reached[module]
                todo.append(target)
    bad = sorted({f"{i.source} (reached from {reached[i.source]}) imports {i.target}, line {i.line}"
                  for i in IMPORTS if i.source in reached and i.target in (*PRESENTATION, *FILE_FORMATS)})  # fmt: skip
    assert not bad, "\n".join(bad)


def test_deadneuron_never_imports_the_bundled_model() -> None:
    """arc_model plugs in through the adapters entry point; deadneuron does not name it."""
    bad = sorted(f"{i.source}, line {i.line}" for i in IMPORTS
                 if i.source.startswith("deadneuron") and i.target.startswith("arc_model"))  # fmt: skip
    assert not bad, f"deadneuron imports arc_model: {', '.join(bad)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_400_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"
