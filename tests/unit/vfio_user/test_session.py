"""The sans-IO vfio-user Session without sockets: a client-side Connection makes the
requests, the session's output is fed back to it; the device is the real DMA test device."""

from __future__ import annotations

import errno
import os
from typing import Any, Sequence

import pytest

from viommu_backend.endpoints.testdev import (
    DEVICE_ID, MAGIC, MSIX_VECTORS, REGS, VENDOR_ID, TestDevice)
from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.connection import Connection, ConnectionEvent, Reply, Request
from viommu_backend.vfio_user.device import PciIrq, PciRegion
from viommu_backend.vfio_user.protocol import IrqSetFlags as F
from viommu_backend.vfio_user.session import Action, Session, SignalEventfd

C = p.Command
GUEST = 0x4000_0000
PAGE = 0x1000
MSIX = int(PciIrq.MSIX)
OFF = {r.name: r.offset for r in REGS.registers}


class Peer:
    """The client end: its requests go into the session, the session's frames come back."""

    def __init__(self, session: Session, layout: p.DmaRwLayout = p.QEMU_DMA_RW) -> None:
        self.session = session
        self.conn = Connection(server=False, dma_layout=layout)
        self.actions: list[Action] = []

    def exchange(self, wire: bytes = b"", fds: Sequence[int] = ()) -> list[ConnectionEvent]:
        """Deliver the client's queued frames (and ``wire``); return what comes back."""
        for data, sent in self.conn.outgoing() + ([(wire, list(fds))] if wire else []):
            self.actions += self.session.receive(data, sent)
        back: list[ConnectionEvent] = []
        for data, sent in self.session.outgoing():
            back += self.conn.feed(data, sent)
        return back

    def call(self, msg: Any, fds: Sequence[int] = (), *, command: int | None = None) -> Reply:
        self.conn.send_request(msg, fds, command=command)
        (reply,) = self.exchange()
        assert isinstance(reply, Reply)
        return reply

    def error(self, msg: Any, fds: Sequence[int] = (), *, command: int | None = None) -> int:
        reply = self.call(msg, fds, command=command)
        assert reply.error, f"{msg} succeeded"
        return reply.error

    def read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.call(p.RegionAccess(offset, region, count), command=C.REGION_READ)
        assert reply.error == 0
        return reply.msg.data


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def peer() -> Peer:
    """A negotiated session with the test device."""
    peer = Peer(Session(TestDevice()))
    assert peer.call(p.Version()).error == 0
    return peer


def test_version_first_and_only_once() -> None:
    peer = Peer(Session(TestDevice(), limits=p.Limits(max_data_xfer_size=1 << 16)))
    assert peer.error(p.RegionAccess(0, PciRegion.CONFIG, 4), command=C.REGION_READ) == errno.EINVAL
    assert peer.error(p.DeviceGetInfo()) == errno.EINVAL and not peer.session.negotiated
    reply = peer.call(p.Version(caps={"max_data_xfer_size": 1 << 20, "pgsizes": 4096}))
    assert reply.error == 0 and peer.session.negotiated
    assert reply.msg.caps == {"max_data_xfer_size": 1 << 16, "pgsizes": 4096}  # ours is lower
    assert peer.session.conn.limits.max_data_xfer_size == 1 << 16
    assert peer.error(p.Version()) == errno.EINVAL
    assert peer.session.conn.limits.max_data_xfer_size == 1 << 16  # the second changed nothing
    assert peer.error(p.Version(major=1)) == errno.EINVAL


def test_major_version_mismatch_is_refused() -> None:
    peer = Peer(Session(TestDevice()))
    assert peer.error(p.Version(major=1)) == errno.ENOTSUP and not peer.session.negotiated


def test_device_region_and_irq_info(peer: Peer) -> None:
    info = peer.call(p.DeviceGetInfo()).msg
    assert (info.num_regions, info.num_irqs) == (PciRegion.NUM, PciIrq.NUM)
    assert peer.call(p.RegionInfoMsg(32, index=PciRegion.CONFIG)).msg.size == 4096
    assert peer.error(p.RegionInfoMsg(32, index=PciRegion.NUM)) == errno.EINVAL
    assert peer.call(p.IrqInfoMsg(index=MSIX)).msg.count == MSIX_VECTORS
    assert peer.error(p.IrqInfoMsg(index=PciIrq.NUM)) == errno.EINVAL


