"""What the four scripts still share, kept from drifting (a copied script is only diff-friendly while its shared
parts read the same, so drift is a test failure, not a silent cost): the plumbing lives in common/ (Run), so a
script is its algorithm plus a skeleton that must read the same in all four:

- the phases of `main`'s epoch loop, in order, under the same `# ---- NAME ----` banners;
- the ADVANTAGES and LOGGING phases, line for line;
- the run's calls in the same order: Run, start, epochs, rollout, advantages, train_batches, accumulate, backward,
  end_epoch, finish (the algorithm calls more where it needs them: velocity, reference_velocity, checkpointed_ema);
- the `if __name__ == "__main__":` block, line for line but for the algorithm's memory-plan line.
"""
import ast
import os

import pytest

from tests.helpers import SCRIPTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = "grpo.py"
COPIES = tuple(f"{s}.py" for s in SCRIPTS)  # every algorithm script but the reference, found by tests.helpers
SKELETON = ("Run", "start", "epochs", "rollout", "advantages", "train_batches", "accumulate", "backward", "end_epoch",
            "finish")


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def phases(text) -> dict[str, list[str]]:
    """{banner name: the lines under it up to the next banner or the end of its loop}, in order, of `main`."""
    lines = text.splitlines()
    out, name, indent = {}, None, None
    for line in lines[next(i for i, ln in enumerate(lines) if ln.startswith("def main(")):]:
        stripped = line.strip()
        if stripped.startswith("# ---- ") and stripped.endswith(" ----"):
            name, indent = stripped[7:-5], len(line) - len(line.lstrip())
            out[name] = []
        elif name is not None and stripped and len(line) - len(line.lstrip()) < indent:
            name = None  # the loop ended
        elif name is not None and stripped:
            out[name].append(line)
    return out


def run_calls(text) -> list[str]:
    """The names of Run's constructor and of the methods called on `run` in `main`, in source order."""
    main = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = []
    for node in ast.walk(main):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "Run":
                calls.append((node.lineno, node.col_offset, "Run"))
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "run":
                calls.append((node.lineno, node.col_offset, f.attr))
    return [name for *_, name in sorted(calls)]


def main_block(text) -> list[str]:
    """The lines of the `if __name__` block, without the plan.Algorithm(...) statement (each script's own)."""
    lines, out, depth = text.splitlines(), [], 0
    for ln in lines[lines.index('if __name__ == "__main__":'):]:
        if depth or "plan.Algorithm(" in ln:  # the statement, continuation lines included
            depth += ln.count("(") - ln.count(")")
        else:
            out.append(ln)
    return out


def test_phases_parse():
    text = ("def main(args):\n    x = 1\n    for e in r:\n        # ---- A ----\n        a = 1\n\n"
            "        # ---- B ----\n        b = 2\n    done = 3\n")
    assert phases(text) == {"A": ["        a = 1"], "B": ["        b = 2"]}


@pytest.mark.parametrize("script", COPIES)
def test_the_same_phases_in_the_same_order(script):
    reference, copy = phases(_read(REFERENCE)), phases(_read(script))
    assert list(copy) == list(reference) == ["SAMPLING", "ADVANTAGES", "TRAINING", "LOGGING, EVALUATION, CHECKPOINT"]
    for name in ("ADVANTAGES", "LOGGING, EVALUATION, CHECKPOINT"):
        assert copy[name] == reference[name], f"{script}: the {name} phase differs from {REFERENCE}'s"


@pytest.mark.parametrize("script", (REFERENCE, *COPIES))
def test_the_run_is_driven_in_the_same_order(script):
    calls = [c for c in run_calls(_read(script)) if c in SKELETON]
    first = [c for i, c in enumerate(calls) if c not in calls[:i]]  # the order of first use
    assert first == list(SKELETON), f"{script}: {first}"


@pytest.mark.parametrize("script", COPIES)
def test_the_entry_point_is_the_same(script):
    assert main_block(_read(script)) == main_block(_read(REFERENCE))
    assert sum("plan.Algorithm(" in ln for ln in _read(script).splitlines()) == 1
