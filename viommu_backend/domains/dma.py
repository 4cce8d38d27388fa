"""Endpoint DMA into guest RAM through the SMMU: a buffer (or a list of buffers, e.g. a
descriptor chain's segments) translated into physically contiguous runs (scalar
``translate_one`` per page for short buffers, one batched ``translate`` for all pages of
long ones), then read or written; a fault raises :class:`DmaFault` (with the stalled
transaction, if any) and nothing is written unless the whole buffer translates and lies
in guest RAM (host memory under a hidden stage 2).  ``views`` hands out zero-copy
memoryviews of the translated memory instead (for preadv/pwritev straight between a file
and guest memory).  :class:`Dma` does it for one :class:`~.manager.DomainManager`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .results import PAGE, DmaFault, fault_name

if TYPE_CHECKING:
    from viommu_backend.memory import MemoryRegion

    from .manager import DomainManager
    from .translation import Pin

_BATCH_PAGES = 8  # DMA spanning more pages than this translates in one batch
_U12 = np.uint64(12)
_PMASK = np.uint64(PAGE - 1)
_LIMIT = 1 << 64


def _pieces(addrs: list[int], lens: list[int], npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the ranges (``addrs``, ``lens``; lengths > 0, ``npages`` pages in all) into
    per-page pieces: (start iova uint64, length int64) arrays, in order; the first piece
    of a range keeps its page offset."""
    a = np.array(addrs, dtype=np.uint64)
    n = np.array(lens, dtype=np.int64)
    if npages == len(addrs):  # every range inside one page (a scatterlist of pages)
        return a, n
    end = a + n.astype(np.uint64)
    first = a >> _U12
    cnt = (((end - np.uint64(1)) >> _U12) - first).astype(np.int64) + 1
    if len(addrs) == 1:
        starts = (first[0] + np.arange(npages, dtype=np.uint64)) << _U12
        starts[0] = a[0]
        ends = np.minimum(starts - (starts & _PMASK) + np.uint64(PAGE), end[0])
    else:
        rep = np.repeat(np.arange(len(addrs)), cnt)
        begin = np.cumsum(cnt) - cnt
        k = (np.arange(npages, dtype=np.int64) - begin[rep]).astype(np.uint64)
        starts = (first[rep] + k) << _U12
        starts[begin] = a  # the first piece of each range starts at the range's address
        ends = np.minimum(starts - (starts & _PMASK) + np.uint64(PAGE), end[rep])
    return starts, (ends - starts).astype(np.int64)


