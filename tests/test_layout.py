"""The layout a researcher can hold in their head (issue 19), checked on the source: each algorithm script is at most
320 lines with a `main` of at most 120 lines nested at most 6 blocks deep that hands no function of its own to
common/; common/ has no import circle; rewards/ imports nothing from common/; each script's Args holds only its
algorithm's fields and the shared defaults it changes."""
import ast
import dataclasses
import importlib
import inspect
import os

import pytest

from common.args import RunArgs
from tests.helpers import ALGORITHMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ALGORITHMS  # every top-level script with Args and main
BLOCKS = (ast.For, ast.While, ast.If, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith)


def _tree(path):
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read())


def _main(script):
    return next(n for n in _tree(f"{script}.py").body if isinstance(n, ast.FunctionDef) and n.name == "main")


def block_depth(node, depth=0) -> int:
    """The deepest nesting of compound statements under `node` (an `elif` is its `if`'s level, not one deeper)."""
    deepest = depth
    for field in ("body", "orelse", "finalbody", "handlers"):
        children = getattr(node, field, [])
        if field == "orelse" and isinstance(node, ast.If) and len(children) == 1 and isinstance(children[0], ast.If):
            deepest = max(deepest, block_depth(children[0], depth))  # elif
            continue
        for child in children:
            inner = depth + 1 if isinstance(child, BLOCKS) else depth
            deepest = max(deepest, block_depth(child, inner) if isinstance(child, (*BLOCKS, ast.ExceptHandler))
                          else inner)
    return deepest


def test_block_depth_counts_compound_statements():
    tree = ast.parse("def f():\n    for a in b:\n        if a:\n            with c:\n                pass\n"
                     "        elif d:\n            pass\n    x = 1\n")
    assert block_depth(tree.body[0]) == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_size_and_main(script):
    with open(os.path.join(ROOT, f"{script}.py")) as f:
        lines = f.read().splitlines()
    main = _main(script)
    assert len(lines) <= 320, f"{script}.py: {len(lines)} lines"
    assert main.end_lineno - main.lineno + 1 <= 120, f"{script}.main: {main.end_lineno - main.lineno + 1} lines"
    assert block_depth(main) <= 6, f"{script}.main nests {block_depth(main)} blocks deep"
    # no closure: main defines no function, so it can hand none to common/ (nothing in common/ calls back)
    nested = [n for n in ast.walk(main) if isinstance(n, (ast.FunctionDef, ast.Lambda, ast.AsyncFunctionDef))
              and n is not main]
    assert not nested, f"{script}.main defines functions at lines {[n.lineno for n in nested]}"


def _imports(package) -> dict[str, set[str]]:
    """{module: the modules of common/ and rewards/ it imports}, every import statement (lazy ones too)."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
            found[path.removesuffix(".__init__")] = path
    graph = {}
    for mod, path in found.items():
        deps = set()
        for node in ast.walk(_tree(path.replace(".", os.sep) + ".py")):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                deps |= subs if subs & set(found) else {node.module}  # `from common import x`: the module x
        graph[mod] = {d for d in deps if d != mod and d.split(".")[0] in ("common", "rewards")}
    return graph


def test_common_has_no_import_circle():
    graph = {m: {d for d in deps if d.startswith("common")} for m, deps in _imports("common").items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_rewards_import_nothing_from_common():
    """The rewards (and their server) run in an environment of their own. The one exception is the entry point
    `python -m rewards score --dataset`, which reads dataset rows as a run does (common/data.py): nothing imports it."""
    offenders = {m: sorted(d for d in deps if d.startswith("common")) for m, deps in _imports("rewards").items()
                 if m != "rewards.__main__"}
    assert not {m: d for m, d in offenders.items() if d}
    assert "rewards.__main__" not in {d for deps in _imports("rewards").values() for d in deps}


def _docstrings(cls) -> dict[str, str]:
    """{field: the docstring under it} in the class body of `cls` itself."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            out[a.target.id] = b.value.value
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_args_hold_the_algorithm_and_changed_defaults(script):
    args_cls = importlib.import_module(script).Args
    assert issubclass(args_cls, RunArgs)
    shared = {f.name: f for f in dataclasses.fields(RunArgs)}
    base_docs, own_docs = _docstrings(RunArgs), _docstrings(args_cls)
    own = [n.target.id for n in ast.parse(inspect.getsource(args_cls)).body[0].body if isinstance(n, ast.AnnAssign)]
    for name in own:  # a shared field is re-declared only to change its default or its help
        if name in shared:
            same_default = getattr(args_cls, name) == shared[name].default
            assert not same_default or own_docs.get(name, base_docs[name]) != base_docs[name], \
                f"{script}.Args re-declares {name} with RunArgs' default and help"
    assert len(own) <= 25, f"{script}.Args declares {len(own)} fields"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag(script):
    # tyro's --help text of a field is the docstring under it, in the class that declares it (or a base class)
    args_cls = importlib.import_module(script).Args
    documented = {**_docstrings(RunArgs), **_docstrings(args_cls)}
    undocumented = [f.name for f in dataclasses.fields(args_cls) if not documented.get(f.name, "").strip()]
    assert not undocumented, f"{script}: --help would show no text for {undocumented}"
