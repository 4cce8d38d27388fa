"""GuestMemory.gather_u64 (single-region fast path and general path) and u64_window,
checked against one read_u64 per address."""

from __future__ import annotations

import os

import numpy as np
import pytest

from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory, GuestMemoryError

RW = PROT_READ | PROT_WRITE
PAGE = 4096


def _region(m: GuestMemory, iova: int, size: int, prot: int, fd: bool = True) -> None:
    if not fd:
        m.add(iova, size, prot)
        return
    f = os.memfd_create("g", os.MFD_CLOEXEC)
    os.ftruncate(f, size)
    os.pwrite(f, np.random.default_rng(iova).integers(0, 256, size, np.uint8).tobytes(), 0)
    m.add(iova, size, prot, f)
    os.close(f)


@pytest.fixture
def mem():
    m = GuestMemory()
    _region(m, 0x10000, 4 * PAGE, RW)
    _region(m, 0x10000 + 4 * PAGE, PAGE, PROT_READ)  # adjacent: loads may not straddle
    _region(m, 0x40000, PAGE, PROT_WRITE)  # not readable
    _region(m, 0x50000, PAGE, RW, fd=False)  # fd-less: not reachable synchronously
    _region(m, 0x60004, 2 * PAGE - 4, RW)  # start not 8-aligned, odd size
    yield m
    m.clear()


def _reference(m: GuestMemory, addrs: np.ndarray):
    vals, ok = [], []
    for a in addrs.tolist():
        try:
            v = m.read_u64(a)
            if m._find(a) is not m._find(a + 7):  # gather never straddles two regions
                raise GuestMemoryError(a, 8)
            vals.append(v)
            ok.append(True)
        except GuestMemoryError:
            vals.append(0)
            ok.append(False)
    return np.array(vals, np.uint64), np.array(ok, bool)


def _check(m: GuestMemory, addrs) -> np.ndarray:
    addrs = np.asarray(addrs, np.uint64)
    vals, ok = m.gather_u64(addrs)
    rv, rok = _reference(m, addrs)
    assert ok.tolist() == rok.tolist()
    assert vals.tolist() == rv.tolist()
    return ok


def test_single_region_fast_path(mem: GuestMemory) -> None:
    rng = np.random.default_rng(0)
    aligned = 0x10000 + 8 * rng.integers(0, 4 * PAGE // 8, 500).astype(np.uint64)
    assert _check(mem, aligned).all()
    assert _check(mem, [0x10000, 0x10000 + 4 * PAGE - 8]).all()  # both ends
    assert _check(mem, aligned + np.uint64(3)).sum() >= 499  # unaligned: byte path
    # the read-only neighbour and the straddle between them
    assert _check(mem, [0x10000 + 4 * PAGE, 0x10000 + 5 * PAGE - 8]).all()
    assert _check(mem, [0x10000 + 4 * PAGE - 4]).tolist() == [False]


def test_mixed_and_bad_addresses(mem: GuestMemory) -> None:
    rng = np.random.default_rng(1)
    edges = np.array([0, 0x40000, 0x50000, 0x60004, 0x60008, 0x60000, 0x60004 + 2 * PAGE - 8,
                      0x60004 + 2 * PAGE - 7, 2**64 - 8, 2**64 - 1, 2**63], np.uint64)
    addrs = np.concatenate([rng.integers(0xF000, 0x16000, 300).astype(np.uint64),
                            rng.integers(0x3F000, 0x64000, 300).astype(np.uint64), edges])
    _check(mem, addrs)
    _check(mem, addrs & ~np.uint64(7))
    vals, ok = mem.gather_u64(np.zeros(0, np.uint64))
    assert len(vals) == len(ok) == 0


def test_u64_window(mem: GuestMemory) -> None:
    words, base = mem.u64_window(0x10008, 0x10000 + 4 * PAGE)
    assert base == 0x10000 and len(words) == 4 * PAGE // 8
    assert int(words[1]) == mem.read_u64(0x10008)
    with pytest.raises(ValueError):
        words[0] = 1  # never a writable window
    assert mem.u64_window(0x10000, 0x10000 + 4 * PAGE + 8) is None  # spans two regions
    assert mem.u64_window(0x40000, 0x40008) is None  # not readable
    assert mem.u64_window(0x50000, 0x50008) is None  # fd-less
    assert mem.u64_window(0x60008, 0x60010) is None  # region start not 8-aligned
    assert mem.u64_window(0x0, 0x8) is None and mem.u64_window(0x20000, 0x20000) is None