def _coalesce(pa: list[int], ln: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    cur_pa, cur_ln = -1, 0
    for p, n in zip(pa, ln):
        if cur_pa + cur_ln == p and cur_ln:
            cur_ln += n
        else:
            if cur_ln:
                runs.append((cur_pa, cur_ln))
            cur_pa, cur_ln = p, n
    if cur_ln:
        runs.append((cur_pa, cur_ln))
    return runs


class PinnedView:
    """Guest memory behind ``[iova, iova + size)`` of one stream, reached without a
    translation for as long as translating it again would give the same memory: the
    translation's :class:`~.translation.Pin` holds (see
    :meth:`~.translation.Translator.pin_valid`) and neither the memory DMA reaches nor
    the guest's memory map changed (their ``generation``).  :meth:`get` answers per
    access with a fresh view for the caller to drop after it; the region, not a view,
    is kept, so an unmapped region's mapping and fd are not held.  Once :meth:`get`
    answers None the pin is dropped for good (the endpoint translates the ordinary way,
    which reports any fault, and pins again)."""

    __slots__ = ("_dma", "_pin", "_mems", "_gens", "_write", "_region", "_off")

    def __init__(self, dma: "Dma", pin: "Pin", mems: tuple[Any, ...], region: MemoryRegion,
                 off: int, write: bool) -> None:
        self._dma = dma
        self._pin = pin
        self._mems = mems
        self._gens = tuple(m.generation for m in mems)
        self._write = write
        self._region: MemoryRegion | None = region
        self._off = off

    def get(self, n: int) -> memoryview | None:
        """A view of the range, for an access of ``n`` bytes (counted as a DMA), or None
        when the pin no longer holds."""
        region = self._region
        if region is None:
            return None
        dma = self._dma
        v = region.view if self._write else region.ro_view
        if v is None or tuple(m.generation for m in self._mems) != self._gens \
                or not dma.mgr.translator.pin_valid(self._pin):
            self._region = None
            return None
        dma._count(self._pin.ssid, self._write, n)
        return v[self._off:self._off + self._pin.size]


class Dma:
    """Endpoint DMA of one manager (its translator, its memory, its counters)."""

    def __init__(self, mgr: DomainManager) -> None:
        self.mgr = mgr

    def _translate_runs(self, sid: int, ssid: int | None, ranges: Iterable[tuple[int, int]],
                        write: bool) -> tuple[list[tuple[int, int]] | zip, int]:
        """(runs, total bytes): see :meth:`runs_multi` (runs may be a one-shot zip)."""
        addrs: list[int] = []
        lens: list[int] = []
        npages = total = 0
        for a, n in ranges:
            if n > 0:
                end = a + n
                if a < 0 or end > _LIMIT:
                    raise DmaFault("F_TRANSLATION", sid, ssid, a, write)
                addrs.append(a)
                lens.append(n)
                total += n
                npages += ((end - 1) >> 12) - (a >> 12) + 1
        if not addrs:
            return [], 0
        mgr = self.mgr
        if npages > _BATCH_PAGES and not (mgr.ats_probes and mgr.ats_active(mgr.device(sid))):
            return self._batched(sid, ssid, addrs, lens, npages, total, write), total
        pas: list[int] = []
        lns: list[int] = []
        for a, n in zip(addrs, lens):
            end = a + n
            while a < end:
                t = mgr.translator.translate_one(sid, ssid, a, write)
                if t.fault:
                    raise DmaFault(fault_name(t.fault) or "", sid, ssid, a, write,
                                   mgr.faults.stall_for(sid, a))
                size = t.page_size or PAGE
                nxt = min((a | (size - 1)) + 1, end)
                pas.append(t.pa)
                lns.append(nxt - a)
                a = nxt
        return _coalesce(pas, lns), total

    def _batched(self, sid: int, ssid: int | None, addrs: list[int], lens: list[int],
                 npages: int, total: int, write: bool) -> list[tuple[int, int]] | zip:
        """All pages translated in one batch (an ATS endpoint goes page by page)."""
        mgr = self.mgr
        starts, plens = _pieces(addrs, lens, npages)
        r = mgr.translator.translate(sid, ssid, starts, write)
        if r.fault.any():
            i = int(np.flatnonzero(r.fault)[0])
            raise DmaFault(r.fault_name(i) or "", sid, ssid, int(starts[i]), write,
                           mgr.faults.stall_for(sid, int(starts[i])))
        pa = r.pa.astype(np.int64)
        # coalesce physically contiguous pieces with numpy
        brk = np.flatnonzero(pa[1:] != pa[:-1] + plens[:-1]) + 1
        if not len(brk):
            return [(int(pa[0]), total)]
        idx = np.concatenate(([0], brk))
        return zip(pa[idx].tolist(), np.add.reduceat(plens, idx).tolist())

    def _count(self, ssid: int | None, write: bool, n: int) -> None:
        """One DMA of ``n`` bytes done (PASID DMA, SubstreamID != 0, also counted apart)."""
        c = self.mgr.counters
        if write:
            c.dma_writes += 1
            c.bytes_written += n
            if ssid:
                c.ssid_bytes_written += n
        else:
            c.dma_reads += 1
            c.bytes_read += n
            if ssid:
                c.ssid_bytes_read += n

    def runs_multi(self, sid: int, ssid: int | None, ranges: Iterable[tuple[int, int]],
                   write: bool) -> list[tuple[int, int]]:
        """Translate every IOVA range [(iova, n)] (empty ones skipped) into physically
        contiguous runs (pa, length), in order (runs may join across ranges), or raise
        DmaFault for the first address that does not translate."""
        return list(self._translate_runs(sid, ssid, ranges, write)[0])

    def runs(self, sid: int, ssid: int | None, iova: int, n: int, write: bool
             ) -> list[tuple[int, int]]:
        """Translate [iova, iova+n) into runs (pa, length), or raise DmaFault."""
        if n <= 0:
            return []
        if 0 <= iova and (iova & (PAGE - 1)) + n <= PAGE:  # inside one page: one lookup
            t = self.mgr.translator.translate_one(sid, ssid, iova, write)
            if t.fault:
                raise DmaFault(fault_name(t.fault) or "", sid, ssid, iova, write,
                               self.mgr.faults.stall_for(sid, iova))
            return [(t.pa, n)]
        return self.runs_multi(sid, ssid, [(iova, n)], write)

    def views(self, sid: int, ssid: int | None, ranges: Iterable[tuple[int, int]],
              write: bool) -> list[memoryview]:
        """Translate every IOVA range [(iova, n)] and return memoryviews of the memory
        they reach, in order (writable when ``write``: the endpoint writes guest memory).
        All-or-nothing: DmaFault (a translation fault, or BUS_ERROR when an output
        address is not fd-backed guest RAM) before any view is returned.  Counted as one
        DMA of the total length when the views are handed out."""
        rs = ranges if isinstance(ranges, list) else list(ranges)
        runs, total = self._translate_runs(sid, ssid, rs, write)
        mem = self.mgr.memory
        try:
            if mem is None:
                raise LookupError("no guest memory")
            views = mem.views(runs, write)
        except Exception as e:  # GuestMemoryError: output address not guest RAM
            iova = next((a for a, n in rs if n > 0), 0)
            raise DmaFault("BUS_ERROR", sid, ssid, iova, write) from e
        self._count(ssid, write, total)
        return views

    def pinned(self, sid: int, ssid: int | None, iova: int, n: int, write: bool
               ) -> PinnedView | None:
        """A :class:`PinnedView` of ``[iova, iova + n)`` from what the translation caches
        hold now (no side effect), or None when they do not cover it all, contiguously,
        in fd-backed guest RAM (``write``: writable)."""
        pin = self.mgr.translator.pin(sid, ssid, iova, n, write)
        mem, guest = self.mgr.memory, self.mgr.guest_memory
        if pin is None or mem is None or guest is None:
            return None
        run = mem.region_run(pin.pa, n, write)
        if run is None:  # not (all) in one fd-backed region of guest RAM
            return None
        # the guest's map too: under a hidden stage 2 ``memory`` follows it only when read
        return PinnedView(self, pin, (mem, guest) if guest is not mem else (mem,), *run, write)

    def read(self, sid: int, ssid: int | None, iova: int, n: int) -> bytes:
        runs = self.runs(sid, ssid, iova, n, False)
        mem = self.mgr.memory
        try:
            if len(runs) == 1:  # the common case: one page, or physically contiguous pages
                data = bytes(mem.read(*runs[0]))
            else:
                data = b"".join(mem.views(runs, False))
        except Exception as e:  # GuestMemoryError: output address not guest RAM
            raise DmaFault("BUS_ERROR", sid, ssid, iova, False) from e
        self._count(ssid, False, len(data))
        return data

    def write(self, sid: int, ssid: int | None, iova: int,
              data: bytes | bytearray | memoryview) -> None:
        buf = memoryview(data).cast("B")
        runs = self.runs(sid, ssid, iova, len(buf), True)
        mem = self.mgr.memory
        try:  # every run checked before any byte is written
            if mem is None:
                raise LookupError("no guest memory")
            if len(runs) == 1:  # one run: a failed write leaves memory untouched
                mem.write(runs[0][0], buf)
                views = []
            else:
                views = mem.views(runs, True)
        except Exception as e:  # GuestMemoryError: output address not guest RAM
            raise DmaFault("BUS_ERROR", sid, ssid, iova, True) from e
        off = 0
        for v in views:
            ln = len(v)
            v[:] = buf[off:off + ln]
            off += ln
        self._count(ssid, True, len(buf))
