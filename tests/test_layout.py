"""The project's layout: no import cycles between its modules, layers that import only downwards, no module over
400 lines, and an install that ships every subpackage under the one import root `arborl` (components/ →
arborl.components, flows/ → arborl.flows)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"components": "arborl.components", "flows": "arborl.flows"}  # folder → import name
MAX_LINES = 400

# The layers, lowest first: a module imports modules of its own layer and of the layers below, never above. The
# foundations (artifacts, config, tracking) know nothing of the domain; the registry gets its evaluator passed
# in rather than importing the stages; the executors run stages elsewhere; the benchmarks drive flows, and the
# command line drives everything.
LAYERS = (
    ("artifacts", ("arborl.components.artifacts",)),
    ("config", ("arborl.components.config",)),
    ("tracking", ("arborl.components.tracking",)),
    ("domain", tuple(f"arborl.components.{p}" for p in (
        "advantages", "data", "envs", "evaluation", "sampling", "training",
        "verification", "viewer"))),
    ("registry", ("arborl.components.registry",)),
    ("stages", ("arborl.components.stages",)),
    ("orchestration", ("arborl.components.orchestration",)),
    ("flows", ("arborl.flows",)),
    ("bench", ("arborl.components.bench",)),
    ("cli", ("arborl.flows.cli",)),
)
WIRING = {"arborl.components", "arborl.flows"}  # the package roots: `arborl.components` registers config checks


def _module_name(path: Path, root: Path = ROOT) -> str:
    """arborl.… name of a .py file under one of the PACKAGES folders of `root`; `__init__.py` names its
    package."""
    rel = path.relative_to(root)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if path.name != "__init__.py":
        parts.append(path.stem)
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project: {arborl.… name: source file}."""
    return {_module_name(p, root): p for folder in PACKAGES if (root / folder).is_dir()
            for p in sorted((root / folder).rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules an import statement anywhere in the file names (module level, in functions, under
    conditions): `import a.b` → a.b; `from a import b` → a.b when that is a module, else a; relative imports
    resolve against the module's own package. No implicit edge to parent packages."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return (found & modules.keys()) - {name}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph` (iterative), each sorted; only those that are cycles
    (more than one node, or a node with an edge to itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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
                    if len(component) > 1 or node in graph.get(node, ()):
                        out.append(sorted(component))
    return sorted(out)


def cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle through the component's first node, as a path that ends where it starts (breadth-first, so
    the shortest one)."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{component} is not a cycle")


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle, one per strongly connected component, written `a -> b -> a`."""
    return [" -> ".join(cycle_in(c, graph)) for c in strongly_connected(graph)]


def layer_of(module: str, layers=LAYERS) -> int:
    """The index of the layer `module` belongs to: the one with the longest matching package prefix."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")
    return best


def layer_violations(graph: dict[str, set[str]], layers=LAYERS, wiring=frozenset(WIRING)) -> list[str]:
    """Every import of a module from a higher layer, written `a (layer) -> b (layer)`."""
    out = []
    for module in sorted(set(graph) - wiring):
        mine = layer_of(module, layers)
        for imported in sorted(graph[module] - wiring):
            theirs = layer_of(imported, layers)
            if theirs > mine:
                out.append(f"{module} ({layers[mine][0]}) -> {imported} ({layers[theirs][0]})")
    return out


# --- the cycle finder on hand-made graphs ----------------------------------------------------------------


def test_cycle_finder_on_hand_made_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == ["a -> b -> a"]
    assert find_cycles({"a": {"a"}}) == ["a -> a"]
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a", "d"}}
    assert find_cycles(graph) == ["a -> b -> c -> a", "d -> e -> d"]
    assert strongly_connected(graph) == [["a", "b", "c"], ["d", "e"]]
    # one component, two loops through its first node: the shortest is shown
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}) == ["a -> c -> a"]
    # deep chains do not hit the recursion limit
    chain = {f"m{i:05d}": {f"m{i + 1:05d}"} for i in range(5000)}
    chain["m05000"] = {"m00000"}
    assert len(strongly_connected(chain)) == 1


def test_import_graph_sees_deferred_relative_and_submodule_imports(tmp_path):
    """Imports inside functions count; `from package import module` is an edge to the module, not the package;
    relative imports resolve against the package; a module gets no edge to its parent package by itself."""
    pkg = tmp_path / "components" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "components" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from arborl.components.pkg import b\n    return b\n")
    (pkg / "b.py").write_text("from . import a\nfrom arborl.components.pkg.a import f\nimport os\n")
    (pkg / "c.py").write_text("import arborl.components.pkg.b as b\n")
    modules = project_modules(tmp_path)
    graph = import_graph(modules)
    assert graph == {
        "arborl.components": set(),
        "arborl.components.pkg": {"arborl.components.pkg.a"},
        "arborl.components.pkg.a": {"arborl.components.pkg.b"},
        "arborl.components.pkg.b": {"arborl.components.pkg.a"},
        "arborl.components.pkg.c": {"arborl.components.pkg.b"},
    }
    assert find_cycles(graph) == ["arborl.components.pkg.a -> arborl.components.pkg.b -> arborl.components.pkg.a"]


# --- the project -----------------------------------------------------------------------------------------


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it back — a deferred import in a
    function counts too, since it only postpones the cycle."""
    cycles = find_cycles(import_graph(project_modules()))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layer_check_on_a_hand_made_graph():
    layers = (("low", ("x.low",)), ("mid", ("x.mid",)), ("top", ("x.mid.top",)))
    graph = {"x.low.a": set(), "x.mid.b": {"x.low.a"}, "x.mid.top.c": {"x.mid.b"}, "x.low.d": {"x.mid.top.c"}}
    assert layer_violations(graph, layers, frozenset()) == ["x.low.d (low) -> x.mid.top.c (top)"]
    with pytest.raises(AssertionError, match="x.other belongs to no layer"):
        layer_violations({"x.other": set()}, layers, frozenset())


def test_layers_import_only_downwards():
    """The foundations (artifacts, config, tracking) import nothing of the domain, the registry no stage, and no
    component imports a flow except the benchmarks that drive one."""
    violations = layer_violations(import_graph(project_modules()))
    assert not violations, "imports from a higher layer:\n" + "\n".join(violations)


def test_no_module_is_over_400_lines():
    lines = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # in the standard library from Python 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_installed_packages_are_the_folders_with_an_init():
    """pyproject's explicit `packages` list names every folder under components/ and flows/ with an
    `__init__.py`, so no subpackage is left out of the install."""
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = {
        ".".join([PACKAGES[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
        for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(folders)
    assert setuptools["package-dir"] == {name: folder for folder, name in PACKAGES.items()}
    assert _pyproject()["project"]["scripts"]["arborl"] == "arborl.flows.cli:main"


def test_package_is_imported_from_this_checkout():
    import arborl.components
    import arborl.flows

    assert Path(arborl.components.__file__).resolve().parent == ROOT / "components"
    assert Path(arborl.flows.__file__).resolve().parent == ROOT / "flows"


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_imports_of_the_old_top_level_packages(folder):
    """Code imports itself as arborl.components / arborl.flows, never as the bare folder names."""
    old = set(PACKAGES)
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in old]
    assert not bad, "imports of the old top-level packages:\n" + "\n".join(bad)
