"""Guest memory as the vfio-user client mapped it (DMA_MAP / DMA_UNMAP).

Regions mapped with a file descriptor are mmapped (MAP_SHARED) and accessed directly;
regions mapped without one are reachable only through the connection's DMA_READ /
DMA_WRITE messages (``read_async`` / ``write_async``).  Every access is bounds-checked
against the mapped regions: nothing outside a mapping is ever read or written.
"""

from __future__ import annotations

import bisect
import mmap
import struct
import threading
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import numpy as np
import numpy.typing as npt

PROT_READ = 1
PROT_WRITE = 2


class GuestMemoryError(Exception):
    """An access (or a mapping change) outside what the client mapped."""

    def __init__(self, addr: int, size: int, message: str = "") -> None:
        super().__init__(message or f"guest memory access {addr:#x}+{size:#x} not mapped")
        self.addr = addr
        self.size = size


class OverlapError(GuestMemoryError):
    """DMA_MAP over an existing mapping (the server answers EEXIST)."""


@dataclass(eq=False)
class MemoryRegion:
    iova: int
    size: int
    prot: int
    fd_offset: int = 0
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    array: np.ndarray | None = field(default=None, repr=False)  # uint8 view of the mapping
    view: memoryview | None = field(default=None, repr=False)  # the same, as a memoryview
    ro_view: memoryview | None = field(default=None, repr=False)  # ... read-only

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def has_fd(self) -> bool:
        return self.array is not None

    def close(self) -> None:
        for v in (self.view, self.ro_view):
            if v is not None:
                v.release()  # slices handed out stay valid (they hold the buffer)
        self.view = self.ro_view = None
        self.array = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # Someone still holds a view: the mapping (and the fd mmap dup'ed) goes
                # away when the last view is garbage collected; the view stays valid.
                pass
            self._mmap = None


DmaReadFn = Callable[[int, int], Awaitable[bytes]]
DmaWriteFn = Callable[[int, bytes], Awaitable[None]]

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_BARRIER = threading.Lock()  # taken only for its atomic instructions: see full_barrier


def full_barrier() -> None:
    """A full memory barrier for memory shared with the guest's vCPUs (threads of QEMU):
    every store before it is visible to them before any load after it is done.  A device
    needs one where it publishes an index and then reads the driver's (virtio's event
    indices), as the driver has its own between the same steps.  Python has no fence of
    its own; taking a lock is an atomic read-modify-write, a LOCK-prefixed instruction on
    x86-64 (the host here), which orders earlier stores before later loads."""
    with _BARRIER:
        pass


