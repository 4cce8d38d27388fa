"""The host's side of a hidden stage 2 (SMMU function option ``host_s2``).

As a VMM with iommufd runs it on real hardware (QEMU's smmuv3 ``accel`` mode), the guest
sees a stage-1-only SMMU and the host owns stage 2: an IOAS mapping the guest's
physical addresses (IPA) onto host physical memory, and one io-pgtable per host paging
domain, which the SMMU walks under the guest's stage 1.

- :class:`HostMemory` -- the host's physical address space: the guest RAM the vfio-user
  client mapped (its DMA regions), *placed* by the host (``identity``: PA = the DMA
  address; ``reversed``: the 2 MiB chunks of every region in reverse order, so IPA -> PA
  is a page permutation and a walk that skipped stage 2 would reach the wrong memory),
  plus the host's own page-table pages, which no IOAS mapping may reach.
- :class:`HostPageTable` -- a VMSAv8-64 stage-2 table tree (4 KiB granule, 48-bit IPA)
  in those host pages: map / unmap (blocks split as io-pgtable-arm splits them) /
  iova_to_phys.
- :class:`HostIoas` -- the IOAS: areas (IPA, length, PA, prot); by default the guest RAM
  as vfio-user mapped it, followed as the client maps and unmaps; ``map`` / ``unmap``
  (IOMMU_IOAS_MAP / IOMMU_IOAS_UNMAP) keep every host page table in step.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory, MemoryRegion
from viommu_backend.smmuv3 import builders as b
from viommu_backend.smmuv3 import fields as fl
from viommu_backend.smmuv3.ste import S2Config

from .objects import DomainError, Ioas

PAGE = 1 << 12
CHUNK = 2 << 20  # placement granule of guest RAM in host memory
POOL_BASE = 0xF000_0000_0000  # host page-table pages (inside a 48-bit PA space)
POOL_CHUNK = 2 << 20
LAYOUTS = ("identity", "reversed")
_OA = fl.OA_MASK_48
_IA_BITS = 48


@dataclass(frozen=True)
class Area:
    """One IOAS mapping: IPA ``iova`` .. + ``length`` -> host PA ``pa``."""

    iova: int
    length: int
    pa: int
    prot: int
    auto: bool = False  # follows a vfio-user DMA region (the default map)

    @property
    def end(self) -> int:
        return self.iova + self.length

    def describe(self) -> dict[str, Any]:
        return {"iova": hex(self.iova), "length": hex(self.length), "pa": hex(self.pa),
                "readable": bool(self.prot & PROT_READ),
                "writable": bool(self.prot & PROT_WRITE), "auto": self.auto}


# -- host physical memory ------------------------------------------------------------------
class HostMemory:
    """Host physical memory: guest RAM placed by the host, and the host's table pages.

    ``source()`` is the vfio-user client's :class:`GuestMemory` (None without a client);
    :meth:`sync` rebuilds the placement when its regions changed and says what changed.
    ``space`` is the PA-addressed :class:`GuestMemory` the SMMU walks and DMA use."""

    def __init__(self, source: Callable[[], GuestMemory | None], layout: str = "identity"
                 ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"host RAM layout {layout!r}: one of {', '.join(LAYOUTS)}")
        self.layout = layout
        self.space = GuestMemory()
        self._source = source
        self._seen: tuple[int, int] | None = None
        self._placed: dict[MemoryRegion, list[tuple[int, int, int]]] = {}
        self._free: list[int] = []
        self._pool_next = POOL_BASE
        self.tables = 0  # table pages in use

    # -- placement -------------------------------------------------------------------------
    def placement(self, iova: int, size: int) -> list[tuple[int, int, int]]:
        """Where the host puts a DMA region: (ipa, pa, length) pieces (``reversed``: its
        2 MiB chunks in reverse order; a region under 4 MiB or not 2 MiB aligned stays
        where it is)."""
        if self.layout == "identity" or iova % CHUNK or size % CHUNK or size < 2 * CHUNK:
            return [(iova, iova, size)]
        n = size // CHUNK
        return [(iova + i * CHUNK, iova + (n - 1 - i) * CHUNK, CHUNK) for i in range(n)]

    def sync(self) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
        """Follow the client's DMA regions.  Returns (added pieces (ipa, pa, length, prot),
        removed regions (iova, size)); both empty when nothing changed."""
        src = self._source()
        key = None if src is None else (id(src), src.generation)
        if key == self._seen:
            return [], []
        self._seen = key
        now = [] if src is None else [r for r in src.regions if r.array is not None]
        removed = [r for r in self._placed if r not in now]
        for r in removed:
            for _, pa, ln in self._placed.pop(r):
                self.space.remove(pa, ln)
        added: list[tuple[int, int, int, int]] = []
        spans = []
        for r in now:
            if r in self._placed:
                continue
            pieces = self.placement(r.iova, r.size)
            self._placed[r] = pieces
            for ipa, pa, ln in pieces:
                off = ipa - r.iova
                spans.append((pa, r.array[off:off + ln], r.prot))  # type: ignore[index]
                added.append((ipa, pa, ln, r.prot))
        if spans:
            self.space.add_buffers(spans)
        return added, [(r.iova, r.size) for r in removed]

    def ram_pa(self, ipa: int, length: int) -> list[tuple[int, int, int]] | None:
        """The default PA pieces (ipa, pa, length) of guest RAM ``[ipa, ipa+length)``, or
        None when part of it is not guest RAM."""
        out = []
        for pieces in self._placed.values():
            for pi, pa, ln in pieces:
                lo, hi = max(ipa, pi), min(ipa + length, pi + ln)
                if lo < hi:
                    out.append((lo, pa + lo - pi, hi - lo))
        if sum(p[2] for p in out) != length:
            return None
        return sorted(out)

    def is_ram(self, pa: int, length: int) -> bool:
        """``[pa, pa+length)`` is guest RAM in host memory (not a host table page)."""
        return pa + length <= POOL_BASE and self.space.contains(pa, length)

    # -- table pages -----------------------------------------------------------------------
    def alloc_table(self) -> int:
        if not self._free:
            base = self._pool_next
            self._pool_next += POOL_CHUNK
            self.space.add_buffers([(base, np.zeros(POOL_CHUNK, np.uint8),
                                     PROT_READ | PROT_WRITE)])
            self._free = list(range(base + POOL_CHUNK - PAGE, base - 1, -PAGE))
        pa = self._free.pop()
        self.tables += 1
        return pa

    def free_table(self, pa: int) -> None:
        self.entries(pa)[:] = 0
        self._free.append(pa)
        self.tables -= 1

    def entries(self, table: int) -> np.ndarray:
        """The 512 descriptors of the table page at ``table`` (writable uint64 view)."""
        return self.space.ndarray(table, PAGE, "<u8")


# -- stage-2 io-pgtable --------------------------------------------------------------------
def _shift(level: int) -> int:
    return 12 + 9 * (3 - level)


def _leaf_bits(level: int, prot: int, dirty_tracking: bool) -> int:
    """A leaf's attributes; with dirty tracking a writable page starts writable-clean
    (S2AP W=0, DBM=1): the SMMU's HTTU marks it dirty on the first write."""
    write = bool(prot & PROT_WRITE)
    dbm = write and dirty_tracking
    return b.s2_leaf(0, level, read=bool(prot & PROT_READ), write=write and not dbm, dbm=dbm)


