"""The layers, read from the source: buffer <- collector <- launch, and no import loops.

An AST walk over ``buffer/``, ``collector/`` and ``launch/`` (the directories of
``rlfleet.buffer``, ``rlfleet.collector`` and ``rlfleet.launch``) collects every import,
those inside functions too, and checks:

1. ``rlfleet.buffer`` imports no other rlfleet package;
2. ``rlfleet.collector`` imports the buffer only as ``from rlfleet.buffer import X`` with
   ``X`` in ``rlfleet.buffer.__all__``, and never ``rlfleet.launch``;
3. nothing outside ``rlfleet.launch`` imports it;
4. no module imports another package's private (``_x``) name or ``_x`` module (rlfleet's
   own packages; a sub-package such as ``rlfleet.launch.learners`` counts as a package);
5. no import cycle among rlfleet modules, imports inside functions included (those under
   ``if TYPE_CHECKING:`` never run and are left out of this rule only).

:func:`check_layers` takes the directory that holds the three package directories, so
the tests below run it on the repository and on small broken trees that must fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"buffer": "rlfleet.buffer", "collector": "rlfleet.collector", "launch": "rlfleet.launch"}


@dataclass(frozen=True)
class Import:
    """One import statement's view of one imported module (and the names taken from it)."""

    source: str  # importing module, e.g. rlfleet.buffer.client
    file: str  # its path relative to the root
    line: int
    text: str  # the statement as written
    module: str  # the imported module as written (absolute), e.g. rlfleet.buffer
    names: tuple[str, ...]  # for ``from m import a, b``: ("a", "b"); () for ``import m``
    type_only: bool  # under ``if TYPE_CHECKING:``


def _module_names(root: Path) -> dict[str, Path]:
    modules = {}
    for directory, package in PACKAGES.items():
        base = root / directory
        for path in sorted(base.rglob("*.py")) if base.is_dir() else []:
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, type_only
                yield from _walk(stmt, type_only)
            continue
        yield child, type_only
        yield from _walk(child, type_only)


def _imports(module: str, path: Path, root: Path) -> list[Import]:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    is_package = path.name == "__init__.py"
    file = str(path.relative_to(root))
    out = []
    for node, type_only in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(module, file, node.lineno, ast.get_source_segment(text, node) or "",
                                  alias.name, (), type_only))
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, target] if target else base)
            out.append(Import(module, file, node.lineno, ast.get_source_segment(text, node) or "",
                              target, tuple(a.name for a in node.names), type_only))
    return out


