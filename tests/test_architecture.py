"""The shape of the house: no import cycles (lazy imports included) and one training loop."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "benchmark", "encoders", "pretrain", "transfer", "weights")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (function bodies too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            mod = resolve(t)
            if mod and mod != name and not name.startswith(mod + "."):
                found.add(mod)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_not_even_through_lazy_imports():
    modules = _modules()
    known = set(modules)
    # a package's __init__ is imported whenever one of its modules is: it is a node too
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    assert _cycles(graph) == []


def _backward_calls(path: Path) -> list[int]:
    """Lines calling `<x>.backward(...)` where x is not the loop's precision object."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "backward"
        ):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if name not in ("precision", "prec", "self"):
                lines.append(node.lineno)
    return lines


def test_one_training_loop():
    """Every optimisation step goes through `benchmark.loop.Precision.backward` (the NaN guard
    and loss scaling) inside `benchmark.loop.fit`; only the data-dependent initialisation,
    which trains nothing, back-propagates on its own."""
    allowed = {REPO / "benchmark" / "loop.py", REPO / "transfer" / "rescale.py"}
    offenders = {
        str(path.relative_to(REPO)): lines
        for path in _modules().values()
        if path not in allowed and (lines := _backward_calls(path))
    }
    assert offenders == {}
    stages = (REPO / "bench" / "stages.py").read_text()
    assert "importlib" not in stages and "import_module" not in stages


# The layers, bottom to top: a module imports only from its own layer or the ones below it
# (lazy imports included). benchmark/ is the foundation (config, runs, checkpoint, loop,
# datasets, metrics, protocol); encoders/ the networks; weights/ every read and write of
# their weights; then the pretraining stages, the transfer stages, and the front door
# (bench/: CLI, stage table, suites, launchers, reports).
LAYERS = ("benchmark", "encoders", "weights", "pretrain", "transfer", "bench")


def test_no_module_imports_from_a_layer_above_its_own():
    modules = _modules()
    known = set(modules)
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    offenders = {}
    for name, path in modules.items():
        own = rank[name.split(".")[0]]
        above = sorted(m for m in _imports(name, path, known) if rank[m.split(".")[0]] > own)
        if above:
            offenders[name] = above
    assert offenders == {}


def test_the_layers_are_every_package():
    assert set(LAYERS) == set(PACKAGES)
    assert sorted(p.parent.name for p in REPO.glob("*/__init__.py")
                  if p.parent.name not in ("tests", "benchmarks")) == sorted(PACKAGES)  # fmt: skip