class HostPageTable:
    """A stage-2 table tree in host memory: 4 KiB granule, 48-bit IPA (start level 0)."""

    def __init__(self, mem: HostMemory, *, dirty_tracking: bool = False) -> None:
        self.mem = mem
        self.dirty_tracking = dirty_tracking
        self.root = mem.alloc_table()

    def s2config(self) -> S2Config:
        """The stage-2 parameters the SMMU walks this tree with.  VMID 0: the guest's
        TLB invalidations (VMID 0 for a stage-1-only SMMU) reach the nested entries.
        Dirty tracking: hardware dirty state updates (S2HD)."""
        hd = self.dirty_tracking
        return S2Config(vmid=0, granule_shift=12, t0sz=64 - _IA_BITS, sl0=2, start_level=0,
                        ps_bits=_IA_BITS, ttb=self.root, ha=hd, hd=hd)

    def map(self, iova: int, pa: int, length: int, prot: int) -> None:
        self._map(self.root, 0, iova, pa, iova + length, prot)

    def _map(self, table: int, level: int, iova: int, pa: int, end: int, prot: int) -> None:
        shift = _shift(level)
        size = 1 << shift
        ents = self.mem.entries(table)
        while iova < end:
            idx = (iova >> shift) & 511
            if level >= 1 and not (iova | pa) & (size - 1) and end - iova >= size:
                n = min((end - iova) >> shift, 512 - idx)
                pas = np.uint64(pa) + np.arange(n, dtype=np.uint64) * np.uint64(size)
                bits = _leaf_bits(level, prot, self.dirty_tracking)
                ents[idx:idx + n] = np.uint64(bits) | (pas & np.uint64(_OA))
                iova += n * size
                pa += n * size
                continue
            nxt = min(((iova >> shift) + 1) << shift, end)
            self._map(self._child(ents, idx, level), level + 1, iova, pa, nxt, prot)
            pa += nxt - iova
            iova = nxt

    def _child(self, ents: np.ndarray, idx: int, level: int) -> int:
        """The next-level table under ``ents[idx]``: existing, or new (a block there is
        split into the same mapping one level down)."""
        d = int(ents[idx])
        if d & 3 == 3:
            return d & _OA
        child = self.mem.alloc_table()
        if d & 1:  # a block: split it
            size = 1 << _shift(level + 1)
            attrs = (d & ~_OA & ~3) | (3 if level + 1 == 3 else 1)  # page or block
            pas = np.uint64(d & _OA) + np.arange(512, dtype=np.uint64) * np.uint64(size)
            self.mem.entries(child)[:] = np.uint64(attrs) | pas
        ents[idx] = b.table_desc(child)
        return child

    def unmap(self, iova: int, length: int) -> None:
        self._unmap(self.root, 0, iova, iova + length)

    def _unmap(self, table: int, level: int, iova: int, end: int) -> None:
        shift = _shift(level)
        size = 1 << shift
        ents = self.mem.entries(table)
        while iova < end:
            idx = (iova >> shift) & 511
            nxt = min(((iova >> shift) + 1) << shift, end)
            d = int(ents[idx])
            whole = not iova & (size - 1) and nxt - iova == size
            if d & 1 and whole:
                if level < 3 and d & 3 == 3:
                    self._free_tree(d & _OA, level + 1)
                ents[idx] = 0
            elif d & 1:
                child = self._child(ents, idx, level)
                self._unmap(child, level + 1, iova, nxt)
                if not self.mem.entries(child).any():
                    self.mem.free_table(child)
                    ents[idx] = 0
            iova = nxt

    def _free_tree(self, table: int, level: int) -> None:
        if level < 3:
            ents = self.mem.entries(table)
            for d in ents[(ents & np.uint64(3)) == np.uint64(3)].tolist():
                self._free_tree(int(d) & _OA, level + 1)
        self.mem.free_table(table)

    def free(self) -> None:
        self._free_tree(self.root, 0)

    def iova_to_phys(self, iova: int) -> int | None:
        table = self.root
        for level in range(4):
            shift = _shift(level)
            d = int(self.mem.entries(table)[(iova >> shift) & 511])
            if not d & 1:
                return None
            if level == 3 or d & 3 == 1:
                return (d & _OA & ~((1 << shift) - 1)) | (iova & ((1 << shift) - 1))
            table = d & _OA
        return None


