"""The package stays readable: no class in specexec_rt/ over 350 lines, no function over 90, and a
method or tree-policy name compared with a string literal at most 5 times (behaviour keyed by a
name lives in the registries: methods.METHODS, tree_policy.POLICIES, auto.AUTO_SHAPES).

    python tests/test_code_shape.py      # prints the numbers and the largest offenders
"""
from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "specexec_rt"
MAX_CLASS_LINES = 350
MAX_FUNCTION_LINES = 90
MAX_NAME_COMPARISONS = 5


def _registered_names() -> set:
    from specexec_rt.speculative.auto import AUTO_SHAPES
    from specexec_rt.speculative.methods import METHODS
    from specexec_rt.speculative.tree_policy import POLICIES

    return set(METHODS) | set(POLICIES) | set(AUTO_SHAPES)


def _trees():
    for path in sorted(ROOT.rglob("*.py")):
        yield path.relative_to(ROOT.parent), ast.parse(path.read_text(), str(path))


def _literals(node) -> list:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def measure() -> dict:
    """Sizes (lines, ``where``) of every class and function, and every comparison of a registered
    name with a string literal (``where: source``)."""
    names = _registered_names()
    classes, functions, comparisons = [], [], []
    for path, tree in _trees():
        for node in ast.walk(tree):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                classes.append((size, f"{path}:{node.lineno} {node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((size, f"{path}:{node.lineno} {node.name}"))
            elif isinstance(node, ast.Compare):
                if any(v in names for side in [node.left, *node.comparators] for v in _literals(side)):
                    comparisons.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return {"classes": sorted(classes, reverse=True), "functions": sorted(functions, reverse=True),
            "comparisons": comparisons}


def test_the_finder_sees_what_it_must_count():
    """Negative control: the counter finds a name comparison, and sizes a class and a function."""
    tree = ast.parse("class A:\n    def f(self, m):\n        return m == 'specexec'\n")
    compare = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert _literals(compare.comparators[0]) == ["specexec"] and "specexec" in _registered_names()
    sizes = measure()
    assert sizes["classes"] and sizes["functions"]


def test_no_class_or_function_grows_past_a_screenful():
    sizes = measure()
    assert sizes["classes"][0][0] <= MAX_CLASS_LINES, sizes["classes"][:3]
    assert sizes["functions"][0][0] <= MAX_FUNCTION_LINES, sizes["functions"][:3]


def test_names_are_looked_up_not_compared():
    found = measure()["comparisons"]
    assert len(found) <= MAX_NAME_COMPARISONS, "\n".join(found)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT.parent))
    m = measure()
    print(f"largest class: {m['classes'][0][0]} lines ({m['classes'][0][1]}), target <= {MAX_CLASS_LINES}")
    print(f"largest function: {m['functions'][0][0]} lines ({m['functions'][0][1]}), target <= {MAX_FUNCTION_LINES}")
    print(f"method/policy names compared with literals: {len(m['comparisons'])}, target <= {MAX_NAME_COMPARISONS}")
    for c in m["comparisons"]:
        print("  " + c)
    for label, rows in (("classes", m["classes"][:5]), ("functions", m["functions"][:5])):
        print(f"largest {label}: " + ", ".join(f"{n} {w}" for n, w in rows))
