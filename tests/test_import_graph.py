"""The layering of DESIGN.md, checked on the source: `configs`/`parallel` <- `models` <- `serving` <- `jtinker` <-
`rl`. Every import counts, function-local ones included (they hide cycles, they do not remove them): the
package graph has no upward edge and the module graph no cycle."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"configs": 0, "parallel": 0, "models": 1, "serving": 2, "jtinker": 3, "rl": 4}


def module_graph(root: pathlib.Path, packages) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body. `from pkg import name` depends on
    `pkg.name` when that is a module, else on `pkg` itself."""
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {t for t in map(owner, targets) if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
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
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]])


def test_the_checker_sees_cycles_through_function_local_imports_and_upward_imports(tmp_path):
    for path, text in {"models/__init__.py": "", "models/a.py": "from models.b import f\n",
                       "models/b.py": "def f():\n    from models import a\n",
                       "models/c.py": "def g():\n    import jtinker.x\n",
                       "jtinker/__init__.py": "", "jtinker/x.py": "from models import c\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    graph = module_graph(tmp_path, ["models", "jtinker"])
    assert sorted(cycles(graph)) == [["jtinker.x", "models.c"], ["models.a", "models.b"]]
    assert upward_imports(graph) == ["models.c -> jtinker.x"]


def test_the_project_has_no_import_cycle_and_no_upward_import():
    graph = module_graph(ROOT, LAYERS)
    assert len(graph) > 80  # the whole tree was read
    assert cycles(graph) == []
    assert upward_imports(graph) == []
