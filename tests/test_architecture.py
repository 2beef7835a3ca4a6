"""The shape of the house: no import circles, nothing imports upward, no module grows past ~400 lines
without saying why at its top. Read from the source (every import, also those inside functions)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peft_basis")

# Lower layers never import higher ones (same layer: allowed, as long as there is no circle).
LAYERS = [
    ["_version", "errors", "_peft_type", "modules", "budget", "distributed", "evaluation", "data", "validation",
     "fingerprint", "memory"],
    ["linalg", "io", "parallel"],
    ["calibration"],
    ["tuners"],
    ["compression", "lean", "hub", "task_vectors", "standalone", "harness", "persistence", "healing"],
    ["cli", "subcommands", "__init__"],
]
MAX_LINES = 420


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "__init__" else "__init__"] = path
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """peft_basis modules that ``name`` imports (relative and absolute, at any depth of the code)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    if name == "__init__":
        package = ""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("peft_basis"):
                mod = node.module[len("peft_basis"):].lstrip(".")
            else:
                continue
            targets = [f"{mod}.{a.name}" if mod else a.name for a in node.names] + [mod]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("peft_basis"):].lstrip(".") for a in node.names if a.name.startswith("peft_basis")]
        for t in targets:
            t = t or "__init__"
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph():
    modules = _modules()
    return {n: _imports(n, p, modules) for n, p in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"peft_basis.{module} belongs to no layer of tests/test_architecture.py: add it to LAYERS.")


def test_no_import_circles():
    graph = _graph()
    graph.pop("__init__")
    for deps in graph.values():
        deps.discard("__init__")
    # a package's __init__ re-exports its children: importing the package is importing them, not a circle
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if d.startswith(n + "."):
                continue
            if state.get(d) == 1 and not n.startswith(d + "."):
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_nothing_imports_upward():
    upward = [f"{n} -> {d}" for n, deps in _graph().items() for d in deps
              if _layer(d) > _layer(n) and not (n == "__init__")]
    assert not upward, "lower layers import higher ones: " + ", ".join(sorted(upward))


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_modules_stay_small_or_say_why(name, path):
    text = open(path).read()
    lines = text.count("\n")
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "Why this module is long" in doc, (
            f"peft_basis/{os.path.relpath(path, PACKAGE)} has {lines} lines: split it, or say at its top "
            "('Why this module is long: ...') why it must stay whole.")
