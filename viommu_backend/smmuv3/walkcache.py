"""Walk caches: the intermediate (table) descriptors of stage-1 and stage-2 walks, per
level, kept until an invalidation that covers them (SMMU option ``cache = "aggressive"``).

An entry is keyed ``(tag, vmid, asid, stage, level, prefix)``: ``tag`` / ``vmid`` as the
TLB keys them (:mod:`.tlb`), ``asid`` the ASID of a stage-1 walk (``NO_ASID`` for stage
2: stage-2 walks are shared by every ASID of a VMID), ``stage`` "s1" / "s2", ``level`` the
level of the table descriptor and ``prefix`` the input address bits above that level's
span (``input >> shift``): the entry serves every input address in
``[prefix << shift, (prefix + 1) << shift)``.  It holds the descriptor's address and
value; a walk reads its table descriptors through :class:`CachedWalkMemory`, which answers
the cached addresses from the cache instead of memory (a table descriptor the guest
changed without invalidating keeps being used, as hardware may).

What each invalidation drops (SMMUv3 4.4, Arm ARM TLBI): non-leaf VA / IPA invalidations
(Leaf = 0) the entries of their VMID (and ASID, unless VAA) whose span overlaps the range;
leaf-only ones (Leaf = 1) nothing here; by ASID / VMID / all, every entry in their scope.
The TTL hint names the leaf level: it never spares a walk entry of a non-leaf
invalidation.

``capacity`` 0: unbounded; ``replacement`` as :class:`~.tlb.Cache` says.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Iterable

import numpy as np

from .tlb import EL2_VMID, NO_ASID, Cache

Ctx = tuple[Hashable, int, int]  # (tag, vmid, asid)
Key = tuple[Ctx, str, int, int, int]  # (ctx, stage, level, shift, prefix)
# walker.table_path: (stage, level, shift, input, descriptor address, descriptor)
PathStep = tuple[str, int, int, int, int, int]


class WalkCache(Cache):
    """Table descriptors of walks, per context, stage and level."""

    def __init__(self, capacity: int = 0, *, replacement: str = "lru") -> None:
        super().__init__(capacity, replacement)
        self._map: OrderedDict[Key, tuple[int, int]] = OrderedDict()
        # (ctx, stage) -> descriptor address -> [value, entries using it]
        self._addr: dict[tuple[Ctx, str], dict[int, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._map)

    # -- use / fill --------------------------------------------------------------------
    def overlay(self, tag: Hashable, vmid: int, asid: int) -> dict[int, int]:
        """Descriptor address -> cached value for a walk of ``(tag, vmid, asid)``: its
        stage-1 entries and the stage-2 entries of its VMID."""
        out: dict[int, int] = {}
        for ck in (((tag, vmid, NO_ASID), "s2"), ((tag, vmid, asid), "s1")):
            a = self._addr.get(ck)
            if a:
                out.update((addr, v[0]) for addr, v in a.items())
        return out

    def fill(self, tag: Hashable, vmid: int, asid: int, path: Iterable[PathStep]) -> None:
        """Record the table descriptors one walk read (:func:`walker.table_path`): those
        already cached count as hits (the walk took them from the cache), the others as
        misses, now cached."""
        for stage, level, shift, inp, daddr, value in path:
            ctx = (tag, vmid, asid if stage == "s1" else NO_ASID)
            key = (ctx, stage, level, shift, inp >> shift)
            old = self._map.get(key)
            if old is not None and old[0] == daddr:
                self.hits += 1
                if self.lru:
                    self._map.move_to_end(key)
                continue
            self.misses += 1
            if old is not None:
                self._unref(key, old[0])
            elif self.capacity and len(self._map) >= self.capacity:
                k, (a, _) = self._map.popitem(last=False)
                self._unref(k, a)
                self.evictions += 1
            self._map[key] = (daddr, value)
            slot = self._addr.setdefault((ctx, stage), {}).setdefault(daddr, [value, 0])
            slot[1] += 1

    def _unref(self, key: Key, daddr: int) -> None:
        ck = (key[0], key[1])
        a = self._addr[ck]
        slot = a[daddr]
        slot[1] -= 1
        if not slot[1]:
            del a[daddr]
            if not a:
                del self._addr[ck]

    # -- invalidation ------------------------------------------------------------------
    def _drop(self, pred: Callable[[Key], bool]) -> int:
        n = 0
        for k in [k for k in self._map if pred(k)]:
            ent = self._map.pop(k, None)
            if ent is None:
                continue  # gone with an alias
            self._unref(k, ent[0])
            n += 1
            # an address reached through another (aliased) entry goes too: invalidating
            # more than asked is allowed, serving a dropped entry is not
            for o in [o for o, e in self._map.items() if o[:2] == k[:2] and e[0] == ent[0]]:
                self._map.pop(o)
                self._unref(o, ent[0])
                n += 1
        self.invalidated += n
        return n

    def inv_all(self) -> int:
        return self._drop(lambda k: True)

    def inv_nsnh_all(self) -> int:
        """CMD_TLBI_NSNH_ALL: every non-EL2 entry."""
        return self._drop(lambda k: k[0][1] != EL2_VMID)

    def inv_vmid(self, vmid: int) -> int:
        """CMD_TLBI_S12_VMALL, CMD_TLBI_EL2_ALL (``EL2_VMID``): both stages of ``vmid``."""
        return self._drop(lambda k: k[0][1] == vmid)

    def inv_nh_all(self, vmid: int) -> int:
        """CMD_TLBI_NH_ALL: the stage-1 entries of ``vmid``."""
        return self._drop(lambda k: k[0][1] == vmid and k[1] == "s1")

    def inv_asid(self, asid: int, vmid: int) -> int:
        """CMD_TLBI_NH_ASID / EL2_ASID: the stage-1 entries of (vmid, asid)."""
        return self._drop(lambda k: k[0][1] == vmid and k[0][2] == asid and k[1] == "s1")

    def inv_va(self, start: int, length: int, *, vmid: int, asid: int | None,
               leaf: bool) -> int:
        """CMD_TLBI_NH_VA / NH_VAA (``asid`` None) / EL2_VA / EL2_VAA: with Leaf = 0 the
        stage-1 entries whose span overlaps ``[start, start + length)``."""
        if leaf:
            return 0
        end = start + max(length, 1)
        return self._drop(lambda k: k[1] == "s1" and k[0][1] == vmid
                          and (asid is None or k[0][2] == asid) and _overlaps(k, start, end))

    def inv_ipa(self, start: int, length: int, *, vmid: int, leaf: bool) -> int:
        """CMD_TLBI_S2_IPA: with Leaf = 0 the stage-2 entries of ``vmid`` whose span
        overlaps the IPA range."""
        if leaf:
            return 0
        end = start + max(length, 1)
        return self._drop(lambda k: k[1] == "s2" and k[0][1] == vmid
                          and _overlaps(k, start, end))

    def inv_tag(self, tag: Hashable) -> int:
        return self._drop(lambda k: k[0][0] == tag)


def _overlaps(k: Key, start: int, end: int) -> bool:
    shift, prefix = k[3], k[4]
    lo = prefix << shift
    return lo < end and start < lo + (1 << shift)


class CachedWalkMemory:
    """Guest memory as a walk with cached table descriptors sees it: the addresses of
    ``overlay`` read their cached value, everything else (and every write) goes to
    ``mem``.  Offers what the walker uses: ``read_u64``, ``u64_window``,
    ``gather_u64``, ``update_u64``."""

    def __init__(self, mem, overlay: dict[int, int]) -> None:
        self.mem = mem
        self.overlay = overlay
        self._addrs = np.array(sorted(overlay), dtype=np.uint64)
        self._vals = np.array([overlay[int(a)] for a in self._addrs], dtype=np.uint64)

    def read_u64(self, addr: int) -> int:
        v = self.overlay.get(addr)
        return self.mem.read_u64(addr) if v is None else v

    def update_u64(self, addr: int, expected: int, new: int) -> bool:
        return self.mem.update_u64(addr, expected, new)  # leaf descriptors: never cached

    def u64_window(self, lo: int, hi: int) -> tuple[np.ndarray, int] | None:
        win = self.mem.u64_window(lo, hi)
        if win is None:
            return None
        i, j = np.searchsorted(self._addrs, [lo, hi])
        if i == j:
            return win
        if lo & 7:
            return None  # (the walker then gathers)
        words, base = win
        sub = words[(lo - base) >> 3:(hi - base + 7) >> 3].copy()
        sub[((self._addrs[i:j] - np.uint64(lo)) >> np.uint64(3)).astype(np.int64)] = \
            self._vals[i:j]
        return sub, lo

    def gather_u64(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vals, ok = self.mem.gather_u64(addrs)
        a = np.asarray(addrs, dtype=np.uint64).reshape(-1)
        pos = np.searchsorted(self._addrs, a)
        pos[pos >= len(self._addrs)] = 0
        hit = self._addrs[pos] == a if len(self._addrs) else np.zeros(len(a), bool)
        if hit.any():
            vals = vals.copy()
            vals[hit] = self._vals[pos[hit]]
            ok = ok | hit
        return vals, ok
