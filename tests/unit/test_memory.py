"""GuestMemory: memfd-backed regions, bounds checks, gather, fd-less async path."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from viommu_backend.memory import (
    PROT_READ,
    PROT_WRITE,
    GuestMemory,
    GuestMemoryError,
    OverlapError,
)

RW = PROT_READ | PROT_WRITE
PAGE = 4096


def memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def mem():
    m = GuestMemory()
    fd = memfd(4 * PAGE)
    os.pwrite(fd, bytes(range(256)) * 16, PAGE)  # file page 1 -> iova 0x10000
    m.add(0x10000, 2 * PAGE, RW, fd, PAGE)
    os.close(fd)
    fd = memfd(PAGE)
    m.add(0x10000 + 2 * PAGE, PAGE, PROT_READ, fd)  # adjacent, read-only
    os.close(fd)
    yield m
    m.clear()


def test_read_write_through_offset(mem: GuestMemory) -> None:
    assert mem.read(0x10000, 4) == bytes([0, 1, 2, 3])
    mem.write_u64(0x10008, 0x1122334455667788)
    assert mem.read_u64(0x10008) == 0x1122334455667788
    assert mem.read_u32(0x1000C) == 0x11223344
    mem.write_u32(0x10010, 0xDEADBEEF)
    assert mem.read(0x10010, 4) == bytes.fromhex("efbeadde")


def test_bounds(mem: GuestMemory) -> None:
    for addr, n in [(0xFFFF, 1), (0x10000 + 3 * PAGE - 2, 4), (0, 8), (1 << 63, 8)]:
        with pytest.raises(GuestMemoryError) as e:
            mem.read(addr, n)
        assert e.value.addr == addr and e.value.size == n
        assert not mem.contains(addr, n)
    # Spanning the two adjacent regions is fine for read, not for a zero-copy view.
    assert len(mem.read(0x10000 + 2 * PAGE - 4, 8)) == 8
    with pytest.raises(GuestMemoryError):
        mem.ndarray(0x10000 + 2 * PAGE - 4, 8)
    with pytest.raises(GuestMemoryError):  # read-only mapping
        mem.write(0x10000 + 2 * PAGE, b"x")


def test_zero_copy_views(mem: GuestMemory) -> None:
    a = mem.ndarray(0x10000, 64, np.uint64)
    a[0] = 42
    assert mem.read_u64(0x10000) == 42
    v = mem.view(0x10100, 4)
    v[:] = b"wxyz"
    assert mem.read(0x10100, 4) == b"wxyz"
    del a, v


def test_overlap_and_remove(mem: GuestMemory) -> None:
    with pytest.raises(OverlapError):
        mem.add(0x10000 + PAGE, PAGE, RW, None)
    with pytest.raises(GuestMemoryError):  # would split a region
        mem.remove(0x10000, PAGE)
    gone = mem.remove(0x10000, 2 * PAGE)
    assert [(r.iova, r.size) for r in gone] == [(0x10000, 2 * PAGE)]
    assert [r.iova for r in mem.regions] == [0x10000 + 2 * PAGE]
    with pytest.raises(GuestMemoryError):
        mem.read(0x10000, 1)


def test_gather_u64(mem: GuestMemory) -> None:
    for i in range(8):
        mem.write_u64(0x10000 + 8 * i, 1000 + i)
    addrs = np.array([0x10000, 0x10038, 0xFFF8, 0x10000 + 3 * PAGE - 8, 0x10000 + 3 * PAGE - 4,
                      0x10003, 2**64 - 4], dtype=np.uint64)
    vals, ok = mem.gather_u64(addrs)
    assert ok.tolist() == [True, True, False, True, False, True, False]
    assert vals[0] == 1000 and vals[1] == 1007 and vals[2] == 0
    assert vals[5] == int.from_bytes(mem.read(0x10003, 8), "little")
    # A load straddling the two regions is not ok even though both bytes are mapped.
    vals, ok = mem.gather_u64(np.array([0x10000 + 2 * PAGE - 4], np.uint64))
    assert not ok[0] and vals[0] == 0


def test_fdless_region_uses_async_path() -> None:
    m = GuestMemory()
    backing = bytearray(PAGE)
    calls = []

    async def rd(addr: int, n: int) -> bytes:
        calls.append(("r", addr, n))
        return bytes(backing[addr - 0x8000: addr - 0x8000 + n])

    async def wr(addr: int, data: bytes) -> None:
        calls.append(("w", addr, len(data)))
        backing[addr - 0x8000: addr - 0x8000 + len(data)] = data

    m.dma_read_fn, m.dma_write_fn = rd, wr
    m.add(0x8000, PAGE, RW)
    with pytest.raises(GuestMemoryError):
        m.read(0x8000, 4)
    vals, ok = m.gather_u64(np.array([0x8000], np.uint64))
    assert not ok[0]

    async def go() -> bytes:
        await m.write_async(0x8010, b"hello")
        return await m.read_async(0x8010, 5)

    assert asyncio.run(go()) == b"hello"
    assert calls == [("w", 0x8010, 5), ("r", 0x8010, 5)]
    with pytest.raises(GuestMemoryError):
        asyncio.run(m.read_async(0x8000 + PAGE - 2, 4))


def test_no_fd_leak_on_clear() -> None:
    before = len(os.listdir("/proc/self/fd"))
    m = GuestMemory()
    for i in range(4):
        fd = memfd(PAGE)
        m.add(i * PAGE, PAGE, RW, fd)
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) > before  # mmap keeps a dup
    m.clear()
    assert len(os.listdir("/proc/self/fd")) == before


def test_update_u64_stores_only_over_the_expected_word(mem):
    a = 0x10000 + 0x100
    old = mem.read_u64(a)
    assert mem.update_u64(a, old, 0x0123_4567_89AB_CDEF)
    assert mem.read_u64(a) == 0x0123_4567_89AB_CDEF
    assert not mem.update_u64(a, old, 5)  # the word changed since: nothing stored
    assert mem.read_u64(a) == 0x0123_4567_89AB_CDEF
    for bad in (a + 4, 0x10000 + 2 * PAGE, 0x9000):  # unaligned, read-only, unmapped
        with pytest.raises(GuestMemoryError):
            mem.update_u64(bad, 0, 1)
