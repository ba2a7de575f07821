"""The code's layout: no import cycles between the project's modules (lazy imports inside functions count too), no
private name imported across modules, no module past ~400 lines. Read from the sources with ``ast``."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("continual_mem", "registry", "scenarios", "cli", "serving")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every project module ``name`` imports, anywhere in the file."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            names = [a.name for a in node.names]
            # "from pkg import module" imports the module
            found += [(f"{base}.{n}", []) for n in names if f"{base}.{n}" in known]
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest:
                found.append((base, rest))
    return [(m, n) for m, n in found if m in known and m != name]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m, _ in imports(name, path, known)} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    # the check below can fail: a two-module circle and a three-module circle are found, a chain is not
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": set()}) == [["a", "b"]]
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == [["x", "y", "z"]]


def test_no_import_cycles():
    # a package's __init__ re-exporting its modules is no circle: leave the packages' __init__ out
    edges = {k: {m for m in v if m not in PACKAGES} for k, v in graph().items() if k not in PACKAGES}
    assert cycles(edges) == []


def test_no_private_name_crosses_modules():
    mods = modules()
    known = set(mods)
    crossing = [f"{name} imports {n} from {m}" for name, path in mods.items()
                for m, names in imports(name, path, known) for n in names if n.startswith("_")]
    assert crossing == []


def test_no_module_past_the_size_limit():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
