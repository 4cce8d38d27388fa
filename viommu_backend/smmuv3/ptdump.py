"""Enumerate the leaf descriptors (pages and blocks) of one translation stage, in input
address order, bounded: what the guest mapped, for inspection (QMP
``query-viommu-stream``), not for translation (that is the walker's job).

    page = leaves(mem, cfg, start=0, limit=64)     # cfg: S1Config (a CD) or S2Config (an STE)
    page.leaves, page.next                         # next: where to continue, None at the end

Each table is read whole (one bounds-checked read) and its valid entries found with numpy;
tables the guest points outside its memory are reported in ``page.errors`` and skipped.
For a nested stream the stage-1 table addresses are IPAs: ``table_pa`` translates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.cd import S1Config
from viommu_backend.smmuv3.ste import S2Config
from viommu_backend.smmuv3.walker import StageParams, stage_params

MAX_LIMIT = 1024
MAX_TABLES = 4096  # tables read per call at most (a sparse tree ends a page early)

_VALID = np.uint64(fl.PTE_VALID)
_TYPE = np.uint64(fl.PTE_TYPE)


@dataclass(frozen=True)
class Leaf:
    iova: int  # input address of the stage (VA at stage 1, IPA at stage 2)
    oa: int  # output address of the stage
    size: int
    level: int
    desc: int  # the raw descriptor

    def attrs(self, stage2: bool) -> dict[str, int]:
        """The descriptor's fields (the stage's layout), without the address."""
        d = (fl.PTE_S2 if stage2 else fl.PTE_S1).decode(self.desc)
        d.pop("OA", None)
        return d


@dataclass
class LeafPage:
    leaves: list[Leaf] = field(default_factory=list)
    next: int | None = None  # input address to continue from; None: no more leaves
    errors: list[str] = field(default_factory=list)
    tables: int = 0


def _ia_end(p: StageParams) -> int:
    return 1 << p.ia_bits


def leaves(mem, cfg: S1Config | S2Config, *, start: int = 0, limit: int = 64,
           table_pa: Callable[[int], int | None] | None = None) -> LeafPage:
    """Leaves of the stage ``cfg`` with input address >= ``start`` (at most ``limit``)."""
    p = stage_params(cfg)
    page = LeafPage()
    limit = max(1, min(int(limit), MAX_LIMIT))
    if p.disabled or start >= _ia_end(p):
        return page
    _table(mem, p, 0, p.ttb, 0, max(0, start), limit, page, table_pa)
    return page


def _read_table(mem, p: StageParams, depth: int, addr: int, page: LeafPage,
                table_pa: Callable[[int], int | None] | None) -> np.ndarray | None:
    n = p.levels[depth][2] + 1
    pa = table_pa(addr) if table_pa is not None else addr
    if pa is None or not mem.contains(pa, 8 * n):
        page.errors.append(f"level {p.levels[depth][0]} table at {addr:#x} is outside guest memory")
        return None
    page.tables += 1
    return np.frombuffer(bytes(mem.read(pa, 8 * n)), dtype="<u8")


def _table(mem, p: StageParams, depth: int, addr: int, base: int, start: int, limit: int,
           page: LeafPage, table_pa: Callable[[int], int | None] | None) -> bool:
    """Walk one table (covering input addresses from ``base``); False once the page is full."""
    level, shift, mask = p.levels[depth]
    if page.tables >= MAX_TABLES:
        page.next = max(base, start)
        return False
    words = _read_table(mem, p, depth, addr, page, table_pa)
    if words is None:
        return True
    first = max(0, (start - base) >> shift) if start > base else 0
    for i in np.flatnonzero(words[first:] & _VALID).tolist():
        idx = first + i
        d = int(words[idx])
        va = base + (idx << shift)
        is_table = bool(d & fl.PTE_TYPE) and level < 3
        if is_table:
            nxt = fl.PTE_TABLE["NLTA"].get(d) & p.oa_mask
            if not _table(mem, p, depth + 1, nxt, va, start, limit, page, table_pa):
                return False
            continue
        if level == 3 and not d & fl.PTE_TYPE:
            continue  # reserved at level 3: the walker faults it
        if level < 3 and not p.block_ok(level):
            continue  # a block where the granule allows none: the walker faults it
        if len(page.leaves) >= limit:
            page.next = va
            return False
        size = 1 << shift
        page.leaves.append(Leaf(va, d & p.oa_mask & ~(size - 1), size, level, d))
    return True


def perms(leaf: Leaf, stage2: bool) -> int:
    """PERM_R/W/X a leaf grants (privileged-or-not ignored: the most it allows), from its
    own bits only (hierarchical table attributes are not folded in)."""
    d = leaf.desc
    if stage2:
        return ((fl.PERM_R if d & fl.PTE_S2AP_R else 0) | (fl.PERM_W if d & fl.PTE_S2AP_W else 0)
                | (0 if d & fl.PTE_S2_XN else fl.PERM_X))
    ro = bool(d & fl.PTE_AP2)
    xn = bool(d & fl.PTE_UXN) and bool(d & fl.PTE_PXN)
    return fl.PERM_R | (0 if ro else fl.PERM_W) | (0 if xn else fl.PERM_X)
