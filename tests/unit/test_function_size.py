"""Small functions: no function or method in the package is longer than MAX_LINES."""

from __future__ import annotations

import ast
from pathlib import Path

import viommu_backend

MAX_LINES = 80


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, line count) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + node.name
            if not isinstance(node, ast.ClassDef):
                yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        else:
            yield from _functions(node, prefix)


def _long_functions() -> dict[str, int]:
    root = Path(viommu_backend.__file__).parent
    out = {}
    for path in sorted(root.rglob("*.py")):
        for name, lines in _functions(ast.parse(path.read_text(), str(path))):
            if lines > MAX_LINES:
                out[f"{path.relative_to(root.parent)}::{name}"] = lines
    return out


def test_no_function_is_longer_than_the_limit() -> None:
    assert _long_functions() == {}, f"functions over {MAX_LINES} lines (cut them at their seams)"


def test_the_check_sees_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    found = dict(_functions(ast.parse(f"class C:\n  def f():\n{body}\n")))
    assert found == {"C.f": MAX_LINES + 1}
