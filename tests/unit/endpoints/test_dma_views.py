"""Zero-copy bulk DMA: GuestMemory.views, DomainManager.dma_views / DmaPort.views (batched
translation, all-or-nothing, bus master), FileBackend/MemoryBackend preadv/pwritev, the
virtqueue range helper, and virtio-blk requests moving data straight between the disk
file and scattered guest pages behind the SMMU."""

from __future__ import annotations

import os
import random

import pytest
from tests.support.endpoint_env import DATA, SmmuEnv, bus_master
from tests.support.pci_ctx import TestContext
from tests.support.virtio_rig import BUF, Rig
from tests.support.virtio_driver import DEFAULT_FEATURES, blk_header

from viommu_backend.endpoints.block_backend import (
    FileBackend, MemoryBackend, read_into, write_from)
from viommu_backend.endpoints.dma import DirectDma, DmaFault, DmaViews, TranslatedDma
from viommu_backend.endpoints.testdev import TestDevice
from viommu_backend.endpoints.virtio_blk import BlkStatus, Feature, ReqType, feature_bits
from viommu_backend.endpoints.virtio.virtqueue import Segment, ranges
from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory, GuestMemoryError

SID = 0x21
IOVA = 0x40_0000


def scattered(env: SmmuEnv, npages: int, seed: int = 3) -> list[int]:
    """Map IOVA pages [IOVA, +npages) onto shuffled data pages; returns their PAs."""
    (pt,) = env.s1_stream(SID)
    idx = list(range(npages * 2))
    random.Random(seed).shuffle(idx)
    pas = [DATA + (i << 12) for i in idx[:npages]]
    for k, pa in enumerate(pas):
        pt.map(IOVA + (k << 12), pa)
    return pas


# -- GuestMemory.views --------------------------------------------------------------------
def test_memory_views_are_zero_copy_and_checked() -> None:
    ctx = TestContext(0x1000_0000, 0x4000)
    mem = ctx.memory
    fd = os.memfd_create("second")
    os.ftruncate(fd, 0x2000)
    mem.add(0x1000_4000, 0x2000, PROT_READ, fd=fd)  # adjacent, read-only
    os.close(fd)
    mem.write(0x1000_0ff0, b"A" * 32)
    v = mem.views([(0x1000_0ff0, 16), (0, 0), (0x1000_1000, 8)], write=True)
    assert [len(x) for x in v] == [16, 8] and not v[0].readonly
    v[1][:4] = b"wxyz"  # writes land in guest RAM
    assert mem.read(0x1000_1000, 5) == b"wxyzA"
    ro = mem.views([(0x1000_3ff8, 16)])  # crosses into the next region: two views
    assert [len(x) for x in ro] == [8, 8] and all(x.readonly for x in ro)
    with pytest.raises(GuestMemoryError):  # the read-only region refuses a write view
        mem.views([(0x1000_0000, 4), (0x1000_4000, 4)], write=True)
    with pytest.raises(GuestMemoryError):  # past the last region
        mem.views([(0x1000_5ff0, 0x20)])
    with pytest.raises(GuestMemoryError):
        mem.views([(0x1000_0000, -1)])
    del v, ro
    ctx.close()


def test_memory_views_refuse_fdless_regions() -> None:
    mem = GuestMemory()
    mem.add(0x2000, 0x1000, PROT_READ | PROT_WRITE)  # no fd: DMA_READ/WRITE only
    with pytest.raises(GuestMemoryError):
        mem.views([(0x2000, 8)])


def test_view_keeps_mapping_alive_after_unmap() -> None:
    ctx = TestContext(0x1000_0000, 0x2000)
    mem = ctx.memory
    mem.write(0x1000_0000, b"keep")
    (v,) = mem.views([(0x1000_0000, 4)])
    mem.remove(0x1000_0000, 0x2000)  # the region goes; the view stays readable
    assert bytes(v) == b"keep"
    with pytest.raises(GuestMemoryError):
        mem.views([(0x1000_0000, 4)])


