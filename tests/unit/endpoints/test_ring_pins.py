"""Pinned ring views (DmaWindow / TranslatedDma.pinned / Translator.pin): a virtqueue's
rings are reached through host views kept while the SMMU's caches still hold their
translation; any invalidation covering them (TLBI, CFGI, a flush, a memory map change),
an armed fault-injection rule, the sanitizer or xlat tracing sends the next access
through the ordinary translation again -- which faults, or finds the new mapping."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from tests.support.endpoint_env import DATA, RAM, SmmuEnv
from tests.support.virtio_driver import Ring
from tests.support.virtio_rig import RING, RING_SIZE, Rig

from viommu_backend.domains.sanitizer import Sanitizer
from viommu_backend.endpoints.dma import DmaWindow
from viommu_backend.endpoints.virtio_blk import BlkStatus, ReqType, Status
from viommu_backend.fault_injection import FaultInjector
from viommu_backend.memory import PROT_READ, PROT_WRITE

SID = 0x30  # the translated Rig's stream
BLOCK = 2 << 20


@pytest.fixture
def trig(tmp_path) -> Iterator[Rig]:
    r = Rig(tmp_path, translated=True)
    yield r
    r.close()


def rings(rig: Rig) -> dict[str, DmaWindow]:
    q = rig.dev.queues[0]
    return dict(zip(("desc", "avail", "used"), q.rings(rig.dev.dma)))


def windows(rig: Rig) -> dict[str, bool]:
    return {name: w.pinned for name, w in rings(rig).items()}


def tlbi(rig: Rig, iova: int, size: int) -> None:
    """CMD_TLBI_NH_VA of the stream's ASID over [iova, iova + size)."""
    mgr = rig.env.mgr
    ctx = mgr.translator.context(mgr.device(SID), None)
    mgr.tlbi_nh_va(ctx.vmid, ctx.asid, iova, size, True, 0)  # type: ignore[union-attr]


def one_request(rig: Rig, ring: Ring) -> tuple[int, int]:
    """Write 512 bytes; returns (head, status PA) after the kick."""
    head, _, st = rig.request(ReqType.OUT, sector=1, out=os.urandom(512))
    rig.kick()
    return head, st


def test_rings_are_pinned_and_cost_no_translation(trig: Rig) -> None:
    ring = trig.start()
    h1, s1 = one_request(trig, ring)
    assert ring.pop_used() == [(h1, 1)] and trig.status_of(s1) == BlkStatus.OK
    assert windows(trig) == {"desc": True, "avail": True, "used": True}
    tlb = trig.env.mgr.tlb
    misses, walks = tlb.misses, trig.env.mgr.counters.walks
    h2, s2 = one_request(trig, ring)
    assert ring.pop_used() == [(h2, 1)] and trig.status_of(s2) == BlkStatus.OK
    # the rings' accesses were served by the views, still counted as translations / hits
    assert tlb.misses == misses and trig.env.mgr.counters.walks == walks
    assert windows(trig) == {"desc": True, "avail": True, "used": True}


def test_unmap_and_tlbi_make_the_next_request_fault(trig: Rig) -> None:
    ring = trig.start()
    h1, _ = one_request(trig, ring)
    assert ring.pop_used() == [(h1, 1)] and windows(trig)["avail"]
    trig.pt.unmap(0, level=2)  # the driver unmaps the rings' block ...
    tlbi(trig, 0, BLOCK)  # ... and invalidates it
    trig.request(ReqType.FLUSH)
    trig.kick()
    # not the stale view: the avail ring read translates again and faults
    assert trig.dev.status & Status.DEVICE_NEEDS_RESET and ring.used_idx() == 1
    ev = trig.env.events[-1]
    assert ev.name == "F_TRANSLATION" and ev.addr == trig.bus(ring.avail)  # type: ignore[attr-defined]


def test_unmap_without_tlbi_behaves_as_the_tlb_does(trig: Rig) -> None:
    """Until the driver invalidates, the SMMU may use its cached translation: the pinned
    view serves exactly as long as the TLB would have hit."""
    ring = trig.start()
    one_request(trig, ring)
    ring.pop_used()
    trig.pt.unmap(0, level=2)
    h2, s2 = one_request(trig, ring)
    assert ring.pop_used() == [(h2, 1)] and trig.status_of(s2) == BlkStatus.OK
    t = trig.env.mgr.translate_one(SID, None, trig.bus(ring.used), True)
    assert not t.fault and t.pa == ring.used  # the TLB still hits too