class GuestMemory:
    """The DMA regions of one client connection, sorted by IOVA, non-overlapping."""

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._np_starts = np.zeros(0, np.uint64)
        self._np_ends = np.zeros(0, np.uint64)
        self.generation = 0  # bumped by every mapping change (for views built on this one)
        self.dma_read_fn: DmaReadFn | None = None  # set by the server for fd-less regions
        self.dma_write_fn: DmaWriteFn | None = None

    # --- mapping ---------------------------------------------------------------------
    @property
    def regions(self) -> list[MemoryRegion]:
        return list(self._regions)

    def _reindex(self) -> None:
        self.generation += 1
        self._starts = [r.iova for r in self._regions]
        self._np_starts = np.array(self._starts, dtype=np.uint64)
        self._np_ends = np.array([r.end for r in self._regions], dtype=np.uint64)

    def add(self, iova: int, size: int, prot: int, fd: int | None = None,
            fd_offset: int = 0) -> MemoryRegion:
        """Map ``size`` bytes at ``iova``; with ``fd`` the file is mmapped at ``fd_offset``
        (the caller keeps ownership of ``fd`` and may close it right after)."""
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise GuestMemoryError(iova, size, f"bad DMA range {iova:#x}+{size:#x}")
        for r in self._regions:
            if iova < r.end and r.iova < iova + size:
                raise OverlapError(iova, size, f"{iova:#x}+{size:#x} overlaps {r.iova:#x}+{r.size:#x}")
        region = MemoryRegion(iova, size, prot, fd_offset)
        if fd is not None:
            if fd_offset % mmap.ALLOCATIONGRANULARITY:
                raise GuestMemoryError(iova, size, f"fd offset {fd_offset:#x} not page aligned")
            access = mmap.PROT_READ | (mmap.PROT_WRITE if prot & PROT_WRITE else 0)
            try:
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, access, offset=fd_offset)
            except (OSError, ValueError, OverflowError) as e:
                raise GuestMemoryError(iova, size, f"cannot map fd: {e}") from None
            region._mmap = mm
            arr = np.frombuffer(mm, dtype=np.uint8)
            if not prot & PROT_WRITE:
                arr.flags.writeable = False
            region.array = arr
            region.view = memoryview(arr)
            region.ro_view = region.view.toreadonly()
        i = bisect.bisect_left(self._starts, iova)
        self._regions.insert(i, region)
        self._reindex()
        return region

    def add_buffers(self, spans: Iterable[tuple[int, np.ndarray, int]]) -> list[MemoryRegion]:
        """Map each ``(iova, array, prot)``: ``array`` (uint8, e.g. a slice of another
        region's ``array``) is the memory itself, shared, not copied.  All-or-nothing:
        a span overlapping a mapping (or another span) raises :class:`OverlapError`."""
        new = []
        for iova, arr, prot in spans:
            size = len(arr)
            if size <= 0 or iova < 0 or iova + size > 1 << 64:
                raise GuestMemoryError(iova, size, f"bad range {iova:#x}+{size:#x}")
            region = MemoryRegion(iova, size, prot)
            region.array = arr
            region.view = memoryview(arr)
            region.ro_view = region.view.toreadonly()
            new.append(region)
        merged = sorted(self._regions + new, key=lambda r: r.iova)
        for a, b in zip(merged, merged[1:]):
            if b.iova < a.end:
                raise OverlapError(b.iova, b.size, f"{b.iova:#x}+{b.size:#x} overlaps "
                                   f"{a.iova:#x}+{a.size:#x}")
        self._regions = merged
        self._reindex()
        return new

    def remove(self, iova: int, size: int) -> list[MemoryRegion]:
        """Unmap every region inside ``[iova, iova+size)``; a region only partly inside is
        an error (as VFIO type1).  Returns the removed regions (already closed)."""
        end = iova + size
        inside = []
        for r in self._regions:
            if r.iova < end and iova < r.end:
                if r.iova < iova or r.end > end:
                    raise GuestMemoryError(iova, size,
                                           f"unmap {iova:#x}+{size:#x} splits {r.iova:#x}+{r.size:#x}")
                inside.append(r)
        for r in inside:
            self._regions.remove(r)
            r.close()
        self._reindex()
        return inside

    def clear(self) -> list[MemoryRegion]:
        gone, self._regions = self._regions, []
        for r in gone:
            r.close()
        self._reindex()
        return gone

    # --- lookup ----------------------------------------------------------------------
    def _find(self, addr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr < r.iova + r.size:
                return r
        return None

    def contains(self, addr: int, n: int) -> bool:
        try:
            self._pieces(addr, n, need_fd=False)
        except GuestMemoryError:
            return False
        return True

    def _pieces(self, addr: int, n: int, need_fd: bool, write: bool = False
                ) -> list[tuple[MemoryRegion, int, int]]:
        """Split ``[addr, addr+n)`` into (region, offset, length) pieces over contiguous
        regions; raise if any byte is unmapped, not allowed, or (need_fd) fd-less."""
        if n < 0 or addr < 0:
            raise GuestMemoryError(addr, n)
        out = []
        cur, left = addr, n
        while left > 0:
            r = self._find(cur)
            if r is None:
                raise GuestMemoryError(addr, n)
            if need_fd and not r.has_fd:
                raise GuestMemoryError(addr, n, f"{cur:#x} is mapped without an fd: use *_async")
            want = PROT_WRITE if write else PROT_READ
            if not r.prot & want:
                raise GuestMemoryError(addr, n, f"{cur:#x}: mapping does not allow "
                                       f"{'write' if write else 'read'}")
            take = min(left, r.end - cur)
            out.append((r, cur - r.iova, take))
            cur += take
            left -= take
        if n == 0 and self._find(addr) is None:
            raise GuestMemoryError(addr, n)
        return out

    # --- sync access (fd-backed regions) --------------------------------------------
    def read(self, addr: int, n: int) -> bytes:
        r = self._find(addr)  # fast path: inside one readable fd-backed region
        if r is not None and 0 < n and addr + n <= r.iova + r.size and r.ro_view is not None \
                and r.prot & PROT_READ:
            off = addr - r.iova
            return r.ro_view[off:off + n].tobytes()
        pieces = self._pieces(addr, n, need_fd=True)
        if len(pieces) == 1:
            r, off, ln = pieces[0]
            return r.array[off:off + ln].tobytes()  # type: ignore[index]
        return b"".join(r.array[off:off + ln].tobytes() for r, off, ln in pieces)  # type: ignore[index]

    def write(self, addr: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        if type(data) is bytes or type(data) is bytearray:  # fast path: small DMA writes
            r = self._find(addr)
            n = len(data)
            if r is not None and 0 < n and addr + n <= r.iova + r.size \
                    and r.view is not None and r.prot & PROT_WRITE:
                off = addr - r.iova
                r.view[off:off + n] = data
                return
        buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
            else data.reshape(-1).view(np.uint8)
        n = len(buf)
        r = self._find(addr)  # fast path: inside one writable fd-backed region
        if r is not None and 0 < n and addr + n <= r.end and r.has_fd and r.prot & PROT_WRITE:
            off = addr - r.iova
            r.array[off:off + n] = buf  # type: ignore[index]
            return
        pos = 0
        for r, off, ln in self._pieces(addr, len(buf), need_fd=True, write=True):
            r.array[off:off + ln] = buf[pos:pos + ln]  # type: ignore[index]
            pos += ln

    def views(self, runs: "Iterable[tuple[int, int]]", write: bool = False) -> list[memoryview]:
        """Zero-copy memoryviews of the guest RAM at each ``(addr, n)`` of ``runs``, in
        order (a run crossing adjacent regions gives one view per region; empty runs
        give nothing).  Every run is checked first -- mapped, fd-backed, readable
        (``write``: writable) -- and :class:`GuestMemoryError` raised before any view is
        handed out.  The views are writable only with ``write``; the caller drops them
        when done (a region unmapped meanwhile stays mapped until then)."""
        out: list[memoryview] = []
        append = out.append
        want = PROT_WRITE if write else PROT_READ
        regions, starts = self._regions, self._starts
        bisect_right = bisect.bisect_right
        for addr, n in runs:
            if n <= 0:
                if n < 0:
                    raise GuestMemoryError(addr, n)
                continue
            i = bisect_right(starts, addr) - 1
            if i >= 0:  # fast path: inside one fd-backed region allowing the access
                r = regions[i]
                v = r.view if write else r.ro_view
                if v is not None and addr + n <= r.iova + r.size and r.prot & want:
                    off = addr - r.iova
                    append(v[off:off + n])
                    continue
            for r, off, ln in self._pieces(addr, n, need_fd=True, write=write):
                v = r.view if write else r.ro_view
                assert v is not None
                append(v[off:off + ln])
        return out

    def region_run(self, addr: int, n: int, write: bool) -> tuple[MemoryRegion, int] | None:
        """The fd-backed region holding all of ``[addr, addr + n)`` with the access
        allowed (``write``: writable), and the run's offset in it; None otherwise.  For
        a caller that keeps a place in guest RAM without keeping a view of it (a kept
        view would keep an unmapped region's mapping and fd alive)."""
        r = self._find(addr)
        if r is None or n <= 0 or addr + n > r.iova + r.size or r.array is None \
                or not r.prot & (PROT_WRITE if write else PROT_READ):
            return None
        return r, addr - r.iova

    def read_u64(self, addr: int) -> int:
        r = self._find(addr)  # fast path (table walks): inside one readable fd-backed region
        if r is not None and addr + 8 <= r.iova + r.size and r.ro_view is not None \
                and r.prot & PROT_READ:
            return _U64.unpack_from(r.ro_view, addr - r.iova)[0]
        return _U64.unpack(self.read(addr, 8))[0]

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))

    def update_u64(self, addr: int, expected: int, new: int) -> bool:
        """A hardware update of a translation table descriptor (HTTU): store ``new`` at the
        8-byte aligned ``addr`` if the word there still is ``expected``; False (nothing
        stored) when it changed, and the caller walks again.

        What is atomic: the store is a single aligned 8-byte store into the shared mapping
        (a numpy uint64 element assignment, one 64-bit move), so no agent ever sees half
        a descriptor, and the word is re-read just before it.  What is not: the re-read
        and the store are two accesses, not a compare-and-swap (Python has none on shared
        memory); a guest CPU update landing between them is overwritten.  Raises
        :class:`GuestMemoryError` unless the word lies in writable fd-backed RAM."""
        r = self._find(addr)
        if addr & 7 or r is None or addr + 8 > r.end or r.array is None \
                or not r.prot & PROT_WRITE or r.iova & 7:
            raise GuestMemoryError(addr, 8, f"descriptor update at {addr:#x}: not an aligned "
                                   "word of writable guest RAM")
        off = addr - r.iova
        word = r.array[off:off + 8].view("<u8")
        if int(word[0]) != expected:
            return False
        word[0] = new
        return True

    def read_u32(self, addr: int) -> int:
        return _U32.unpack(self.read(addr, 4))[0]

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, _U32.pack(value & 0xFFFFFFFF))

    def ndarray(self, addr: int, n: int, dtype: npt.DTypeLike = np.uint8) -> np.ndarray:
        """A zero-copy view of ``n`` bytes at ``addr`` (inside one fd-backed region),
        reinterpreted as ``dtype`` (``n`` must be a multiple of its item size).  Writable
        when the mapping allows writes."""
        pieces = self._pieces(addr, n, need_fd=True)
        if len(pieces) != 1:
            raise GuestMemoryError(addr, n, f"{addr:#x}+{n:#x} is not inside one region")
        r, off, ln = pieces[0]
        return r.array[off:off + ln].view(dtype)  # type: ignore[index]

    def view(self, addr: int, n: int) -> memoryview:
        return memoryview(self.ndarray(addr, n))

    def u64_window(self, lo: int, hi: int) -> tuple[np.ndarray, int] | None:
        """For batched aligned loads: when ``[lo, hi)`` lies inside one readable fd-backed
        region whose start is 8-byte aligned, return ``(words, base)`` where ``words`` is a
        read-only uint64 view of that whole region (``words[(a - base) >> 3]`` is the
        8-byte load at aligned ``a``, valid for every aligned ``a`` in ``[lo, hi - 8]``);
        else None.  The caller keeps its indices inside ``[lo, hi)``."""
        if lo < 0 or hi <= lo:
            return None
        i = bisect.bisect_right(self._starts, lo) - 1
        if i < 0:
            return None
        r = self._regions[i]
        if hi > r.iova + (r.size & ~7) or r.iova & 7 or r.array is None \
                or not r.prot & PROT_READ:
            return None
        words = r.array[: r.size & ~7].view("<u8")
        words.flags.writeable = False
        return words, r.iova

    def gather_u64(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batched little-endian 8-byte loads.  ``ok`` is False where the 8 bytes are not
        all inside one readable fd-backed region (values are 0 there)."""
        a = np.asarray(addrs, dtype=np.uint64).reshape(-1)
        if not self._regions or a.size == 0:
            return np.zeros(a.shape, np.uint64), np.zeros(a.shape, bool)
        lo, hi = int(a.min()), int(a.max())
        if not int(np.bitwise_or.reduce(a)) & 7 and hi < (1 << 64) - 8:
            # fast path: every load aligned and inside one region (one min/max, one take)
            win = self.u64_window(lo, hi + 8)
            if win is not None:
                words, base = win
                off = (a - np.uint64(base)) >> np.uint64(3)
                return words.take(off.view(np.int64)), np.ones(a.shape, bool)
        vals = np.zeros(a.shape, np.uint64)
        ok = np.zeros(a.shape, bool)
        idx = np.searchsorted(self._np_starts, a, side="right").astype(np.int64) - 1
        valid = idx >= 0
        idx_c = np.where(valid, idx, 0)
        last = a + np.uint64(7)
        valid &= last >= a  # no wrap-around
        valid &= last < self._np_ends[idx_c]
        first = max(int(idx_c.min()), 0)
        for i in range(first, int(idx_c.max()) + 1):
            r = self._regions[i]
            if not r.has_fd or not r.prot & PROT_READ:
                continue
            sel = valid & (idx_c == i)
            if not sel.any():
                continue
            off = a[sel] - np.uint64(r.iova)
            arr = r.array
            assert arr is not None
            if not (off & np.uint64(7)).any() and r.size % 8 == 0:
                vals[sel] = arr.view("<u8")[(off >> np.uint64(3)).astype(np.intp)]
            else:
                offi = off.astype(np.intp)[:, None] + np.arange(8, dtype=np.intp)
                vals[sel] = arr[offi].copy().view("<u8").reshape(-1)
            ok[sel] = True
        return vals, ok

    # --- async access (any region; fd-less ones through DMA_READ/DMA_WRITE) ----------
    async def read_async(self, addr: int, n: int) -> bytes:
        out = []
        for r, off, ln in self._pieces(addr, n, need_fd=False):
            if r.has_fd:
                out.append(r.array[off:off + ln].tobytes())  # type: ignore[index]
            else:
                if self.dma_read_fn is None:
                    raise GuestMemoryError(addr, n, "no DMA_READ path for an fd-less region")
                out.append(await self.dma_read_fn(r.iova + off, ln))
        return b"".join(out)

    async def write_async(self, addr: int, data: bytes) -> None:
        data = bytes(data)
        pos = 0
        for r, off, ln in self._pieces(addr, len(data), need_fd=False, write=True):
            if r.has_fd:
                r.array[off:off + ln] = np.frombuffer(data, np.uint8, ln, pos)  # type: ignore[index]
            else:
                if self.dma_write_fn is None:
                    raise GuestMemoryError(addr, len(data), "no DMA_WRITE path for an fd-less region")
                await self.dma_write_fn(r.iova + off, data[pos:pos + ln])
            pos += ln