# -- DomainManager.dma_views / DmaPort.views ---------------------------------------------
def test_translated_views_scattered_pages(fn: TestDevice, env: SmmuEnv) -> None:
    pas = scattered(env, 20)
    port = TranslatedDma(fn, env.mgr, SID)
    assert isinstance(port, DmaViews)
    # two ranges (a page-crossing head, then the rest): many pages, batched
    rs = [(IOVA + 0x800, 0x1000), (IOVA + 0x1800, 18 * 4096)]
    views = port.views(rs, write=True)
    assert sum(len(v) for v in views) == 0x1000 + 18 * 4096
    payload = os.urandom(0x1000 + 18 * 4096)
    pos = 0
    for v in views:
        v[:] = payload[pos:pos + len(v)]
        pos += len(v)
    assert env.mem.read(pas[0] + 0x800, 0x800) == payload[:0x800]
    assert env.mem.read(pas[1], 0x800) == payload[0x800:0x1000]
    assert port.read(IOVA + 0x800, len(payload)) == payload
    ro = port.views([(IOVA + 0x800, len(payload))], write=False)
    assert b"".join(ro) == payload and all(v.readonly for v in ro)
    assert env.mgr.counters.bytes_written >= len(payload)


def test_translated_views_all_or_nothing(fn: TestDevice, env: SmmuEnv) -> None:
    pas = scattered(env, 16)
    port = TranslatedDma(fn, env.mgr, SID)
    before = env.mgr.counters.dma_writes
    with pytest.raises(DmaFault) as ei:  # page 16 is not mapped: nothing handed out
        port.views([(IOVA, 4096), (IOVA + 0x1000, 16 * 4096)], write=True)
    assert ei.value.reason == "translation" and ei.value.event == "F_TRANSLATION"
    assert env.mgr.counters.dma_writes == before
    assert len(env.events) >= 1
    with pytest.raises(DmaFault) as ei:  # small (scalar) path too
        port.views([(IOVA + 15 * 4096, 8192)], write=False)
    assert ei.value.event == "F_TRANSLATION"
    assert env.mem.read(pas[0], 8) == bytes(8)
    bus_master(fn, False)
    with pytest.raises(DmaFault) as ei:
        port.views([(IOVA, 8)], write=False)
    assert ei.value.reason == "no_bus_master"


def test_translated_views_bus_error_outside_ram(fn: TestDevice, env: SmmuEnv) -> None:
    (pt,) = env.s1_stream(SID)
    for k in range(10):
        pt.map(IOVA + (k << 12), DATA + (k << 12) if k != 7 else 0x7000_0000)
    port = TranslatedDma(fn, env.mgr, SID)
    with pytest.raises(DmaFault) as ei:
        port.views([(IOVA, 10 * 4096)], write=True)
    assert ei.value.reason == "bad_address" and ei.value.event == "BUS_ERROR"
    # dma_write over the same range writes nothing either
    with pytest.raises(DmaFault):
        port.write(IOVA, b"\x55" * (10 * 4096))
    assert env.mem.read(DATA, 16) == bytes(16)


def test_direct_views(fn: TestDevice, env: SmmuEnv) -> None:
    port = DirectDma(fn)
    (v,) = port.views([(DATA, 8)], write=True)
    v[:] = b"direct!!"
    assert env.mem.read(DATA, 8) == b"direct!!"
    with pytest.raises(DmaFault) as ei:
        port.views([(DATA, 8), (0x1000, 4)], write=False)
    assert ei.value.reason == "bad_address"
    bus_master(fn, False)
    with pytest.raises(DmaFault) as ei:
        port.views([(DATA, 8)], write=False)
    assert ei.value.reason == "no_bus_master"


# -- backends ------------------------------------------------------------------------------
def test_file_backend_vectored_io(tmp_path) -> None:
    be = FileBackend(tmp_path / "d.img", size=3 * 4096)
    src = [memoryview(os.urandom(n)) for n in (4096, 100, 0, 3000)]
    be.pwritev(512, src)
    with open(tmp_path / "d.img", "rb") as f:
        f.seek(512)
        assert f.read(7196) == b"".join(src)
    dst = [bytearray(n) for n in (1000, 6196)]
    be.preadv(512, [memoryview(d) for d in dst])
    assert b"".join(dst) == b"".join(src)
    os.ftruncate(be.fd, 4096)  # reads past the end of the file fill zeros
    tail = [bytearray(b"\xff" * 8), bytearray(b"\xff" * 4096)]
    be.preadv(4096 - 4, [memoryview(t) for t in tail])
    assert tail[0][4:] == bytes(4) and tail[1] == bytes(4096)
    be.close()


