"""Translation cache (TLB) and CD cache with SMMUv3 invalidation semantics.

The TLB holds leaf translations only (the walk caches are :mod:`.walkcache`): the TLBI
``Leaf`` flag does not matter to it; the ``TTL`` hint (the leaf's level) lets an entry at
another level survive only when ``architectural`` (otherwise invalidating more than asked,
which is always allowed).

Entries live in contexts ``(tag, vmid, asid)``: ``tag`` is an opaque tag chosen by
the caller (a domain id, or the StreamWorld as the architecture keys entries), ``vmid`` the
VMID (``EL2_VMID`` for the EL2/E2H regime, 0 for NS-EL1 stage-1 only streams) and ``asid``
the ASID (``NO_ASID`` for stage-2-only entries).  ``architectural`` keeps entries exactly
as long as the architecture lets them live: a global stage-1 entry (nG == 0) lives in the
context ``(tag, vmid, GLOBAL_ASID)`` and hits for every ASID of its VMID, and
CMD_TLBI_S2_IPA drops stage-2-only entries, not combined nested ones (software invalidates
those by VMID / ASID after changing a stage 2, as Linux does for a nesting parent).

``capacity`` 0: unbounded (an entry stays until an invalidation covers it).
``replacement``: "lru" (a hit refreshes the entry) or "fifo" (the oldest fill goes first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterator, Sequence

import numpy as np

EL2_VMID = -1
NO_ASID = -1
GLOBAL_ASID = -2  # the context of global stage-1 entries (architectural)

# CMD_TLBI_* range encoding: TG -> granule bytes
_TG_BYTES = {1: 1 << 12, 2: 1 << 14, 3: 1 << 16}


def tlbi_range(addr: int, num: int = 0, scale: int = 0, tg: int = 0, ttl: int = 0
               ) -> tuple[int, int]:
    """Turn a TLBI command's address fields into ``(start, length)``.

    ``tg == 0``: a single-address invalidation: every entry containing ``addr`` (length 1).
    Otherwise (range invalidation, SMMUv3.2 RIL): ``(NUM+1) * 2^SCALE`` granules of ``TG``
    starting at ``addr`` aligned down to the granule.  ``ttl`` is a hint only."""
    del ttl
    if tg == 0:
        return addr, 1
    gran = _TG_BYTES[tg]
    start = addr & ~(gran - 1)
    return start, (num + 1) * (1 << scale) * gran


@dataclass(slots=True)
class TlbEntry:
    va: int  # input page/block base
    size: int
    pa: int  # output base
    perm: int
    level: int
    global_: bool
    stage: str  # "s1", "s2" or "nested"
    ipa: int  # intermediate base (nested) or input base (s2); -1 when none

    def translate(self, addr: int) -> int:
        return self.pa | (addr & (self.size - 1))


Ctx = tuple[Hashable, int, int]
Key = tuple[Ctx, int, int]  # (context, log2 of the entry size, iova >> that)


class Cache:
    """What every cache of the caching model has: a capacity (0: unbounded), the
    replacement policy ("lru": a use refreshes an entry, "fifo": the oldest fill goes
    first) and the counters ``query-viommu`` shows."""

    def __init__(self, capacity: int, replacement: str) -> None:
        self.capacity = capacity
        self.lru = replacement == "lru"
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.invalidated = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "capacity": self.capacity, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions,
                "invalidated": self.invalidated}


# sizes one entry may take for a run of pages that continue one another (largest first)
RUN_SIZES = (1 << 21, 1 << 20, 1 << 16)


def _run_lengths(va: np.ndarray, size: np.ndarray, pa: np.ndarray, ipa: np.ndarray | None,
                 perm: np.ndarray, level: np.ndarray, glob: np.ndarray) -> list[int]:
    """Per page (sorted, distinct): how many pages from it on continue one another (the
    next at the next input, output and intermediate address, alike in size, permissions,
    level and global bit), itself included."""
    n = len(va)
    cont = np.zeros(n, dtype=bool)  # cont[k]: page k continues page k - 1
    if n > 1:
        cont[1:] = ((size[1:] == size[:-1]) & (va[1:] == va[:-1] + size[:-1])
                    & (pa[1:] == pa[:-1] + size[:-1]) & (perm[1:] == perm[:-1])
                    & (level[1:] == level[:-1]) & (glob[1:] == glob[:-1]))
        if ipa is not None:
            cont[1:] &= ipa[1:] == ipa[:-1] + size[:-1]
    starts = np.flatnonzero(~cont)
    ends = np.append(starts[1:], n)
    run_id = np.cumsum(~cont) - 1
    return (ends[run_id] - np.arange(n)).tolist()


class TLB(Cache):
    """Translation cache (bounded LRU / FIFO, or unbounded)."""

    def __init__(self, capacity: int = 8192, *, replacement: str = "lru",
                 architectural: bool = False) -> None:
        super().__init__(capacity, replacement)
        self.architectural = architectural
        self._map: OrderedDict[tuple[Ctx, int, int], TlbEntry] = OrderedDict()
        self._ctx: dict[Ctx, set[tuple[int, int]]] = {}
        # per context: [stage-2 entries, global stage-1 entries] -- the ones that survive
        # TLBI_NH_ALL / TLBI_NH_ASID; a context with none is dropped whole, not scanned
        self._keep: dict[Ctx, list[int]] = {}
        self._shifts: list[int] = []

    def __len__(self) -> int:
        return len(self._map)

    # -- lookup / fill ---------------------------------------------------------------
    def lookup(self, tag: Hashable, vmid: int, asid: int, iova: int) -> TlbEntry | None:
        return self._use(self.find(tag, vmid, asid, iova))

    def _use(self, found: tuple[Key, TlbEntry] | None) -> TlbEntry | None:
        """Count a lookup's hit or miss (and refresh what it hit, "lru")."""
        if found is None:
            self.misses += 1
            return None
        key, e = found
        if self.lru:
            self._map.move_to_end(key)
        self.hits += 1
        return e

    def lookup_runs(self, tag: Hashable, vmid: int, asid: int, pages: list[int]
                    ) -> list[tuple[TlbEntry | None, int]]:
        """:meth:`lookup` of each 4 KiB page number of ``pages`` (ascending), as runs of
        consecutive pages with the same result: (entry or None, how many pages).  A page
        inside the entry the page before it hit is served by that entry without a lookup
        of its own (and counts as a hit all the same), and a (context, size) slot already
        probed in vain for the same number is not probed again."""
        m, shifts, ctxs = self._map, self._shifts, self._probed(tag, vmid, asid)
        missed = [-1] * (len(ctxs) * len(shifts))  # per slot: the number last missed
        runs: list[tuple[TlbEntry | None, int]] = []
        last: TlbEntry | None = None
        last_end, count, served = -1, 0, 0
        for pg in pages:
            addr = pg << 12
            if last is not None and addr < last_end:
                served += 1
                count += 1
                continue
            found, slot = None, 0
            for ctx in ctxs:
                for sh in shifts:
                    vpn = addr >> sh
                    if missed[slot] != vpn:
                        key = (ctx, sh, vpn)
                        e = m.get(key)
                        if e is not None:
                            found = key, e
                            break
                        missed[slot] = vpn
                    slot += 1
                if found is not None:
                    break
            e = self._use(found)
            if e is None and last is None and count:
                count += 1  # another miss
                continue
            if count:
                runs.append((last, count))
            last, last_end, count = (e, e.va + e.size, 1) if e is not None else (None, -1, 1)
        if count:
            runs.append((last, count))
        self.hits += served
        return runs

    def _probed(self, tag: Hashable, vmid: int, asid: int) -> tuple[Ctx, ...]:
        """The contexts a lookup for (tag, vmid, asid) probes, in order: its own, then
        (``architectural``) its VMID's global entries, which hit for every ASID."""
        mine: Ctx = (tag, vmid, asid)
        if self.architectural and asid != NO_ASID:
            return mine, (tag, vmid, GLOBAL_ASID)
        return (mine,)

    def find(self, tag: Hashable, vmid: int, asid: int, iova: int
             ) -> tuple[Key, TlbEntry] | None:
        """The entry translating ``iova`` and its key, without counting or refreshing
        anything (:meth:`lookup` is the SMMU's use of the TLB)."""
        m = self._map
        for ctx in self._probed(tag, vmid, asid):
            for sh in self._shifts:
                key = (ctx, sh, iova >> sh)
                e = m.get(key)
                if e is not None:
                    return key, e
        return None

    def held(self, found: Sequence[tuple[Key, TlbEntry]]) -> bool:
        """Are these entries (from :meth:`find`) all still cached -- no invalidation,
        eviction or refill replaced any?  If so each counts as a hit (and is refreshed,
        "lru"), as the lookups they stand for would."""
        m = self._map
        n = 0
        for key, e in found:
            if m.get(key) is not e:
                return False
            n += 1
        if self.lru:
            for key, _ in found:
                m.move_to_end(key)
        self.hits += n
        return True

    def insert(self, tag: Hashable, vmid: int, asid: int, iova: int, pa: int, size: int,
               perm: int, level: int = 3, global_: bool = False, stage: str = "s1",
               ipa: int = -1) -> TlbEntry:
        sh = size.bit_length() - 1
        if size != 1 << sh:
            raise ValueError(f"size {size:#x} not a power of two")
        if global_ and self.architectural and stage != "s2":
            asid = GLOBAL_ASID
        ctx = (tag, vmid, asid)
        mask = size - 1
        e = TlbEntry(iova & ~mask, size, pa & ~mask, perm, level, global_, stage,
                     ipa & ~mask if ipa >= 0 else -1)
        key = (ctx, sh, iova >> sh)
        old = self._map.get(key)
        if old is not None:
            self._map.move_to_end(key)
            self._count(ctx, old, -1)
        elif self.capacity and len(self._map) >= self.capacity:
            old_key, old_e = self._map.popitem(last=False)
            self._count(old_key[0], old_e, -1)
            self._ctx_discard(old_key)
            self.evictions += 1
        self._map[key] = e
        bucket = self._ctx.get(ctx)
        if bucket is None:  # (no set built per insert: this runs for every walk)
            bucket = self._ctx[ctx] = set()
        bucket.add((sh, iova >> sh))
        self._count(ctx, e, 1)
        if sh not in self._shifts:
            self._shifts.append(sh)
            self._shifts.sort()
        return e

    def insert_results(self, tag: Hashable, vmid: int, asid: int, iovas: np.ndarray,
                       res, stage: str = "s1") -> int:
        """Fill from a WalkResult: an entry per distinct translated page, except that a
        run of pages continuing one another in input, output (and intermediate) address
        with the same size, permissions, level and global bit fills entries of the
        :data:`RUN_SIZES` it covers aligned in every address: larger cached
        translations, each dropped whole by an invalidation of any of its pages (an SMMU
        may always invalidate more than asked).  Returns the entries filled."""
        ok = np.flatnonzero(res.fault == 0)
        if not len(ok):
            return 0
        size = res.page_size[ok]
        va = iovas[ok] & ~(size - np.uint64(1))
        order = np.lexsort((size, va))  # by address, then size; each page once
        va, size, pick = va[order], size[order], ok[order]
        first = np.ones(len(pick), dtype=bool)
        first[1:] = (va[1:] != va[:-1]) | (size[1:] != size[:-1])
        va, size, pick = va[first], size[first], pick[first]
        mask = ~(size - np.uint64(1))
        pa = res.pa[pick] & mask
        ipa = res.ipa[pick] & mask if stage == "nested" else va if stage == "s2" else None
        perm_a, level_a, glob_a = res.perm[pick], res.level[pick], res.global_[pick]
        run_len = _run_lengths(va, size, pa, ipa, perm_a, level_a, glob_a)
        va_l, size_l, pa_l = va.tolist(), size.tolist(), pa.tolist()
        perm, level, glob = perm_a.tolist(), level_a.tolist(), glob_a.tolist()
        ipa_l = ipa.tolist() if ipa is not None else None
        filled, k, n = 0, 0, len(va_l)
        while k < n:
            pages, page = run_len[k], size_l[k]
            step = 1
            for run in RUN_SIZES:  # the largest entry starting here that the run covers
                if run > page and run <= pages * page and not (
                        va_l[k] | pa_l[k] | (ipa_l[k] if ipa_l is not None else 0)) & (run - 1):
                    step = run // page
                    break
            self.insert(tag, vmid, asid, va_l[k], pa_l[k], page * step, perm[k], level[k],
                        glob[k], stage, ipa_l[k] if ipa_l is not None else -1)
            filled += 1
            k += step
        return filled

    # -- invalidation ------------------------------------------------------------------
    def _count(self, ctx: Ctx, e: TlbEntry, d: int) -> None:
        if e.stage == "s2":
            self._keep.setdefault(ctx, [0, 0])[0] += d
        elif e.global_:
            self._keep.setdefault(ctx, [0, 0])[1] += d

    def _ctx_discard(self, key: tuple[Ctx, int, int]) -> None:
        ctx, sh, vpn = key
        s = self._ctx.get(ctx)
        if s is not None:
            s.discard((sh, vpn))
            if not s:
                del self._ctx[ctx]
                self._keep.pop(ctx, None)

    def _drop(self, keys: list[tuple[Ctx, int, int]]) -> int:
        for k in keys:
            e = self._map.pop(k, None)
            if e is not None:
                self._count(k[0], e, -1)
                self._ctx_discard(k)
                self.invalidated += 1
        return len(keys)

    def _drop_ctx(self, ctx: Ctx) -> int:
        """Drop every entry of ``ctx`` (no per-entry test)."""
        bucket = self._ctx.pop(ctx, None)
        self._keep.pop(ctx, None)
        if not bucket:
            return 0
        m = self._map
        if len(bucket) == len(m):  # the only context: nothing else to keep
            m.clear()
        else:
            for sh, vpn in bucket:
                del m[(ctx, sh, vpn)]
        self.invalidated += len(bucket)
        return len(bucket)

    def _drop_ctxs(self, ctxs: Iterator[Ctx]) -> int:
        """Drop every entry of every context in ``ctxs``."""
        return sum(self._drop_ctx(c) for c in list(ctxs))

    def _drop_unless(self, ctxs: Iterator[Ctx], survivors: tuple[int, ...], pred) -> int:
        """Drop the entries of ``ctxs`` matching ``pred``.  ``survivors`` names the
        ``_keep`` counts of the entries ``pred`` spares (0: stage 2, 1: global stage 1):
        a context holding none of them goes whole, without a per-entry test."""
        n = 0
        for ctx in list(ctxs):
            k = self._keep.get(ctx)
            if k is None or not any(k[i] for i in survivors):
                n += self._drop_ctx(ctx)
            else:
                n += self._where([ctx], pred)
        return n

    def _ctxs(self, vmid: int | None = None, asid: int | None = None,
              tag: Hashable | None = None) -> Iterator[Ctx]:
        for ctx in list(self._ctx):
            if tag is not None and ctx[0] != tag:
                continue
            if vmid is not None and ctx[1] != vmid:
                continue
            if asid is not None and ctx[2] != asid:
                continue
            yield ctx

    def _where(self, ctxs, pred) -> int:
        keys = []
        for ctx in ctxs:
            for sh, vpn in list(self._ctx.get(ctx, ())):
                k = (ctx, sh, vpn)
                if pred(self._map[k]):
                    keys.append(k)
        return self._drop(keys)

    def inv_all(self) -> int:
        """CMD_TLBI_NSNH_ALL-like full flush (everything)."""
        n = len(self._map)
        self.invalidated += n
        self._map.clear()
        self._ctx.clear()
        self._keep.clear()
        return n

    def inv_nsnh_all(self) -> int:
        """CMD_TLBI_NSNH_ALL: every non-EL2 entry (S1, S2, nested)."""
        return self._drop_ctxs(c for c in self._ctxs() if c[1] != EL2_VMID)

    def inv_nh_all(self, vmid: int) -> int:
        """CMD_TLBI_NH_ALL: all stage-1 (incl. nested) entries of ``vmid``."""
        return self._drop_unless(self._ctxs(vmid=vmid), (0,), lambda e: e.stage != "s2")

    def inv_vmid(self, vmid: int) -> int:
        """CMD_TLBI_S12_VMALL: all entries (both stages) of ``vmid``."""
        return self._drop_ctxs(self._ctxs(vmid=vmid))

    def inv_asid(self, asid: int, vmid: int) -> int:
        """CMD_TLBI_NH_ASID: non-global stage-1 entries of (vmid, asid)."""
        return self._drop_unless(self._ctxs(vmid=vmid, asid=asid), (0, 1),
                                 lambda e: e.stage != "s2" and not e.global_)

    def inv_el2_all(self) -> int:
        """CMD_TLBI_EL2_ALL."""
        return self._drop_ctxs(self._ctxs(vmid=EL2_VMID))

    def inv_el2_asid(self, asid: int) -> int:
        """CMD_TLBI_EL2_ASID."""
        return self.inv_asid(asid, EL2_VMID)

    def _hinted(self, ttl: int) -> int:
        """The leaf level a TTL hint names (range form only, see :func:`tlbi_range`),
        honoured when ``architectural`` (an entry at another level need not go); else 0."""
        return ttl if self.architectural else 0

    def inv_va(self, start: int, length: int = 1, *, vmid: int, asid: int | None = None,
               leaf: bool = False, ttl: int = 0) -> int:
        """CMD_TLBI_NH_VA (``asid`` given: that ASID's entries and global ones) and
        CMD_TLBI_NH_VAA (``asid=None``: any ASID); EL2_VA/VAA with ``vmid=EL2_VMID``.
        Removes stage-1 entries overlapping ``[start, start+length)`` (at the TTL level
        when hinted)."""
        del leaf  # only leaf entries are cached here (walk caches: .walkcache)
        end = start + max(length, 1)
        ctxs = list(self._ctxs(vmid=vmid))
        lvl = self._hinted(ttl)

        def pred(e: TlbEntry) -> bool:
            return e.stage != "s2" and e.va < end and start < e.va + e.size \
                and (not lvl or e.level == lvl)

        keys = []
        for ctx in ctxs:
            exact = asid is None or ctx[2] == asid
            bucket = self._ctx.get(ctx, ())
            probes = sum(((end - 1) >> sh) - (start >> sh) + 1 for sh in self._shifts)
            if probes < len(bucket):  # a key lookup costs less than a scanned entry's test
                cand = [(ctx, sh, vpn) for sh in self._shifts
                        for vpn in range(start >> sh, ((end - 1) >> sh) + 1)
                        if (sh, vpn) in bucket]
            else:
                cand = [(ctx, sh, vpn) for sh, vpn in bucket]
            for k in cand:
                e = self._map[k]
                if pred(e) and (exact or e.global_):
                    keys.append(k)
        return self._drop(keys)

    def inv_ipa(self, start: int, length: int = 1, *, vmid: int, leaf: bool = False,
                ttl: int = 0) -> int:
        """CMD_TLBI_S2_IPA: stage-2 entries of ``vmid`` whose IPA overlaps the range (not
        ``architectural``: also combined nested entries built from it, over-invalidation
        being allowed), at the TTL level when hinted."""
        del leaf
        end = start + max(length, 1)
        kept = ("s1", "nested") if self.architectural else ("s1",)
        lvl = self._hinted(ttl)
        return self._where(self._ctxs(vmid=vmid),
                           lambda e: e.stage not in kept and e.ipa >= 0 and e.ipa < end
                           and start < e.ipa + e.size and (not lvl or e.level == lvl))

    def inv_tag(self, tag: Hashable) -> int:
        """Drop every entry of one domain tag (domain freed / replaced)."""
        return self._drop_ctxs(self._ctxs(tag=tag))