# -- the IOAS ------------------------------------------------------------------------------
class HostIoas(Ioas):
    """The IOAS of a hidden stage 2: areas IPA -> host PA, mirrored into every host page
    table (iommufd's iopt filling each domain).  ``memory`` is host physical memory."""

    def __init__(self, obj_id: int, memory_provider: Callable[[], Any], layout: str = "identity"
                 ) -> None:
        super().__init__(obj_id, memory_provider)
        self.host = HostMemory(memory_provider, layout)
        self._areas: list[Area] = []
        self.tables: list[HostPageTable] = []

    @property
    def memory(self) -> GuestMemory:
        self.sync()
        return self.host.space

    def sync(self) -> None:
        """Follow the client's DMA regions: new guest RAM is mapped at its placement,
        guest RAM that went away is unmapped (with every area reaching it)."""
        added, removed = self.host.sync()
        for iova, size in removed:
            gone = [a for a in self._areas if a.iova < iova + size and iova < a.end
                    or a.pa < iova + size and iova < a.pa + a.length]
            for a in gone:
                self._drop(a.iova, a.length)
        if removed:
            self._unmapped()
        for ipa, pa, ln, prot in added:
            if not self._overlaps(ipa, ln):
                self._insert(Area(ipa, ln, pa, prot, auto=True))

    # -- table bookkeeping -----------------------------------------------------------------
    def new_table(self, *, dirty_tracking: bool = False) -> HostPageTable:
        """A page table for a new host paging domain, filled with every area."""
        self.sync()
        t = HostPageTable(self.host, dirty_tracking=dirty_tracking)
        for a in self._areas:
            t.map(a.iova, a.pa, a.length, a.prot)
        self.tables.append(t)
        return t

    def free_table(self, t: HostPageTable) -> None:
        self.tables.remove(t)
        t.free()

    def _overlaps(self, iova: int, length: int) -> bool:
        return any(a.iova < iova + length and iova < a.end for a in self._areas)

    def _insert(self, a: Area) -> None:
        bisect.insort(self._areas, a, key=lambda x: x.iova)
        for t in self.tables:
            t.map(a.iova, a.pa, a.length, a.prot)

    def _drop(self, iova: int, length: int) -> int:
        """Unmap ``[iova, iova+length)`` from the areas (splitting them) and the tables;
        returns the bytes that were mapped there."""
        end, done, keep = iova + length, 0, []
        for a in self._areas:
            lo, hi = max(a.iova, iova), min(a.end, end)
            if lo >= hi:
                keep.append(a)
                continue
            done += hi - lo
            if a.iova < lo:
                keep.append(Area(a.iova, lo - a.iova, a.pa, a.prot, a.auto))
            if hi < a.end:
                keep.append(Area(hi, a.end - hi, a.pa + hi - a.iova, a.prot, a.auto))
        if done:
            self._areas = sorted(keep, key=lambda x: x.iova)
            for t in self.tables:
                t.unmap(iova, length)
        return done

    # -- IOMMU_IOAS_MAP / IOMMU_IOAS_UNMAP -------------------------------------------------
    def map(self, iova: int, length: int, pa: int | None = None,  # type: ignore[override]
            prot: int = PROT_READ | PROT_WRITE) -> None:
        """Map IPA ``[iova, iova+length)`` to host PA ``pa`` (default: the guest RAM the
        host placed at that IPA).  Page aligned; over an existing area: EEXIST."""
        self.sync()
        _check_range(iova, length)
        if not prot & (PROT_READ | PROT_WRITE):
            raise DomainError("a mapping must allow reads or writes")
        if self._overlaps(iova, length):
            raise DomainError(f"{iova:#x}+{length:#x} overlaps a mapped area", "EEXIST")
        if pa is None:
            pieces = self.host.ram_pa(iova, length)
            if pieces is None:
                raise DomainError(f"{iova:#x}+{length:#x} is not guest RAM: give 'pa'",
                                  "EFAULT")
        else:
            if pa % PAGE or pa < 0:
                raise DomainError(f"pa {pa:#x} is not page aligned")
            if not self.host.is_ram(pa, length):
                raise DomainError(f"pa {pa:#x}+{length:#x} is not guest RAM in host memory",
                                  "EFAULT")
            pieces = [(iova, pa, length)]
        for ipa, p, ln in pieces:
            self._insert(Area(ipa, ln, p, prot))

    def unmap(self, iova: int, length: int) -> int:
        """Unmap IPA ``[iova, iova+length)`` (areas split as needed): the bytes that were
        mapped; ENOENT when none were."""
        self.sync()
        _check_range(iova, length)
        done = self._drop(iova, length)
        if not done:
            raise DomainError(f"nothing mapped in {iova:#x}+{length:#x}", "ENOENT")
        self._unmapped()
        return done

    def translate(self, ipa: int, write: bool = False) -> int | None:
        """The host PA the IOAS maps ``ipa`` to (allowing the access), or None."""
        self.sync()
        i = bisect.bisect_right(self._areas, ipa, key=lambda a: a.iova) - 1
        if i < 0:
            return None
        a = self._areas[i]
        if ipa >= a.end or not a.prot & (PROT_WRITE if write else PROT_READ):
            return None
        return a.pa + ipa - a.iova

    def _unmapped(self) -> None:
        for fn in list(self.on_unmap):
            fn(0, 1 << 64)

    def areas(self) -> list[dict[str, Any]]:
        self.sync()
        return [a.describe() for a in self._areas]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "layout": self.host.layout,
                "host-tables": self.host.tables}


def _check_range(iova: int, length: int) -> None:
    if iova < 0 or length <= 0 or (iova | length) % PAGE or iova + length > 1 << _IA_BITS:
        raise DomainError(f"{iova:#x}+{length:#x}: page-aligned, non-empty, below 2^{_IA_BITS}")
