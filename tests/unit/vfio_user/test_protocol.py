"""vfio-user codec and sans-IO connection: round trips, negotiation, malformed input."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest

from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.connection import Connection, Reply, Request, Violation
from viommu_backend.vfio_user.device import VfioUserError

C = p.Command

ROUND_TRIPS = [
    (C.VERSION, p.Version(0, 0, {"max_msg_fds": 8, "pgsizes": 4096})),
    (C.DMA_MAP, p.DmaMap(3, 0x1000, 0x4000_0000, 0x4000_0000)),
    (C.DMA_UNMAP, p.DmaUnmap(0, 0x4000_0000, 0x1000)),
    (C.DMA_UNMAP, p.DmaUnmap(p.DmaUnmapFlags.ALL, 0, 0)),
    (C.DEVICE_GET_INFO, p.DeviceGetInfo(16, 3, 9, 5)),
    (C.DEVICE_GET_REGION_INFO, p.RegionInfoMsg(64, 0xF, 0, 32, 0x20000, 0,
                                               p.encode_sparse_mmap_cap([(0, 0x1000)], 32))),
    (C.DEVICE_GET_REGION_IO_FDS, p.RegionIoFds(16, 0, 2, 0)),
    (C.DEVICE_GET_IRQ_INFO, p.IrqInfoMsg(16, 1, 2, 64)),
    (C.DEVICE_SET_IRQS, p.IrqSet(p.IrqSetFlags.DATA_EVENTFD | p.IrqSetFlags.ACTION_TRIGGER, 2, 0, 4)),
    (C.DEVICE_SET_IRQS, p.IrqSet(p.IrqSetFlags.DATA_BOOL | p.IrqSetFlags.ACTION_MASK, 0, 0, 2, b"\x01\x00")),
    (C.REGION_READ, p.RegionAccess(0x30, 7, 4)),
    (C.REGION_WRITE, p.RegionAccess(0x10, 0, 4, b"\x01\x02\x03\x04")),
    (C.DMA_READ, p.DmaAccess(0x4000_1000, 64)),
    (C.DMA_WRITE, p.DmaAccess(0x4000_1000, 3, b"abc")),
    (C.DEVICE_RESET, p.DeviceReset()),
    (C.REGION_WRITE_MULTI, p.RegionWriteMulti([p.RegionAccess(0, 0, 4, b"wxyz"),
                                               p.RegionAccess(8, 2, 8, b"12345678")])),
]


@pytest.mark.parametrize("command,msg", ROUND_TRIPS, ids=[f"{c.name}-{i}" for i, (c, _) in
                                                          enumerate(ROUND_TRIPS)])
def test_request_round_trip(command: C, msg: object) -> None:
    body = Connection().encode(msg)
    wire = p.frame(7, command, body)
    hdr = p.Header.unpack(wire)
    assert (hdr.msg_id, hdr.command, hdr.size, hdr.flags) == (7, command, len(wire), 0)
    assert p.decode_request(command, wire[p.HEADER_SIZE:], dma_layout=p.QEMU_DMA_RW) == msg


def test_region_info_sparse_cap_chain() -> None:
    cap = p.encode_sparse_mmap_cap([(0, 0x1000), (0x2000, 0x3000)], 32)
    msg = p.RegionInfoMsg(32 + len(cap), 0xF, 0, 32, 0x10000, 0, cap)
    caps = p.decode_caps(msg.encode(), 32)
    assert p.decode_sparse_mmap_cap(caps[p.REGION_INFO_CAP_SPARSE_MMAP]) == [(0, 0x1000), (0x2000, 0x3000)]


def test_dma_rw_uses_qemu_layout() -> None:
    # QEMU 11: u64 offset, u32 count, data right after (body offset 12), hdr.size >= 32.
    conn = Connection()  # the default layout is QEMU's
    w = p.frame(1, C.DMA_WRITE, conn.encode(p.DmaAccess(0x1000, 4, b"WXYZ")))
    assert len(w) == 32 + 4
    assert struct.unpack_from("<QI", w, 16) == (0x1000, 4)
    assert w[28:32] == b"WXYZ"
    r = p.frame(2, C.DMA_READ, conn.encode(p.DmaAccess(0x1000, 4)))
    assert len(r) == 32
    # A QEMU-style DMA_READ reply: size count + 32, data at byte 28.
    reply_body = struct.pack("<QI", 0x1000, 4) + b"DATA" + b"\0" * 4
    assert p.decode_reply(C.DMA_READ, reply_body, p.DmaAccess(0x1000, 4),
                          dma_layout=p.QEMU_DMA_RW).data == b"DATA"


def test_spec_layout_is_a_connection_setting() -> None:
    body = p.DmaAccess(0x2000, 2, b"hi").encode(p.SPEC_DMA_RW)
    assert struct.unpack_from("<QQ", body) == (0x2000, 2) and body[16:] == b"hi"
    assert p.DmaAccess.decode(body, with_data=True, layout=p.SPEC_DMA_RW).data == b"hi"
    # Two connections in one process, each with its own layout.
    spec, qemu = Connection(dma_layout=p.SPEC_DMA_RW), Connection()
    spec_client = Connection(server=False, dma_layout=p.SPEC_DMA_RW)
    mid = spec.send_request(p.DmaAccess(0x2000, 2, b"hi"), command=C.DMA_WRITE)
    qemu.send_request(p.DmaAccess(0x2000, 2, b"hi"), command=C.DMA_WRITE)
    ((wire, _),) = spec.outgoing()
    ((qwire, _),) = qemu.outgoing()
    assert wire[p.HEADER_SIZE:] == body and len(qwire) == p.HEADER_SIZE + 16 + 2
    (req,) = spec_client.feed(wire)
    assert isinstance(req, Request) and req.msg == p.DmaAccess(0x2000, 2, b"hi")
    spec_client.reply(req)
    (ev,) = spec.feed(spec_client.outgoing()[0][0])
    assert isinstance(ev, Reply) and ev.header.msg_id == mid and ev.error == 0


QEMU_CAPS = {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
             "max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096,
             "max_dma_maps": 65535, "write_multiple": True}


def test_negotiate_reply_is_subset_of_proposal() -> None:
    caps = dict(QEMU_CAPS, twin_socket={"supported": True})
    reply, lim = p.negotiate(p.Version(0, 0, caps), p.Limits(max_msg_fds=8))
    assert set(reply.caps) <= set(caps)
    assert "migration" not in reply.caps and "twin_socket" not in reply.caps
    for k, v in reply.caps.items():
        if not isinstance(v, bool):
            assert v <= caps[k]
    assert reply.caps["max_msg_fds"] == 8 and lim.max_msg_fds == 8
    assert lim.write_multiple and lim.max_data_xfer_size == 1 << 20
    # The encoded reply is no larger than the request (QEMU's receive buffer).
    assert len(reply.encode()) <= len(p.Version(0, 0, QEMU_CAPS).encode())
    decoded = p.Version.decode(reply.encode())
    assert decoded.caps == reply.caps


def test_negotiate_errors() -> None:
    with pytest.raises(VfioUserError) as e:
        p.negotiate(p.Version(1, 0, {}), p.Limits())
    assert e.value.errno == errno.ENOTSUP
    with pytest.raises(VfioUserError) as e:
        p.Version.decode(struct.pack("<HH", 0, 0) + b"{not json\0")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(VfioUserError) as e:
        p.negotiate(p.Version(0, 0, {"max_msg_fds": "lots"}), p.Limits())
    assert e.value.errno == errno.EINVAL


# --- connection ----------------------------------------------------------------------------
def _replies(conn: Connection) -> list[p.Header]:
    return [p.Header.unpack(data) for data, _ in conn.outgoing()]


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _valid_read(msg_id: int = 50) -> bytes:
    return p.frame(msg_id, C.REGION_READ, p.RegionAccess(0, 0, 4).encode())


def test_feed_byte_by_byte() -> None:
    conn = Connection()
    wire = p.frame(1, C.DEVICE_GET_INFO, p.DeviceGetInfo().encode()) + _valid_read(2)
    events = []
    for i in range(len(wire)):
        events += conn.feed(wire[i:i + 1])
    assert [type(e) for e in events] == [Request, Request]
    assert [e.header.msg_id for e in events] == [1, 2]
    assert not conn.mid_message


MALFORMED = [
    ("short-size", p.Header(9, C.REGION_READ, 8).pack(), errno.EINVAL),
    ("size-payload-mismatch", p.frame(9, C.REGION_WRITE, p.RegionAccess(0, 0, 8, b"abcd").encode()),
     errno.EINVAL),
    ("truncated-body", p.frame(9, C.DMA_MAP, b"\x20\0\0\0"), errno.EINVAL),
    ("bad-argsz", p.frame(9, C.DEVICE_GET_INFO, p.DeviceGetInfo(argsz=8).encode()), errno.EINVAL),
    ("bad-argsz-region", p.frame(9, C.DEVICE_GET_REGION_INFO, p.RegionInfoMsg(16).encode()),
     errno.EINVAL),
    ("unknown-command", p.frame(9, 99, b"xyz"), errno.ENOSYS),
    ("wrong-direction", p.frame(9, C.DMA_READ, p.DmaAccess(0, 4).encode(p.QEMU_DMA_RW)),
     errno.EINVAL),
    ("bad-type", p.Header(9, C.DEVICE_RESET, 16, 0x3).pack(), errno.EINVAL),
    ("oversize", p.Header(9, C.REGION_WRITE, 16 + (2 << 20)).pack() + bytes(2 << 20), errno.E2BIG),
    ("dirty-bitmap", p.frame(9, C.DMA_UNMAP, p.DmaUnmap(1, 0x1000, 0x1000).encode()), errno.ENOTSUP),
    ("unmap-all-with-range", p.frame(9, C.DMA_UNMAP, p.DmaUnmap(2, 0x1000, 0x1000).encode()),
     errno.EINVAL),
    ("map-zero-size", p.frame(9, C.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0).encode()), errno.EINVAL),
    ("irq-two-actions", p.frame(9, C.DEVICE_SET_IRQS,
                                p.IrqSet(p.IrqSetFlags.DATA_NONE | 8 | 16, 0, 0, 1).encode()), errno.EINVAL),
    ("irq-short-bools", p.frame(9, C.DEVICE_SET_IRQS,
                                p.IrqSet(p.IrqSetFlags.DATA_BOOL | 32, 0, 0, 4, argsz=20).encode()), errno.EINVAL),
    ("multi-oversize-entry", p.frame(9, C.REGION_WRITE_MULTI, struct.pack("<QQII8s", 1, 0, 0, 9, b"")),
     errno.EINVAL),
    ("version-not-object", p.frame(9, C.VERSION, struct.pack("<HH", 0, 0) + b"[1]\0"), errno.EINVAL),
]


@pytest.mark.parametrize("name,wire,err", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_gets_error_and_stream_stays_sane(name: str, wire: bytes, err: int) -> None:
    conn = Connection()
    events = conn.feed(wire + _valid_read(50))
    assert isinstance(events[0], Violation) and events[0].errno == err
    assert isinstance(events[1], Request) and events[1].header.msg_id == 50
    (reply,) = _replies(conn)
    assert reply.msg_id == 9 and reply.is_reply and reply.is_error and reply.error == err
    assert reply.size == p.HEADER_SIZE


def test_posted_malformed_gets_no_reply() -> None:
    conn = Connection()
    bad = p.frame(3, C.REGION_WRITE, p.RegionAccess(0, 0, 8, b"ab").encode(), p.MsgFlags.NO_REPLY)
    events = conn.feed(bad)
    assert isinstance(events[0], Violation)
    assert conn.outgoing() == []


def test_too_many_fds_closed_and_rejected() -> None:
    conn = Connection()
    fds = [os.eventfd(0), os.eventfd(0)]
    events = conn.feed(p.frame(4, C.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0x1000).encode()), fds)
    assert isinstance(events[0], Violation) and events[0].errno == errno.EINVAL
    assert not any(_fd_open(fd) for fd in fds)
    # Beyond the negotiated max_msg_fds as well.
    conn = Connection(limits=p.Limits(max_msg_fds=2))
    fds = [os.eventfd(0) for _ in range(3)]
    events = conn.feed(p.frame(5, C.DEVICE_SET_IRQS,
                               p.IrqSet(p.IrqSetFlags.DATA_EVENTFD | 32, 2, 0, 3).encode()), fds)
    assert isinstance(events[0], Violation)
    assert not any(_fd_open(fd) for fd in fds)
    assert _replies(conn)[0].error == errno.EINVAL


def test_valid_fds_handed_to_request() -> None:
    conn = Connection()
    fd = os.eventfd(0)
    (ev,) = conn.feed(p.frame(4, C.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0x1000).encode()), [fd])
    assert isinstance(ev, Request) and ev.fds == [fd] and _fd_open(fd)
    os.close(fd)


def test_a_reads_fds_go_to_the_last_message_that_starts_in_it() -> None:
    """A UNIX socket read ends right after the bytes that carried descriptors, so they
    belong to the last message starting in the read (even one the read cuts short)."""
    dma_map = p.frame(4, C.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0x1000).encode())
    for cut in (len(dma_map), p.HEADER_SIZE + 3, 5):  # all of it, mid-body, mid-header
        conn = Connection()
        fd = os.eventfd(0)
        events = conn.feed(_valid_read(1) + _valid_read(2) + dma_map[:cut], [fd])
        events += conn.feed(dma_map[cut:])
        assert [type(ev) for ev in events] == [Request] * 3
        assert [ev.fds for ev in events] == [[], [], [fd]]
        os.close(fd)
    # A read that only continues a message: its fds stay with that message.
    conn = Connection()
    fd = os.eventfd(0)
    assert conn.feed(dma_map[:10]) == []
    (ev,) = conn.feed(dma_map[10:], [fd])
    assert ev.fds == [fd]
    os.close(fd)


def test_fds_sent_with_the_wrong_message_are_closed() -> None:
    """A peer that passes a DMA_MAP's memfd with the bytes of the next message: that one
    takes no descriptors, so it is refused and the memfd closed."""
    conn = Connection()
    fd = os.eventfd(0)
    dma_map = p.frame(4, C.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0x1000).encode())
    events = conn.feed(dma_map + _valid_read(5), [fd])
    assert isinstance(events[0], Request) and events[0].fds == []
    assert isinstance(events[1], Violation) and not _fd_open(fd)


def test_reply_to_nothing_is_dropped() -> None:
    conn = Connection()
    events = conn.feed(p.frame(77, C.DMA_READ, b"x" * 20, p.MsgFlags.REPLY) + _valid_read(1))
    assert isinstance(events[0], Violation) and "never sent" in events[0].message
    assert isinstance(events[1], Request)
    assert conn.outgoing() == []


def test_server_initiated_request_and_reply() -> None:
    conn = Connection()
    mid = conn.send_request(p.DmaAccess(0x1000, 4), command=C.DMA_READ)
    ((wire, fds),) = conn.outgoing()
    assert p.Header.unpack(wire).command == C.DMA_READ and mid in conn.outstanding
    body = conn.encode(p.DmaAccess(0x1000, 4, b"abcd"))
    (ev,) = conn.feed(p.frame(mid, C.DMA_READ, body, p.MsgFlags.REPLY))
    assert isinstance(ev, Reply) and ev.error == 0 and ev.msg.data == b"abcd"
    assert mid not in conn.outstanding
    mid = conn.send_request(p.DmaAccess(0x1000, 4), command=C.DMA_READ)
    (ev,) = conn.feed(p.error_frame(mid, C.DMA_READ, errno.ENODEV))
    assert isinstance(ev, Reply) and ev.error == errno.ENODEV
    # A reply carrying the wrong command for its msg_id.
    mid = conn.send_request(p.DmaAccess(0x1000, 4), command=C.DMA_READ)
    (ev,) = conn.feed(p.frame(mid, C.DMA_WRITE, b"", p.MsgFlags.REPLY))
    assert isinstance(ev, Violation)


def test_eof_mid_message_closes_fds() -> None:
    conn = Connection()
    fd = os.eventfd(0)
    wire = p.frame(4, C.DMA_MAP, p.DmaMap(3, 0, 0x1000, 0x1000).encode())
    assert conn.feed(wire[:20], [fd]) == []
    assert conn.mid_message
    conn.send_request(p.DmaAccess(0, 4), command=C.DMA_READ)
    lost = conn.eof()
    assert lost == [0] and not _fd_open(fd)


def test_version_json_is_nul_terminated() -> None:
    body = p.Version(0, 0, QEMU_CAPS).encode()
    assert body.endswith(b"\0")
    assert json.loads(body[4:-1]) == {"capabilities": QEMU_CAPS}