def _declared_all(path: Path) -> set[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {elt.value for elt in node.value.elts if isinstance(elt, ast.Constant)}
    return set()


def _package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to: itself for a package ``__init__``, else its parent."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def _top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def check_layers(root: Path) -> list[str]:
    """Every broken rule under ``root`` as ``file:line: `import`: what is wrong``, sorted."""
    modules = _module_names(root)
    imports = [imp for module, path in modules.items() for imp in _imports(module, path, root)]
    buffer_init = root / "buffer" / "__init__.py"
    buffer_public = _declared_all(buffer_init) if buffer_init.is_file() else set()
    problems: list[str] = []

    def report(imp: Import, what: str) -> None:
        problems.append(f"{imp.file}:{imp.line}: `{imp.text}`: {what}")

    # edges of the import graph: (source, target) -> first import making it
    edges: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if not imp.module.startswith("rlfleet."):
            continue
        source_top, target_top = _top(imp.source), _top(imp.module)
        if source_top == "rlfleet.buffer" and target_top != "rlfleet.buffer":
            report(imp, "rlfleet.buffer imports no other rlfleet package")
        if source_top == "rlfleet.collector" and target_top == "rlfleet.buffer":
            if imp.module != "rlfleet.buffer" or not imp.names:
                report(imp, "rlfleet.collector imports the buffer only as `from rlfleet.buffer import X`")
            else:
                hidden = [n for n in imp.names if n not in buffer_public]
                if hidden:
                    report(imp, f"{', '.join(hidden)} not in rlfleet.buffer.__all__")
        if target_top == "rlfleet.launch" and source_top != "rlfleet.launch":
            report(imp, "nothing outside rlfleet.launch imports it")
        # the modules this import loads: the module, and submodules named in a from-import
        # (``from pkg import submodule`` loads the submodule; its package is loaded by
        # any import of a submodule and is not counted as an edge)
        taken_modules = {n for n in imp.names if f"{imp.module}.{n}" in modules}
        plain_names = not imp.names or len(taken_modules) < len(imp.names)
        targets = [imp.module] if imp.module in modules and plain_names else []
        targets += [f"{imp.module}.{n}" for n in sorted(taken_modules)]
        if not targets and not taken_modules:  # a module that is not in the tree: its longest known prefix
            parts = imp.module.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            targets = [".".join(parts)] if parts else []
        source_package = _package_of(imp.source, modules)
        for target in targets:
            if _package_of(target, modules) != source_package and _private(target.removeprefix("rlfleet.")):
                report(imp, f"imports the private module {target} of another package")
        if imp.module in modules and _package_of(imp.module, modules) != source_package:
            private_names = [n for n in imp.names if n.startswith("_") and n not in taken_modules]
            if private_names:
                report(imp, f"imports private name(s) {', '.join(private_names)} of {imp.module}")
        if not imp.type_only:
            for target in targets:
                edges.setdefault((imp.source, target), imp)
    problems += _cycles(edges)
    return sorted(set(problems))


def _cycles(edges: dict[tuple[str, str], Import]) -> list[str]:
    """One message per import cycle (strongly connected component), naming each step."""
    graph: dict[str, list[str]] = {}
    for source, target in edges:
        graph.setdefault(source, []).append(target)
        graph.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):  # Tarjan, iterative
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
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
                if len(component) > 1 or (node, node) in edges:
                    components.append(sorted(component))
    messages = []
    for component in components:
        cycle = _one_cycle(component, graph)
        steps = "; ".join(
            f"{edges[(a, b)].file}:{edges[(a, b)].line} `{edges[(a, b)].text}`" for a, b in zip(cycle, cycle[1:])
        )
        first = edges[(cycle[0], cycle[1])]
        messages.append(f"{first.file}:{first.line}: `{first.text}`: import cycle "
                        f"{' -> '.join(cycle)} ({steps})")
    return messages