def test_remap_and_tlbi_use_the_new_mapping(trig: Rig) -> None:
    # the rings' block as 4 KiB pages, so that one page can move
    trig.pt.unmap(0, level=2)
    trig.pt.map_range(0, RAM, BLOCK)
    tlbi(trig, 0, BLOCK)
    ring = trig.start()
    h1, _ = one_request(trig, ring)
    assert ring.pop_used() == [(h1, 1)] and windows(trig)["used"]
    # the driver moves the rings' page: copy, remap, invalidate
    page = RING & ~0xFFF
    new = DATA + (8 << 20)
    trig.mem.write(new, trig.mem.read(page, 4096))
    trig.pt.map(trig.bus(page), new)
    tlbi(trig, trig.bus(page), 4096)
    moved = Ring(trig.mem, new + (RING - page), RING_SIZE)  # (zeroes the copy) ...
    trig.mem.write(new, trig.mem.read(page, 4096))  # ... restore it
    moved.free, moved.avail_idx, moved.last_used = ring.free, ring.avail_idx, ring.last_used
    trig.ring = moved
    h2, s2 = one_request(trig, moved)
    assert moved.pop_used() == [(h2, 1)] and trig.status_of(s2) == BlkStatus.OK
    assert ring.used_idx() == 1  # nothing written through the old mapping


def test_cfgi_and_flush_drop_the_pins(trig: Rig) -> None:
    ring = trig.start()
    one_request(trig, ring)
    assert all(windows(trig).values())
    mgr = trig.env.mgr
    config = mgr.translator.caches.config
    before = {n: w._get for n, w in rings(trig).items()}
    misses = config.context_misses
    mgr.stream_table_changed(SID)  # CMD_CFGI_STE: the stream's context goes
    one_request(trig, ring)
    assert config.context_misses > misses  # the rings were translated again ...
    after = {n: w._get for n, w in rings(trig).items()}
    assert all(after.values()) and all(after[n] is not before[n] for n in after)  # ... re-pinned
    walks = mgr.counters.walks
    mgr.flush_all()
    one_request(trig, ring)
    assert mgr.counters.walks > walks and len(ring.pop_used()) == 3


def test_memory_map_change_drops_the_pin() -> None:
    env = SmmuEnv()
    try:
        (pt,) = env.s1_stream(SID)
        pt.map(0x10_0000, DATA)
        mgr = env.mgr
        mgr.dma_read(SID, None, 0x10_0000, 8)  # translated: the TLB holds the page
        pv = mgr.dma_pinned(SID, None, 0x10_0000, 4096, False)
        assert pv is not None and pv.get(8) is not None
        assert mgr.dma_pinned(SID, None, 0x10_0000, 8192, False) is None  # not all cached
        fd = os.memfd_create("more")
        os.ftruncate(fd, 0x1000)
        env.mem.add(0x1_0000_0000, 0x1000, PROT_READ | PROT_WRITE, fd=fd)  # DMA_MAP
        os.close(fd)
        assert pv.get(8) is None and pv.get(8) is None  # gone for good
    finally:
        env.close()


@pytest.mark.parametrize("watcher", ["injector", "sanitizer", "xlat-trace"])
def test_watched_translations_are_never_pinned(trig: Rig, watcher: str) -> None:
    ring = trig.start()
    one_request(trig, ring)
    assert all(windows(trig).values())
    mgr = trig.env.mgr
    if watcher == "injector":  # an armed rule on the avail ring: the next read fails
        inj = FaultInjector().install(mgr)
        inj.add_fault(SID, trig.bus(ring.avail) & ~0xFFF)
    elif watcher == "sanitizer":
        mgr.sanitizer = Sanitizer(mgr.trace)
    else:
        mgr.trace.on_xlat = True
    trig.request(ReqType.FLUSH)
    trig.kick()
    if watcher == "injector":
        assert trig.dev.status & Status.DEVICE_NEEDS_RESET
        assert trig.env.events[-1].name == "F_TRANSLATION"  # type: ignore[attr-defined]
        return
    assert len(ring.pop_used()) == 2
    assert not any(windows(trig).values())  # translated each access, pinned nothing


def _memfd_fds() -> int:
    fds = os.listdir("/proc/self/fd")
    return sum(1 for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")
               and os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"))


def test_a_pinned_ring_does_not_keep_unmapped_guest_ram(trig: Rig) -> None:
    """A client that goes away (QEMU killed) unmaps all guest RAM: the mappings and
    their fds are closed at once, although the queue still holds its pinned windows."""
    ring = trig.start()
    one_request(trig, ring)
    assert all(windows(trig).values())
    before = _memfd_fds()
    closed = trig.env.mem.clear()  # each fd-backed region's mapping holds one fd
    assert closed and _memfd_fds() == before - len(closed)