def test_region_read_write(peer: Peer) -> None:
    cfg = peer.read(PciRegion.CONFIG, 0, 4)
    assert cfg == (VENDOR_ID | DEVICE_ID << 16).to_bytes(4, "little")
    assert peer.read(PciRegion.BAR0, OFF["MAGIC"], 4) == MAGIC.to_bytes(4, "little")
    write = p.RegionAccess(OFF["SCRATCH"], PciRegion.BAR0, 4, b"\x78\x56\x34\x12")
    assert peer.call(write, command=C.REGION_WRITE).error == 0
    assert peer.read(PciRegion.BAR0, OFF["SCRATCH"], 4) == b"\x78\x56\x34\x12"
    # posted: performed, never answered
    peer.conn.send_request(p.RegionAccess(OFF["SCRATCH"], PciRegion.BAR0, 4, bytes(4)),
                           command=C.REGION_WRITE, no_reply=True)
    assert peer.exchange() == []
    assert peer.read(PciRegion.BAR0, OFF["SCRATCH"], 4) == bytes(4)
    multi = p.RegionWriteMulti([p.RegionAccess(OFF["SCRATCH"], PciRegion.BAR0, 2, b"\x01\x02"),
                                p.RegionAccess(OFF["SCRATCH"] + 2, PciRegion.BAR0, 2, b"\x03\x04")])
    peer.conn.send_request(multi, no_reply=True)
    assert peer.exchange() == []
    assert peer.read(PciRegion.BAR0, OFF["SCRATCH"], 4) == b"\x01\x02\x03\x04"


@pytest.mark.parametrize("region,offset,count,err", [
    (PciRegion.CONFIG, 4094, 4, errno.EINVAL),  # beyond the region
    (PciRegion.NUM, 0, 4, errno.EINVAL),  # no such region
    (PciRegion.BAR1, 0, 4, errno.EINVAL),  # a region of size 0
    (PciRegion.CONFIG, 0, 2 << 20, errno.E2BIG),  # more than max_data_xfer_size
])
def test_bad_region_access_gets_error_reply(peer: Peer, region: int, offset: int, count: int,
                                            err: int) -> None:
    assert peer.error(p.RegionAccess(offset, region, count), command=C.REGION_READ) == err
    assert peer.read(PciRegion.CONFIG, 0, 2) == VENDOR_ID.to_bytes(2, "little")  # still serving


def test_dma_map_and_unmap_with_fds(peer: Peer) -> None:
    baseline = nfds()
    ram = memfd(4 * PAGE)
    try:
        assert peer.call(p.DmaMap(3, 0, GUEST, 2 * PAGE), [os.dup(ram)]).error == 0
        assert peer.call(p.DmaMap(1, 2 * PAGE, GUEST + 2 * PAGE, PAGE), [os.dup(ram)]).error == 0
        peer.session.memory.write(GUEST + 2 * PAGE - 4, b"abcd")
        assert os.pread(ram, 4, 2 * PAGE - 4) == b"abcd"
        os.pwrite(ram, b"wxyz", 2 * PAGE)
        assert peer.session.memory.read(GUEST + 2 * PAGE, 4) == b"wxyz"  # fd offset honoured
        assert peer.error(p.DmaMap(3, 0, GUEST + PAGE, PAGE), [os.dup(ram)]) == errno.EEXIST
        assert peer.error(p.DmaMap(3, 0, GUEST + 8 * PAGE + 1, PAGE), [os.dup(ram)]) == errno.EINVAL
        assert peer.error(p.DmaUnmap(0, GUEST, PAGE)) == errno.EINVAL  # would split a mapping
        assert peer.call(p.DmaUnmap(0, GUEST, 2 * PAGE)).msg.size == 2 * PAGE
        assert [r.iova for r in peer.session.memory.regions] == [GUEST + 2 * PAGE]
        assert peer.call(p.DmaUnmap(p.DmaUnmapFlags.ALL, 0, 0)).msg.size == PAGE
        assert peer.session.memory.regions == []
    finally:
        os.close(ram)
    assert nfds() == baseline  # every descriptor passed in was closed or unmapped


def test_dma_map_without_fd_needs_dma_read(peer: Peer) -> None:
    assert peer.call(p.DmaMap(3, 0, GUEST, PAGE)).error == 0
    (region,) = peer.session.memory.regions
    assert region.iova == GUEST and region.size == PAGE


