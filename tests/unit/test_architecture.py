"""The shape of the code base, checked from the source text alone (pure `ast`, nothing is imported):

* no import cycle among the modules of ``eqnet_plugin/``, ``adapters/`` (installed as ``eqnet_plugin.adapters``) and
  ``benchmarks/`` (scripts that import each other by their bare name), lazy imports inside functions included;
* no ``.py`` file in ``eqnet_plugin/`` or ``adapters/`` over 600 lines;
* no public function in ``eqnet_plugin/`` or ``adapters/`` over 8 parameters: module-level functions and the methods
  of public classes whose name has no leading underscore (``__init__`` counts: it is the public constructor);
  ``self``/``cls`` are not counted, ``*args`` and ``**kwargs`` are. Past 8, take a validated config dataclass.

An import edge goes to the most specific module the statement names: ``from .pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``); ``import a.b.c`` is an edge to ``a.b.c``.
The parent packages that Python runs implicitly on the way (``a``, ``a.b``) are not edges.
"""
from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600
MAX_PARAMS = 8

# (folder, dotted name it installs or runs as, do its modules import each other by bare name?)
TREES = (("eqnet_plugin", "eqnet_plugin", False), ("adapters", "eqnet_plugin.adapters", False),
         ("benchmarks", "benchmarks", True))
LIBRARY = ("eqnet_plugin", "adapters")                 # the trees held to the size limits


@dataclass(frozen=True)
class Module:
    name: str           # dotted name, packages by their own name (not "...__init__")
    path: Path
    is_package: bool


def collect_modules(root: Path, trees=TREES) -> dict[str, Module]:
    mods = {}
    for folder, dotted, _ in trees:
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            mods[".".join([dotted, *parts])] = Module(".".join([dotted, *parts]), path, is_package)
    return mods


def _most_specific(name: str, mods) -> str | None:
    """`name` if it is one of `mods`, else its nearest enclosing module in `mods` (None if none)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(mod: Module, mods: dict[str, Module], trees=TREES) -> dict[str, int]:
    """{imported module of `mods`: first line that imports it} for every import statement of `mod`, at any depth."""
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    bare = next((dotted for _, dotted, by_bare in trees if by_bare and (mod.name + ".").startswith(dotted + ".")),
                None)

    def absolute(name: str) -> str:
        # a benchmark script imports its siblings by bare name (`import bench_supernet`, `from _report import ...`)
        if bare and name and f"{bare}.{name.partition('.')[0]}" in mods:
            return f"{bare}.{name}"
        return name

    out: dict[str, int] = {}

    def add(target: str | None, line: int):
        if target and target != mod.name:
            out.setdefault(target, line)

    for node in ast.walk(ast.parse(mod.path.read_text(), str(mod.path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_most_specific(absolute(alias.name), mods), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = absolute(node.module or "")
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in mods else _most_specific(source, mods), node.lineno)
    return out


def import_graph(mods: dict[str, Module], trees=TREES) -> dict[str, dict[str, int]]:
    return {name: import_edges(m, mods, trees) for name, m in mods.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    return comps


def shortest_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest cycle through the first module of `comp` (BFS inside the component): [a, b, ..., a]."""
    start, inside = comp[0], set(comp)
    parent = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in inside and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{comp} is not a cycle")


def describe_cycles(graph, mods) -> list[str]:
    """Per strongly connected component: one shortest cycle, then every import edge inside the component."""
    def edge(a, b):
        path = mods[a].path
        return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{graph[a][b]}  {a} imports {b}"

    lines = []
    for comp in strongly_connected(graph):
        cycle = shortest_cycle(graph, comp)
        lines.append(f"cycle among {len(comp)} modules {comp}")
        lines.append("  a shortest cycle:")
        lines += [f"    {edge(a, b)}" for a, b in zip(cycle, cycle[1:])]
        lines.append("  every import inside the component:")
        lines += [f"    {edge(a, b)}" for a in comp for b in sorted(graph[a]) if b in comp]
    return lines


