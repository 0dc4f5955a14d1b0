"""One direction of dependency (architecture.md), read from the source with ``ast``.

Each top-level folder installs as a subpackage of ``medaudit`` (pyproject.toml's package-dir):
``models/`` -> ``medaudit.models`` and so on. The arrows allowed:

* ``medaudit.models`` (the ML side) imports no transport and no other medaudit package;
* ``medaudit.service`` imports the ML side, never the command line;
* ``medaudit.clients`` (the medaudit-client distribution) imports none of the others, and no
  heavy library: a hospital system installs it with httpx alone;
* ``medaudit.cli`` and ``medaudit.testing`` (support for tests and benchmarks) may import the rest.

And no import cycles among modules, counting the imports a module runs when it is imported (its
top level, not those inside functions or under ``TYPE_CHECKING``).
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "models": "medaudit.models",
    "service": "medaudit.service",
    "cli": "medaudit.cli",
    "clients": "medaudit.clients",
    "testing": "medaudit.testing",
}
TRANSPORT = {"bentoml", "redis", "prometheus_client", "starlette"}
HEAVY = {"torch", "torchvision", "timm", "bentoml", "onnxruntime", "onnx", "zennit", "sklearn", "scipy"}
#: Optional in medaudit-client (its ``arrays`` extra): imported inside the functions that need them.
OPTIONAL = {"numpy", "PIL"}
#: The reference implementations the tests compare against, never imported by what is deployed.
REFERENCES = {"lxt", "zennit", "crp"}

FORBIDDEN: dict[str, set[str]] = {
    # lxt (the ViT rules' reference, licensed for scientific use) and zennit / zennit-crp (LGPL, the
    # LRP reference) are for tests and benchmarks only: testing/zennit_reference.py, tests/
    "models": TRANSPORT
    | REFERENCES
    | {"medaudit.service", "medaudit.cli", "medaudit.clients", "medaudit.testing"},
    "service": REFERENCES | {"medaudit.cli", "medaudit.testing"},
    "clients": HEAVY | TRANSPORT | {"medaudit.models", "medaudit.service", "medaudit.cli"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files(folder: str) -> list[Path]:
    """The folder's sources; not build/ (setuptools' scratch copy when a distribution is built in place)."""
    root = ROOT / folder
    return sorted(
        p for p in root.rglob("*.py") if not {"__pycache__", "build"} & set(p.relative_to(root).parts)
    )


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from medaudit.x import y`: y may be a module of package medaudit.x; count both.
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return []


def _top_level_imports(tree: ast.Module) -> list[str]:
    """Imports executed on import of the module: the top level and its if/try blocks, skipping
    ``if TYPE_CHECKING:`` bodies and everything inside functions and classes."""
    out: list[str] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            out.extend(_imported(st))
            if isinstance(st, ast.If):
                test = ast.unparse(st.test)
                if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body)
                for h in st.handlers:
                    visit(h.body)
                visit(st.orelse)
                visit(st.finalbody)

    visit(tree.body)
    return out


def _names(imports: list[str]) -> set[str]:
    """Top-level libraries and medaudit subpackages named by ``imports``."""
    out: set[str] = set()
    for name in imports:
        parts = name.split(".")
        out.add(".".join(parts[:2]) if parts[0] == "medaudit" and len(parts) > 1 else parts[0])
    return out


@pytest.mark.parametrize(
    "path",
    [p for folder in FORBIDDEN for p in _files(folder)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_imports_follow_the_layers(path: Path) -> None:
    folder = path.relative_to(ROOT).parts[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    every = _names([n for node in ast.walk(tree) for n in _imported(node)])
    bad = every & FORBIDDEN[folder]
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    if folder == "clients":
        eager = _names(_top_level_imports(tree)) & OPTIONAL
        assert not eager, f"{path.relative_to(ROOT)} imports {sorted(eager)} at module level (optional)"


#: Inside the ML side, what each lower level never imports: the offline audit (``models/audit/``),
#: one version's build and the pipeline sit above the XAI core, the datasets and the corrections;
#: the XAI core also stays free of datasets and training.
ABOVE = {"medaudit.models.audit", "medaudit.models.build", "medaudit.models.pipeline"}
BELOW: dict[str, set[str]] = {
    "models/xai": ABOVE | {"medaudit.models.data", "medaudit.models.train"},
    "models/data": ABOVE,
    "models/corrections": ABOVE,
}


@pytest.mark.parametrize(
    "path",
    [p for folder in BELOW for p in _files(folder)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_models_levels_import_downward(path: Path) -> None:
    banned = BELOW["/".join(path.relative_to(ROOT).parts[:2])]
    tree = ast.parse(path.read_text(), filename=str(path))
    every = {n for node in ast.walk(tree) for n in _imported(node)}
    bad = sorted(n for n in every if any(n == b or n.startswith(b + ".") for b in banned))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: its level must not"


def test_no_bare_top_level_imports() -> None:
    """Every import of this project's code is namespaced: `import models` would pick up whatever
    package of that name a hospital's environment holds."""
    bare = {"models", "service", "clients", "cli", "testing"}
    offenders = []
    for folder in (*PACKAGES, "tests", "benchmarks"):
        for path in _files(folder):
            tree = ast.parse(path.read_text(), filename=str(path))
            names = {n.split(".")[0] for node in ast.walk(tree) for n in _imported(node)}
            if names & bare:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(names & bare)}")
    assert not offenders, "\n".join(offenders)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for folder in PACKAGES for p in _files(folder)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {m for m in _top_level_imports(tree) if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = _graph()
    # Package __init__ modules are imported by their submodules implicitly; an __init__ that
    # imports its own submodules is a re-export, not a cycle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


#: One room, one job (style.md): a module past this many lines is doing two. Exceptions name why.
MAX_LINES = 700
LONG_MODULES: dict[str, str] = {}


@pytest.mark.parametrize("folder", ["models", "service", "clients", "cli", "testing"])
def test_no_module_is_over_the_line_budget(folder: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _files(folder)
        if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in LONG_MODULES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them, or say why in LONG_MODULES): {long}"


#: Each side's one error tree (style.md, "Errors: one domain tree"): every public exception class
#: of ``models/`` is defined in models/errors.py, every one of ``service/`` in service/errors.py.
ERROR_MODULES = {"models": "models/errors.py", "service": "service/errors.py"}
#: Exception classes defined elsewhere (``path:Class``), each with why. Private (``_``) names are
#: control flow inside their module and need no entry.
OTHER_EXCEPTIONS: dict[str, str] = {
    "service/uploads.py:BodyTooLargeError": "control flow of the upload middleware: raised by its "
    "receive wrapper, caught by service/middleware.py, which answers the 413; never reaches a caller",
    "service/uploads.py:DisconnectedError": "control flow of the upload middleware: the client went "
    "away mid-body; caught by service/middleware.py",
    "service/process.py:ServeError": "tooling that starts `bentoml serve` for tests and benchmarks, "
    "not an error the service raises",
}
_BUILTIN_EXCEPTIONS = {
    n for n, o in vars(builtins).items() if isinstance(o, type) and issubclass(o, Exception)
}


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):  # redis.RedisError
        return node.attr
    if isinstance(node, ast.Subscript):  # Generic[T]
        return _base_name(node.value)
    return node.id if isinstance(node, ast.Name) else ""


