"""The package's imports run one way and never in a circle, function-local imports included:
cli -> pipeline / sweep -> loop / stacked -> state -> models / compress / data -> kernels."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxaccel")


def _modules() -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else ""


def _imports(module: str) -> set[str]:
    """Every jaxaccel module `module` imports, anywhere in it (function bodies too)."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        for name in names:
            target = _resolve(name) if name.startswith("jaxaccel") else ""
            if target and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles() == []


def _reaches(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# (modules, what they must never reach, directly or through others)
LAYERS = [
    ("jaxaccel.kernels", ["jaxaccel.models", "jaxaccel.compress", "jaxaccel.data",
                          "jaxaccel.state", "jaxaccel.config"]),
    ("jaxaccel.models", ["jaxaccel.compress", "jaxaccel.data", "jaxaccel.state",
                         "jaxaccel.config"]),
    ("jaxaccel.compress", ["jaxaccel.state", "jaxaccel.loop", "jaxaccel.pipeline",
                           "jaxaccel.loading", "jaxaccel.config", "jaxaccel.stages"]),
    ("jaxaccel.data", ["jaxaccel.models", "jaxaccel.compress", "jaxaccel.state"]),
    ("jaxaccel.io", ["jaxaccel."]),
    ("jaxaccel.trees", ["jaxaccel."]),
    ("jaxaccel.workdir", ["jaxaccel."]),
    ("jaxaccel.preemption", ["jaxaccel."]),
    ("jaxaccel.compilation_cache", ["jaxaccel."]),
    ("jaxaccel.parallel", ["jaxaccel.models", "jaxaccel.compress", "jaxaccel.data",
                           "jaxaccel.state", "jaxaccel.config"]),
    ("jaxaccel.stages", ["jaxaccel.config", "jaxaccel.state", "jaxaccel.loop"]),
    ("jaxaccel.config", ["jaxaccel.state", "jaxaccel.checkpoint", "jaxaccel.loop",
                         "jaxaccel.pipeline", "jaxaccel.sweep", "jaxaccel.cli"]),
    ("jaxaccel.loading", ["jaxaccel.loop", "jaxaccel.pipeline", "jaxaccel.sweep",
                          "jaxaccel.cli"]),
    ("jaxaccel.artifacts", ["jaxaccel.loop", "jaxaccel.pipeline", "jaxaccel.sweep",
                            "jaxaccel.cli"]),
    ("jaxaccel.checkpoint", ["jaxaccel.config", "jaxaccel.state", "jaxaccel.loop"]),
    ("jaxaccel.state", ["jaxaccel.loop", "jaxaccel.pipeline", "jaxaccel.loading",
                        "jaxaccel.checkpoint", "jaxaccel.sweep", "jaxaccel.cli"]),
    ("jaxaccel.loop", ["jaxaccel.pipeline", "jaxaccel.sweep", "jaxaccel.cli",
                       "jaxaccel.stacked"]),
    ("jaxaccel.stacked", ["jaxaccel.pipeline", "jaxaccel.sweep", "jaxaccel.cli"]),
    ("jaxaccel.pipeline", ["jaxaccel.sweep", "jaxaccel.cli", "jaxaccel.bench"]),
    ("jaxaccel.sweep", ["jaxaccel.cli", "jaxaccel.bench"]),
    ("jaxaccel.bench", ["jaxaccel.cli"]),
]


@pytest.mark.parametrize("owner,forbidden", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_imports_run_one_way(owner, forbidden):
    modules = [m for m in MODULES if m == owner or m.startswith(owner + ".")]
    assert modules, owner
    for module in modules:
        bad = sorted(r for r in _reaches(module) if any(
            r == f or r.startswith(f if f.endswith(".") else f + ".") for f in forbidden)
            and not (r == owner or r.startswith(owner + ".")))
        assert bad == [], f"{module} reaches {bad}"


def test_subcommands_do_not_import_each_other():
    commands = [m for m in MODULES if m.startswith("jaxaccel.cli.")]
    for module in commands:
        assert not (GRAPH[module] & set(commands)), module


def test_only_the_cli_parses_arguments():
    parsers = [m for m, path in MODULES.items() if "argparse" in open(path).read()
               and not m.startswith("jaxaccel.cli")]
    assert parsers == []
