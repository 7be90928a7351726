"""The package's layering: subpackages import only the layers below them (lazy imports inside
functions count too), nothing imports in a circle, and the index layer runs without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import ehi

ROOT = Path(ehi.__file__).parent

# lowest first: a module may import its own layer and those below it, never one above
LAYERS = [
    {"__init__", "config", "limits", "progress", "artifacts", "budget", "data", "results", "ray_session"},
    {"encode", "index"},
    {"model"},
    {"evaluation"},
    {"training"},
    {"benchmark", "server", "cli", "tuning", "unsupervised", "train"},  # the last three: old import paths, thin re-exports
]
OLD_PATHS = {"tuning", "unsupervised", "train"}


def part(module: str) -> str:
    """The layer unit of a dotted module name under ehi: its subpackage or flat module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part(module) in names)


def module_name(f: Path) -> str:
    rel = f.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(f: Path) -> set[str]:
    """The ehi modules a file imports, resolved to module names (a name imported from a
    package that is a submodule counts as that submodule)."""
    out = set()
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ehi"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{f}: relative import (the package imports by absolute name)"
            if node.module and node.module.split(".")[0] == "ehi":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() else node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for f in ROOT.rglob("*.py"):
        name = module_name(f)
        graph[name] = imported(f) - {name}
    return graph


def test_three_subpackages_at_least():
    subpackages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {"index", "training", "encode"} <= subpackages
    assert all(p.parent.name in set().union(*LAYERS) for p in ROOT.glob("*/__init__.py"))
    assert {f.stem for f in ROOT.glob("*.py")} <= LAYERS[0] | {"server"} | OLD_PATHS, "a flat module outside the foundation"
    for name in OLD_PATHS:  # thin: an old path re-exports, it holds no code of its own
        assert len((ROOT / f"{name}.py").read_text().splitlines()) <= 10, name


def test_each_layer_imports_only_those_below():
    wrong = []
    for name, deps in import_graph().items():
        for dep in deps:
            if dep.split(".")[0] == "ehi" and layer(dep) > layer(name):
                wrong.append(f"{name} -> {dep}")
    assert wrong == []


def test_encode_and_index_do_not_import_each_other():
    graph = import_graph()
    for name, deps in graph.items():
        if part(name) in ("encode", "index"):
            other = "index" if part(name) == "encode" else "encode"
            assert not [d for d in deps if part(d) == other], name


def test_the_index_layer_never_imports_torch():
    for f in (ROOT / "index").glob("*.py"):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in names if m.split(".")[0] in ("torch", "transformers", "sentence_transformers")}, f
    code = (
        "import sys, ehi.index.leaf_index, ehi.index.store, ehi.index.shards, ehi.index.ray_shards\n"
        "assert 'torch' not in sys.modules and 'ehi.training' not in sys.modules, 'the index layer loaded torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert {"ehi.evaluation.evaluate", "ehi.training.trainer", "ehi.training.unsupervised", "ehi.config"} <= set(graph)
    assert cycles(graph) == []


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_does_not_import_ray():
    """Ray is an extra: training, search and serving one process never load it."""
    code = (
        "import sys, ehi.cli.entry, ehi.model.ehi_model, ehi.server, ehi.index.store, ehi.training.trainer, ehi.evaluation.evaluate\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