def test_set_irqs_eventfds_mask_and_trigger(peer: Peer) -> None:
    baseline = nfds()
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(MSIX_VECTORS)]
    s = peer.session
    assert peer.call(p.IrqSet(F.DATA_EVENTFD | F.ACTION_TRIGGER, MSIX, 0, MSIX_VECTORS),
                     [os.dup(fd) for fd in efds]).error == 0
    assert all(s.irq_eventfd(MSIX, v) is not None for v in range(MSIX_VECTORS))
    assert s.irq_eventfd(MSIX, MSIX_VECTORS) is None and s.irq_eventfd(PciIrq.INTX) is None
    # DATA_BOOL trigger: the session asks its owner to signal vector 1 only
    peer.call(p.IrqSet(F.DATA_BOOL | F.ACTION_TRIGGER, MSIX, 0, 2, b"\0\1"))
    assert peer.actions == [SignalEventfd(s.irq_eventfd(MSIX, 1))]
    # mask / unmask vector 0
    peer.call(p.IrqSet(F.DATA_NONE | F.ACTION_MASK, MSIX, 0, 1))
    assert s.irq_eventfd(MSIX, 0) is None and s.irq_eventfd(MSIX, 1) is not None
    peer.call(p.IrqSet(F.DATA_BOOL | F.ACTION_UNMASK, MSIX, 0, 1, b"\1"))
    assert s.irq_eventfd(MSIX, 0) is not None
    # bad requests change nothing
    assert peer.error(p.IrqSet(F.DATA_NONE | F.ACTION_TRIGGER, MSIX, 1, 2)) == errno.EINVAL
    assert peer.error(p.IrqSet(F.DATA_NONE | F.ACTION_TRIGGER, PciIrq.NUM, 0, 1)) == errno.EINVAL
    assert peer.error(p.IrqSet(F.DATA_EVENTFD | F.ACTION_MASK, MSIX, 0, 1),
                      [os.eventfd(0)]) == errno.ENOTSUP
    assert peer.error(p.IrqSet(F.DATA_EVENTFD | F.ACTION_TRIGGER, MSIX, 0, 2),
                      [os.eventfd(0)]) == errno.EINVAL  # one eventfd for two vectors
    # DATA_NONE, count 0: drop every eventfd of the index
    peer.call(p.IrqSet(F.DATA_NONE | F.ACTION_TRIGGER, MSIX, 0, 0))
    assert s.irq_eventfd(MSIX, 0) is None and s.irq_eventfd(MSIX, 1) is None
    for fd in efds:
        os.close(fd)
    assert nfds() == baseline


def test_dma_request_in_the_connections_layout() -> None:
    session = Session(TestDevice(), dma_layout=p.SPEC_DMA_RW)
    peer = Peer(session, p.SPEC_DMA_RW)
    peer.call(p.Version())
    msg_id = session.send_dma(p.DmaAccess(GUEST, 4), C.DMA_READ)
    (req,) = peer.exchange()
    assert isinstance(req, Request) and req.msg == p.DmaAccess(GUEST, 4)
    peer.conn.reply(req, peer.conn.encode(p.DmaAccess(GUEST, 4, b"DATA")))
    peer.exchange()
    (reply,) = peer.actions
    assert isinstance(reply, Reply) and reply.header.msg_id == msg_id
    assert reply.msg.data == b"DATA"


def test_malformed_message_gets_error_reply_and_session_keeps_serving(peer: Peer) -> None:
    bad = p.frame(0x77, C.DMA_MAP, b"\x01\x02")  # shorter than struct vfio_user_dma_map
    assert peer.session.receive(bad) == []
    ((wire, fds),) = peer.session.outgoing()
    hdr = p.Header.unpack(wire)
    assert (hdr.msg_id, hdr.is_reply, hdr.is_error, hdr.error) == (0x77, True, True, errno.EINVAL)
    assert fds == [] and peer.session.memory.regions == []
    assert peer.read(PciRegion.CONFIG, 0, 2) == VENDOR_ID.to_bytes(2, "little")


def test_close_releases_everything() -> None:
    baseline = nfds()
    dev = TestDevice()
    peer = Peer(Session(dev))
    peer.call(p.Version())
    ram = memfd(PAGE)
    peer.call(p.DmaMap(3, 0, GUEST, PAGE), [ram])
    peer.call(p.IrqSet(F.DATA_EVENTFD | F.ACTION_TRIGGER, MSIX, 0, 1), [os.eventfd(0)])
    peer.session.close()
    assert peer.session.memory.regions == [] and peer.session.irq_eventfd(MSIX) is None
    assert nfds() == baseline
    with pytest.raises(p.VfioUserError) as e:
        peer.session.send_dma(p.DmaAccess(GUEST, 4), C.DMA_READ)
    assert e.value.errno == errno.ENOTCONN
    peer.session.close()  # twice is harmless