class CdCache(Cache):
    """Decoded context descriptors keyed as the architecture keys them, (StreamID,
    SubstreamID), invalidated by CMD_CFGI_CD / CFGI_CD_ALL / CFGI_STE(_RANGE) / CFGI_ALL."""

    def __init__(self, capacity: int = 0, *, replacement: str = "lru") -> None:
        super().__init__(capacity, replacement)
        self._cd: OrderedDict[tuple[int, int | None], object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cd)

    def get(self, sid: int, ssid: int | None, *, count: bool = True) -> object | None:
        """The cached CD; ``count=False`` (probes): no counter, no refresh."""
        key = (sid, ssid)
        v = self._cd.get(key)
        if not count:
            return v
        if v is None:
            self.misses += 1
            return None
        if self.lru:
            self._cd.move_to_end(key)
        self.hits += 1
        return v

    def put(self, sid: int, ssid: int | None, cfg: object) -> None:
        self._cd[(sid, ssid)] = cfg
        while self.capacity and len(self._cd) > self.capacity:
            self._cd.popitem(last=False)
            self.evictions += 1

    def _drop(self, keys: list[tuple[int, int | None]]) -> None:
        for k in keys:
            if self._cd.pop(k, None) is not None:
                self.invalidated += 1

    def inv_cd(self, sid: int, ssid: int) -> None:
        """CMD_CFGI_CD: the CD of (sid, ssid) (ssid 0 also serves no-PASID traffic)."""
        self._drop([(sid, ssid)] + ([(sid, None)] if ssid == 0 else []))

    def inv_sid(self, sid: int) -> None:
        """CMD_CFGI_CD_ALL, CMD_CFGI_STE: every CD of ``sid``."""
        self._drop([k for k in self._cd if k[0] == sid])

    def inv_all(self) -> None:
        """CMD_CFGI_ALL."""
        self._drop(list(self._cd))