def test_memory_backend_and_fallback_helpers() -> None:
    be = MemoryBackend(8192)
    write_from(be, 100, [memoryview(b"abc"), memoryview(b"defg")])
    out = [bytearray(2), bytearray(5)]
    read_into(be, 100, [memoryview(o) for o in out])
    assert bytes(out[0] + out[1]) == b"abcdefg"
    tail = bytearray(b"\xff" * 8)
    be.preadv(8190, [memoryview(tail)])
    assert tail == bytes(8)

    class Plain:  # a backend with only pread/pwrite
        size, read_only = 4096, False

        def __init__(self) -> None:
            self.buf = bytearray(4096)

        def pread(self, off: int, n: int) -> bytes:
            return bytes(self.buf[off:off + n])

        def pwrite(self, off: int, data: bytes) -> None:
            self.buf[off:off + len(data)] = data

    p = Plain()
    write_from(p, 10, [memoryview(b"xy"), memoryview(b"z")])  # type: ignore[arg-type]
    got = [bytearray(1), bytearray(2)]
    read_into(p, 10, [memoryview(g) for g in got])  # type: ignore[arg-type]
    assert got == [bytearray(b"x"), bytearray(b"yz")]


# -- virtqueue ranges -----------------------------------------------------------------------
def test_ranges_skip_and_join() -> None:
    segs = [Segment(0x1000, 16, False), Segment(0x2000, 0x1000, False),
            Segment(0x3000, 0x1000, False), Segment(0x9000, 0x100, False)]
    assert ranges(segs, 16, 0x2100) == [(0x2000, 0x2000), (0x9000, 0x100)]
    assert ranges(segs, 8, 16) == [(0x1008, 8), (0x2000, 8)]
    assert ranges(segs, 16, 0x10) == [(0x2000, 0x10)]
    assert ranges(segs, 0x3000, 0x1000) == []
    assert ranges(segs[:1], 0, 16) == [(0x1000, 16)]


# -- virtio-blk end to end: data straight between the file and scattered guest pages ------
def test_virtio_blk_large_request_scattered_pages(tmp_path) -> None:
    rig = Rig(tmp_path, translated=True)
    try:
        rig.start(DEFAULT_FEATURES | feature_bits(Feature.RING_INDIRECT_DESC))
        # remap the rig's identity window for 64 pages onto shuffled pages
        npages = 64
        iova0 = 0x2000_0000  # an IOVA window above the rig's identity map
        idx = list(range(npages))
        random.Random(5).shuffle(idx)
        pas = [BUF + 0x10_0000 + (i << 12) for i in idx]
        for k, pa in enumerate(pas):
            rig.pt.map(iova0 + (k << 12), pa)
        n = npages * 4096
        payload = os.urandom(n)
        for k, pa in enumerate(pas):
            rig.mem.write(pa, payload[k * 4096:(k + 1) * 4096])
        hdr, status = rig.alloc(16), rig.alloc(1)
        rig.mem.write(hdr, blk_header(ReqType.OUT, 16))
        # one descriptor per page, as a scatterlist (indirect table)
        bufs = [(rig.bus(hdr), 16, False)] + [(iova0 + (k << 12), 4096, False)
                                              for k in range(npages)]
        bufs.append((rig.bus(status), 1, True))
        head = rig._indirect(rig.alloc(16 * len(bufs)), bufs)
        rig.mem.write(status, b"\xff")
        rig.ring.publish(head)
        rig.kick()
        assert rig.status_of(status) == BlkStatus.OK
        assert rig.disk(16 * 512, n) == payload
        # read it back into the same pages, after scribbling over them
        for pa in pas:
            rig.mem.write(pa, b"\xee" * 4096)
        rig.mem.write(hdr, blk_header(ReqType.IN, 16))
        bufs = [(rig.bus(hdr), 16, False), (iova0, n, True), (rig.bus(status), 1, True)]
        head = rig.ring.add_chain(bufs)
        rig.mem.write(status, b"\xff")
        rig.ring.publish(head)
        rig.kick()
        assert rig.status_of(status) == BlkStatus.OK
        assert b"".join(rig.mem.read(pa, 4096) for pa in pas) == payload
        # an IN whose buffer runs one page past the mapping: IOERR, no page written
        for pa in pas:
            rig.mem.write(pa, b"\xee" * 4096)
        bufs = [(rig.bus(hdr), 16, False), (iova0, n + 4096, True),
                (rig.bus(status), 1, True)]
        head = rig.ring.add_chain(bufs)
        rig.mem.write(status, b"\xff")
        rig.ring.publish(head)
        rig.kick()
        assert rig.status_of(status) == BlkStatus.IOERR
        assert all(rig.mem.read(pa, 4096) == b"\xee" * 4096 for pa in pas)
    finally:
        rig.close()
