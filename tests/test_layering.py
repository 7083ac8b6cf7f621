"""Import layering of the project's packages, read from the source with `ast` (nothing is imported).

The rule (CONTRIBUTING.md): models -> nothing of ours but models; parallel -> models; recipe ->
models, parallel; the entry point recipe/train.py is imported by no other module of recipe/ (tests
may); and no import cycle among the modules of models/, parallel/ and recipe/.

Every `import x` and `from x import y` counts, at any depth (inside functions, `if`, `try`), with
relative imports resolved. An import names the longest project module it reaches: `from recipe import
train` is an import of recipe.train, `from recipe.checkpoint import save` one of recipe.checkpoint (a
package counts as its `__init__`). Importing a submodule also runs its parent packages' `__init__`,
but those implicit edges are not in the graph: every `__init__` that re-exports its submodules would
be a cycle otherwise.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "parallel", "recipe")
ENTRY_POINT = "recipe.train"
# What each package may import from the project (besides itself).
ALLOWED = {"models": set(), "parallel": {"models"}, "recipe": {"models", "parallel"}}


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the root, e.g. "recipe/export.py"
    line: int
    source: str  # the statement as written (first line)
    importer: str  # module doing the import, e.g. "recipe.export"
    target: str  # project module it reaches, e.g. "recipe.checkpoint"

    def where(self) -> str:
        return f"{self.file}:{self.line}: `{self.source}`"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file under the project's packages."""
    files = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[_module_name(root, path)] = path
    return files


