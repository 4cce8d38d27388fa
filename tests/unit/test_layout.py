"""docs/layout.md is the rule for imports between the parts of viommu_backend: each
module imports only the parts its row lists (imports inside a part are free)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import REPO

PACKAGE = REPO / "viommu_backend"


def allowed() -> dict[str, set[str]]:
    """Part -> the parts it may import, from the table in docs/layout.md."""
    rules: dict[str, set[str]] = {}
    for line in (REPO / "docs" / "layout.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        may = {m.strip() for m in cells[2].split(",") if m.strip() not in ("", "-")}
        for part in re.findall(r"`([\w]+)`", cells[0]):
            rules[part] = may
    return rules


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def module_name(path: Path) -> tuple[str, ...]:
    """``viommu_backend/a/b.py`` -> ("viommu_backend", "a", "b") (a package: its __init__)."""
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return here + ("__init__",) if path.name == "__init__.py" else here


def imported_parts(source: str, here: tuple[str, ...]) -> set[str]:
    """The parts of viommu_backend that module ``here`` imports (absolute or relative)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = list(here[:-node.level]) if node.level else []
            names = [".".join(base + [node.module])] if node.module else \
                [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n.split(".")[1] for n in names if n.startswith("viommu_backend.")}
    return out


def test_every_part_has_a_row():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts - set(allowed()) == set()


def test_imports_follow_the_layout():
    rules = allowed()
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        if part == "__init__":
            continue
        extra = imported_parts(path.read_text(), module_name(path)) - rules[part] - {part}
        if extra:
            bad.append(f"{path.relative_to(REPO)} imports {sorted(extra)} (docs/layout.md: {part})")
    assert bad == []


def test_the_check_sees_absolute_and_relative_imports():
    here = ("viommu_backend", "domains", "manager")
    src = "from viommu_backend.smmuv3 import regs\nfrom ..trace import Tracer\nfrom . import fault\n" \
          "import viommu_backend.memory\nfrom .. import guest\n"
    assert imported_parts(src, here) == {"smmuv3", "trace", "domains", "memory", "guest"}
    assert not {"guest"} <= allowed()["domains"]  # domains importing guest would fail the rule