def _exception_classes(trees: dict[str, ast.Module]) -> dict[str, str]:
    """``{"path:Class": Class}`` for every class in ``trees`` deriving from Exception: from a built-in
    exception, from a library's ``…Error``/``…Exception``, or from another class found here."""
    classes = [
        (path, c) for path, tree in trees.items() for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
    ]
    known, found = set(_BUILTIN_EXCEPTIONS), {}
    grew = True
    while grew:  # to a fixpoint: a subclass may be read before its base
        grew = False
        for path, c in classes:
            bases = {_base_name(b) for b in c.bases}
            if f"{path}:{c.name}" not in found and (
                bases & known or any(b.endswith(("Error", "Exception")) for b in bases)
            ):
                found[f"{path}:{c.name}"] = c.name
                known.add(c.name)
                grew = True
    return found


def test_exception_finder_follows_bases() -> None:
    tree = ast.parse(
        "class B(A): pass\nclass A(ValueError): pass\nclass C: pass\nclass D(redis.RedisError): pass\n"
        "class E(C): pass\ndef f():\n    class G(B): pass\n"
    )
    assert set(_exception_classes({"m.py": tree})) == {"m.py:A", "m.py:B", "m.py:D", "m.py:G"}


@pytest.mark.parametrize("folder", sorted(ERROR_MODULES))
def test_errors_live_in_their_sides_error_module(folder: str) -> None:
    trees = {
        p.relative_to(ROOT).as_posix(): ast.parse(p.read_text(), filename=str(p))
        for f in PACKAGES
        for p in _files(f)
    }
    found = _exception_classes(trees)
    home = ERROR_MODULES[folder]
    stray = sorted(
        key
        for key, name in found.items()
        if key.startswith(f"{folder}/")
        and not key.startswith(f"{home}:")
        and not name.startswith("_")
        and key not in OTHER_EXCEPTIONS
    )
    assert not stray, (
        f"exception classes outside {home} (move them there, or say why in OTHER_EXCEPTIONS): {stray}"
    )
    stale = sorted(k for k in OTHER_EXCEPTIONS if k.startswith(f"{folder}/") and k not in found)
    assert not stale, f"OTHER_EXCEPTIONS names classes that are gone or moved: {stale}"