def _longest_module(name: str, modules: set[str]) -> str | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def collect_imports(root: Path) -> tuple[list[Import], list[str]]:
    """All imports of project modules by project modules under `root`, and the problems met reading them."""
    files = _project_files(root)
    modules = set(files)
    imports, problems = [], []
    for module, path in files.items():
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(text, filename=rel)
        except SyntaxError as e:
            problems.append(f"{rel}:{e.lineno}: cannot parse: {e.msg}")
            continue
        lines = text.splitlines()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".") if package else []
                    if node.level > len(base_parts):
                        problems.append(f"{rel}:{node.lineno}: relative import beyond the top-level package")
                        continue
                    base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from pkg import name`: name is a submodule if one exists, else an attribute of pkg.
                names = [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]
            else:
                continue
            source = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
            for target in dict.fromkeys(_longest_module(n, modules) for n in names):
                if target is not None and target != module:
                    imports.append(Import(rel, node.lineno, source, module, target))
    return imports, problems


def _cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (tens)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(sccs)


def _shortest_cycle(start: str, members: set[str], edges: dict[tuple[str, str], Import]) -> list[Import]:
    """The imports of one shortest cycle through `start` inside one strongly connected component."""
    succ: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        if a in members and b in members:
            succ.setdefault(a, []).append(b)
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in succ.get(v, []):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                nodes = [*reversed(path), start]
                return [edges[(a, b)] for a, b in zip(nodes, nodes[1:], strict=False)]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {sorted(members)}")


def check_layering(root: Path) -> list[str]:
    """Every violation of the layering rule under `root`, one message each, naming file, line and import."""
    imports, problems = collect_imports(root)
    for imp in imports:
        src_pkg, dst_pkg = imp.importer.split(".")[0], imp.target.split(".")[0]
        if dst_pkg != src_pkg and dst_pkg not in ALLOWED[src_pkg]:
            allowed = ", ".join(sorted({src_pkg} | ALLOWED[src_pkg]))
            problems.append(f"{imp.where()}: {src_pkg}/ imports {imp.target} ({src_pkg}/ may import only {allowed})")
        elif imp.target == ENTRY_POINT or imp.target.startswith(ENTRY_POINT + "."):
            problems.append(
                f"{imp.where()}: {imp.importer} imports the entry point {ENTRY_POINT} (only tests may; "
                "move what it needs out of recipe/train.py)"
            )
    edges: dict[tuple[str, str], Import] = {}
    for imp in imports:
        edges.setdefault((imp.importer, imp.target), imp)
    for scc in _cycles(imports):
        cycle = _shortest_cycle(scc[0], set(scc), edges)
        path = " -> ".join([cycle[0].importer] + [imp.target for imp in cycle])
        detail = "".join(f"\n    {imp.where()}" for imp in cycle)
        problems.append(f"import cycle among {', '.join(scc)}: {path}{detail}")
    return problems


def test_layering_of_this_repository():
    problems = check_layering(REPO)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    for pkg in PACKAGES:
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").touch()


def test_checker_reports_violations(tmp_path):
    """The checker is not vacuous: a fake tree with one violation of each kind gets each reported."""
    _write_tree(
        tmp_path,
        {
            "models/a.py": "import torch\nfrom recipe.x import y\n",
            "models/b.py": "def f():\n    if True:\n        import parallel.p as p\n    return p\n",
            "parallel/p.py": "from models import a\nfrom recipe import x\n",
            "recipe/train.py": "from recipe import x\nfrom parallel.p import thing\n",
            "recipe/x.py": "from . import y\n",  # x -> y -> x: a cycle, through a relative import
            "recipe/y.py": "def g():\n    from .x import h\n    return h\n",
            "recipe/z.py": "from recipe import train\n",
            "recipe/sub/__init__.py": "",
            "recipe/sub/m.py": "from .. import train\nfrom ..train import main\n",
        },
    )
    problems = check_layering(tmp_path)
    text = "\n".join(problems)

    def reported(*needles: str) -> bool:
        return any(all(n in p for n in needles) for p in problems)

    assert reported("models/a.py:2:", "from recipe.x import y", "imports recipe.x"), text
    assert reported("models/b.py:3:", "import parallel.p as p", "imports parallel.p"), text
    assert reported("parallel/p.py:2:", "from recipe import x", "imports recipe.x"), text
    assert not reported("parallel/p.py:1:"), text  # parallel -> models is allowed
    assert reported("recipe/z.py:1:", "entry point recipe.train"), text
    assert reported("recipe/sub/m.py:1:", "from .. import train", "entry point"), text
    assert reported("recipe/sub/m.py:2:", "from ..train import main", "entry point"), text
    assert not reported("recipe/train.py:"), text  # the entry point itself imports what it likes
    cycles = [p for p in problems if p.startswith("import cycle")]
    assert len(cycles) == 1, text
    assert "recipe.x, recipe.y" in cycles[0], text
    assert "recipe/x.py:1: `from . import y`" in cycles[0], text
    assert "recipe/y.py:2: `from .x import h`" in cycles[0], text
    assert len(problems) == 7, text


def test_checker_reports_longer_cycles_and_accepts_a_clean_tree(tmp_path):
    _write_tree(
        tmp_path,
        {
            "models/m.py": "import os\nfrom models import n\n",
            "models/n.py": "from . import shapes\n",
            "models/shapes.py": "",
            "parallel/p.py": "import models.m\nfrom models.n import *\n",
            "recipe/a.py": "import parallel.p\nfrom models import m\n",
            "recipe/train.py": "from recipe import a\n",
            "recipe/__init__.py": "from .a import f\n",  # a package re-exporting its module: no cycle
        },
    )
    assert check_layering(tmp_path) == []

    (tmp_path / "models/shapes.py").write_text("from models.m import thing\n")  # m -> n -> shapes -> m
    problems = check_layering(tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("import cycle among models.m, models.n, models.shapes: "), problems
    assert "models.m -> models.n -> models.shapes -> models.m" in problems[0], problems
    assert "models/shapes.py:1: `from models.m import thing`" in problems[0], problems


# HF Trainer / transformers calling-convention names: the HF driver's wrapper (recipe/hf_model.py) holds
# them; the model code in models/ takes its own inputs only (CONTRIBUTING.md).
HF_ONLY_NAMES = frozenset(
    {
        "num_items_in_batch",
        "return_logits",
        "return_dict",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "past_key_values",
        "cache_position",
        "main_input_name",
        "supports_gradient_checkpointing",
        "gradient_checkpointing_enable",
        "quantization_method",
        "_is_accelerate_prepared",
        "_keys_to_ignore_on_save",
    }
)


def hf_names_in_models(root: Path) -> list[str]:
    """Every HF-only name (argument, variable, attribute, keyword) in models/, and every ``forward`` there
    that swallows keywords (``**kwargs``), one message each with file and line."""
    problems = []
    for path in sorted((root / "models").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.arg):
                names = [node.arg]
            elif isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.keyword) and node.arg:
                names = [node.arg]
            for name in names:
                if name in HF_ONLY_NAMES:
                    problems.append(
                        f"{rel}:{node.lineno}: HF-only name `{name}` in models/ (it belongs in recipe/hf_model.py)"
                    )
            if isinstance(node, ast.FunctionDef) and node.name == "forward" and node.args.kwarg is not None:
                problems.append(
                    f"{rel}:{node.lineno}: forward(..., **{node.args.kwarg.arg}) swallows unknown keywords in models/"
                )
    return problems


def test_models_hold_no_hf_calling_convention():
    problems = hf_names_in_models(REPO)
    assert not problems, "\n".join(problems)


def test_hf_name_checker_is_not_vacuous(tmp_path):
    _write_tree(
        tmp_path,
        {
            "models/m.py": """
                class M:
                    main_input_name = "input_ids"

                    def forward(self, x, num_items_in_batch=None, **kwargs):
                        return f(x, use_cache=False).loss / num_items_in_batch

                    def other(self, **kwargs):
                        return kwargs
            """,
        },
    )
    problems = "\n".join(hf_names_in_models(tmp_path))
    for needle in (
        "m.py:3: HF-only name `main_input_name`",
        "m.py:5: HF-only name `num_items_in_batch`",
        "m.py:6: HF-only name `use_cache`",
        "m.py:5: forward(..., **kwargs)",
    ):
        assert needle in problems, problems
    assert "other" not in problems and problems.count("\n") == 4, problems