def test_no_import_cycle():
    mods = collect_modules(ROOT)
    assert "eqnet_plugin.supernet" in mods and "eqnet_plugin.adapters" in mods and "benchmarks._report" in mods
    problems = describe_cycles(import_graph(mods), mods)
    assert not problems, ("import cycles (lazy imports inside functions count; break each cycle by moving the shared "
                          "code into a module both sides import):\n" + "\n".join(problems))


def _library_files():
    return [p for folder in LIBRARY for p in sorted((ROOT / folder).rglob("*.py"))]


def test_no_library_file_over_600_lines():
    long = [(p.relative_to(ROOT), n) for p in _library_files() if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split them by concern):\n" + "\n".join(
        f"    {p}: {n} lines" for p, n in long)


def _count_params(fn: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> int:
    a = fn.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if is_method and not static and (a.posonlyargs or a.args):
        n -= 1                                          # self / cls
    return n


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def long_signatures(path: Path) -> list[tuple[int, str, int]]:
    """[(line, qualified name, parameter count)] of the public functions of `path` over MAX_PARAMS parameters."""
    out = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, functions) and _is_public(node.name):
            members = [(node, node.name, False)]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            members = [(b, f"{node.name}.{b.name}", True) for b in node.body
                       if isinstance(b, functions) and _is_public(b.name)]
        else:
            continue
        out += [(fn.lineno, name, n) for fn, name, is_method in members
                if (n := _count_params(fn, is_method)) > MAX_PARAMS]
    return out


def test_no_public_function_over_8_parameters():
    bad = [f"    {p.relative_to(ROOT)}:{line}  {name}: {n} parameters"
           for p in _library_files() for line, name, n in long_signatures(p)]
    assert not bad, (f"public functions over {MAX_PARAMS} parameters (self/cls not counted, *args/**kwargs counted; "
                     "take a validated config dataclass instead):\n" + "\n".join(bad))


# ---- the checks themselves see what they should ------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_cycle_check_sees_lazy_and_package_cycles(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from .sub import helper   # lazy: still an edge, to pkg.sub.helper\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/helper.py": "import pkg.a\n",
        "pkg/b.py": "from pkg.sub import NAME\nfrom . import a\n",        # pkg.sub (its __init__), pkg.a
        "pkg/c.py": "from .sub.helper import x\n",                    # not pkg.sub: implicit parents are no edge
        "scripts/one.py": "import two\n",
        "scripts/two.py": "def g():\n    from one import h\n",
        "scripts/three.py": "import pkg.sub.helper\n",
    })
    trees = (("pkg", "pkg", False), ("scripts", "scripts", True))
    mods = collect_modules(tmp_path, trees)
    graph = import_graph(mods, trees)
    assert graph["pkg"] == {"pkg.a": 1}
    assert graph["pkg.a"] == {"pkg.sub.helper": 2}
    assert graph["pkg.b"] == {"pkg.sub": 1, "pkg.a": 2}
    assert graph["pkg.c"] == {"pkg.sub.helper": 1}
    assert graph["scripts.three"] == {"pkg.sub.helper": 1}
    assert strongly_connected(graph) == [["pkg.a", "pkg.sub.helper"], ["scripts.one", "scripts.two"]]
    assert shortest_cycle(graph, ["pkg.a", "pkg.sub.helper"]) == ["pkg.a", "pkg.sub.helper", "pkg.a"]


def test_the_signature_check_counts_like_the_rule(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "def ok(a, b, c, d, e, f, g, h): pass\n"
        "def bad(a, b, c, d, e, f, g, *args, **kwargs): pass\n"
        "def _private(a, b, c, d, e, f, g, h, i): pass\n"
        "class Public:\n"
        "    def __init__(self, a, b, c, d, e, f, g, h, i): pass\n"
        "    def method(self, a, b, c, d, e, f, g, h): pass\n"
        "    @staticmethod\n"
        "    def static(a, b, c, d, e, f, g, h, *, i): pass\n"
        "    def _helper(self, a, b, c, d, e, f, g, h, i): pass\n"
        "class _Private:\n"
        "    def method(self, a, b, c, d, e, f, g, h, i): pass\n")
    assert long_signatures(f) == [(2, "bad", 9), (5, "Public.__init__", 9), (8, "Public.static", 9)]
