"""The Address Translation Cache of an ATS endpoint (PCIe ATS, SMMUv3 CMD_ATC_INV).

An endpoint whose ATS capability is enabled, on a stream whose STE allows ATS
(``STE.EATS`` != 0), asks the SMMU for translations and keeps them: its later DMA to
those pages is not translated by the SMMU at all.  Only an ATC invalidation removes
them -- a TLBI does not -- so a driver that unmaps and forgets ``CMD_ATC_INV`` leaves
the endpoint writing to the old page, as real hardware would.

Entries are per SubstreamID (``None``: requests without PASID).  An invalidation
*without* a SubstreamID removes the range for every SubstreamID; with one, that
SubstreamID's entries (every SubstreamID's when ``global_``).  Invalidating more than
asked is allowed, so both rules err on the wide side.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SHIFT = 12


@dataclass(slots=True)
class AtcEntry:
    va: int  # input base (aligned to size)
    size: int
    pa: int  # output base
    perm: int

    def translate(self, addr: int) -> int:
        return self.pa | (addr & (self.size - 1))


class ATC:
    """One endpoint's translation cache: (ssid, size shift, page number) -> entry."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._map: dict[tuple[int | None, int, int], AtcEntry] = {}
        self._shifts: list[int] = []
        self.hits = 0
        self.misses = 0
        self.invalidated = 0
        self.invalidations = 0  # ATC_INV commands that reached this endpoint

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, ssid: int | None, addr: int) -> AtcEntry | None:
        for sh in self._shifts:
            e = self._map.get((ssid, sh, addr >> sh))
            if e is not None:
                self.hits += 1
                return e
        self.misses += 1
        return None

    def insert(self, ssid: int | None, addr: int, pa: int, size: int, perm: int) -> None:
        sh = size.bit_length() - 1
        if size != 1 << sh or sh < PAGE_SHIFT:
            raise ValueError(f"ATC entry size {size:#x} is not a power of two >= 4 KiB")
        if len(self._map) >= self.capacity:
            del self._map[next(iter(self._map))]  # oldest first
        mask = size - 1
        self._map[(ssid, sh, addr >> sh)] = AtcEntry(addr & ~mask, size, pa & ~mask, perm)
        if sh not in self._shifts:
            self._shifts.append(sh)
            self._shifts.sort()

    def invalidate(self, ssid: int | None, addr: int, size: int, global_: bool = False) -> int:
        """CMD_ATC_INV: drop the entries overlapping ``[addr, addr+size)`` (see the module
        docstring for which SubstreamIDs); returns how many."""
        self.invalidations += 1
        end = addr + max(size, 1)
        every = ssid is None or global_
        gone = [k for k, e in self._map.items()
                if (every or k[0] == ssid) and e.va < end and addr < e.va + e.size]
        for k in gone:
            del self._map[k]
        self.invalidated += len(gone)
        return len(gone)

    def clear(self) -> int:
        """ATS disabled or the function reset: every entry goes."""
        n = len(self._map)
        self._map.clear()
        self.invalidated += n
        return n

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._map), "hits": self.hits, "misses": self.misses,
                "invalidations": self.invalidations, "invalidated": self.invalidated}