def _one_cycle(component: list[str], graph: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first module, as [a, b, ..., a]."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return [start, start]  # unreachable for a strongly connected component


# --------------------------------------------------------------------------- tests


def test_the_repository_keeps_its_layers():
    problems = check_layers(ROOT)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


CLEAN = {
    "buffer/__init__.py": "from rlfleet.buffer.core import Store\n__all__ = ['Store']\n",
    "buffer/core.py": "import numpy\nfrom rlfleet.buffer import _helpers\nclass Store: ...\n",
    "buffer/_helpers.py": "X = 1\n",
    "collector/__init__.py": "from rlfleet.collector.fleet import Fleet\n__all__ = ['Fleet']\n",
    "collector/fleet.py": "from rlfleet.buffer import Store\nclass Fleet: ...\n",
    "collector/envs.py": "X = 1\n",
    "launch/__init__.py": "",
    "launch/run.py": "from rlfleet.buffer.core import Store\nfrom rlfleet.collector.fleet import Fleet\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlfleet.launch.cli import main\n",
    "launch/cli.py": "def main():\n    from rlfleet.launch.run import Store\n",
    "launch/plots.py": "Y = 1\n",
}


def test_a_clean_tree_passes(tmp_path):
    _write(tmp_path, CLEAN)
    assert check_layers(tmp_path) == []


BROKEN = [
    ("buffer_imports_collector", {"buffer/core.py": "from rlfleet.collector.envs import X\nclass Store: ...\n"},
     ["buffer/core.py:1: `from rlfleet.collector.envs import X`: rlfleet.buffer imports no other rlfleet package"]),
    ("buffer_imports_launch_in_a_function",
     {"buffer/core.py": "class Store:\n    def f(self):\n        import rlfleet.launch.plots\n"},
     ["buffer/core.py:3: `import rlfleet.launch.plots`: nothing outside rlfleet.launch imports it",
      "buffer/core.py:3: `import rlfleet.launch.plots`: rlfleet.buffer imports no other rlfleet package"]),
    ("collector_reaches_into_a_buffer_module", {"collector/fleet.py": "from rlfleet.buffer.core import Store\n"},
     "collector/fleet.py:1: `from rlfleet.buffer.core import Store`: rlfleet.collector imports the buffer "
     "only as `from rlfleet.buffer import X`"),
    ("collector_takes_a_name_not_in_all", {"collector/fleet.py": "from rlfleet.buffer import Store, Other\n"},
     "collector/fleet.py:1: `from rlfleet.buffer import Store, Other`: Other not in rlfleet.buffer.__all__"),
    ("collector_imports_launch", {"collector/fleet.py": "from rlfleet.buffer import Store\n"
                                                       "def f():\n    from rlfleet.launch.plots import Y\n"},
     ["collector/fleet.py:3: `from rlfleet.launch.plots import Y`: nothing outside rlfleet.launch imports it"]),
    ("private_module_of_another_package", {"launch/run.py": "from rlfleet.buffer._helpers import X\n"},
     "launch/run.py:1: `from rlfleet.buffer._helpers import X`: imports the private module "
     "rlfleet.buffer._helpers of another package"),
    ("private_name_of_another_package", {"launch/run.py": "from rlfleet.collector.fleet import _secret\n"},
     "launch/run.py:1: `from rlfleet.collector.fleet import _secret`: imports private name(s) _secret of "
     "rlfleet.collector.fleet"),
    ("private_name_of_a_sub_package", {"launch/learners/__init__.py": "",
                                       "launch/learners/group.py": "from rlfleet.launch.cli import _hidden\n"},
     "launch/learners/group.py:1: `from rlfleet.launch.cli import _hidden`: imports private name(s) _hidden "
     "of rlfleet.launch.cli"),
    ("cycle_closed_inside_a_function", {"launch/cli.py": "def main():\n    from rlfleet.launch.run import Store\n",
                                        "launch/run.py": "import rlfleet.launch.cli\n"},
     "launch/cli.py:2: `from rlfleet.launch.run import Store`: import cycle rlfleet.launch.cli -> "
     "rlfleet.launch.run -> rlfleet.launch.cli (launch/cli.py:2 `from rlfleet.launch.run import Store`; "
     "launch/run.py:1 `import rlfleet.launch.cli`)"),
    ("cycle_through_a_package_init", {"buffer/core.py": "from rlfleet.buffer import Store\nclass Store: ...\n"},
     "buffer/__init__.py:1: `from rlfleet.buffer.core import Store`: import cycle rlfleet.buffer -> "
     "rlfleet.buffer.core -> rlfleet.buffer (buffer/__init__.py:1 `from rlfleet.buffer.core import Store`; "
     "buffer/core.py:1 `from rlfleet.buffer import Store`)"),
]


def test_each_broken_rule_is_reported_with_file_line_and_import(tmp_path):
    import pytest

    failures = []
    for name, change, expected in BROKEN:
        root = tmp_path / name
        _write(root, {**CLEAN, **change})
        problems = check_layers(root)
        expected = [expected] if isinstance(expected, str) else expected
        if problems != expected:
            failures.append(f"{name}: expected {expected!r}, got {problems!r}")
    if failures:
        pytest.fail("\n".join(failures))
