"""Endpoint DMA into guest RAM through the SMMU: a buffer translated into physically
contiguous runs (scalar ``translate_one`` per page for short buffers, one batched
``translate`` for long ones), then read or written; a fault raises :class:`DmaFault`
(with the stalled transaction, if any) and nothing is written unless the whole buffer
translates.  Functions of the :class:`~.manager.DomainManager` (``dma_read`` /
``dma_write`` bound there as its methods)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .fault import stall_for
from .results import PAGE, DmaFault, fault_name

if TYPE_CHECKING:
    from .manager import DomainManager

_BATCH_PAGES = 8  # DMA spanning more pages than this translates in one batch


def dma_runs(mgr: DomainManager, sid: int, ssid: int | None, iova: int, n: int,
             write: bool) -> list[tuple[int, int]]:
    """Translate [iova, iova+n) into runs (pa, length), or raise DmaFault."""
    if n <= 0:
        return []
    if iova < 0 or iova + n > 1 << 64:
        raise DmaFault("F_TRANSLATION", sid, ssid, iova, write)
    first, last = iova >> 12, (iova + n - 1) >> 12
    pieces: list[tuple[int, int, int]] = []  # (iova, pa, length)
    if last - first + 1 > _BATCH_PAGES:
        starts = np.arange(first, last + 1, dtype=np.uint64) << np.uint64(12)
        starts[0] = iova
        r = mgr.translate(sid, ssid, starts, write)
        bad = np.flatnonzero(r.fault != 0)
        if len(bad):
            i = int(bad[0])
            raise DmaFault(r.fault_name(i) or "", sid, ssid, int(starts[i]), write,
                           stall_for(mgr, sid, int(starts[i])))
        end = iova + n
        for i, (a, pa) in enumerate(zip(starts.tolist(), r.pa.tolist())):
            nxt = min((a | (PAGE - 1)) + 1, end)
            pieces.append((a, pa, nxt - a))
    else:
        a, end = iova, iova + n
        while a < end:
            t = mgr.translate_one(sid, ssid, a, write)
            if t.fault:
                raise DmaFault(fault_name(t.fault) or "", sid, ssid, a, write,
                               stall_for(mgr, sid, a))
            size = t.page_size or PAGE
            nxt = min((a | (size - 1)) + 1, end)
            pieces.append((a, t.pa, nxt - a))
            a = nxt
    runs: list[tuple[int, int]] = []
    for _, pa, ln in pieces:
        if runs and runs[-1][0] + runs[-1][1] == pa:
            runs[-1] = (runs[-1][0], runs[-1][1] + ln)
        else:
            runs.append((pa, ln))
    return runs


def dma_read(mgr: DomainManager, sid: int, ssid: int | None, iova: int, n: int) -> bytes:
    runs = dma_runs(mgr, sid, ssid, iova, n, False)
    mem = mgr.memory
    try:
        if len(runs) == 1:  # the common case: one page, or physically contiguous pages
            data = bytes(mem.read(*runs[0]))
        else:
            data = b"".join(bytes(mem.read(pa, ln)) for pa, ln in runs)
    except Exception as e:  # GuestMemoryError: output address not guest RAM
        raise DmaFault("BUS_ERROR", sid, ssid, iova, False) from e
    mgr.counters.dma_reads += 1
    mgr.counters.bytes_read += len(data)
    return data


def dma_write(mgr: DomainManager, sid: int, ssid: int | None, iova: int,
              data: bytes | bytearray | memoryview) -> None:
    buf = memoryview(data).cast("B")
    runs = dma_runs(mgr, sid, ssid, iova, len(buf), True)
    mem = mgr.memory
    if len(runs) == 1:  # one run: a failed write leaves memory untouched
        try:
            mem.write(runs[0][0], buf)
        except Exception as e:  # GuestMemoryError: output address not guest RAM
            raise DmaFault("BUS_ERROR", sid, ssid, iova, True) from e
        mgr.counters.dma_writes += 1
        mgr.counters.bytes_written += len(buf)
        return
    for pa, ln in runs:  # all runs translated before any byte is written
        if mem is None or not mem.contains(pa, ln):
            raise DmaFault("BUS_ERROR", sid, ssid, iova, True)
    off = 0
    for pa, ln in runs:
        mem.write(pa, buf[off:off + ln])
        off += ln
    mgr.counters.dma_writes += 1
    mgr.counters.bytes_written += len(buf)
