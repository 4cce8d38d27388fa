"""The socket transport over a real UNIX socket pair: every message that arrived together
is read in one ``recvmsg``, each message gets the descriptors it was sent with, and
replies without descriptors leave in one ``send``."""

from __future__ import annotations

import array
import asyncio
import os
import socket

from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user import transport
from viommu_backend.vfio_user.connection import Connection, Request, close_fds
from viommu_backend.vfio_user.transport import SocketTransport

C = p.Command


def _send(sock: socket.socket, frame: bytes, fds: list[int] = ()) -> None:
    """One sendmsg per message, its descriptors with its first byte (as QEMU sends)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    assert sock.sendmsg([frame], anc) == len(frame)


def _write(msg_id: int) -> bytes:
    return p.frame(msg_id, C.REGION_WRITE, p.RegionAccess(0x10, 0, 4, b"abcd").encode(),
                   p.MsgFlags.REQUEST | p.MsgFlags.NO_REPLY)


def _dma_map(msg_id: int) -> bytes:
    return p.frame(msg_id, C.DMA_MAP, p.DmaMap(3, 0, 0x4000_0000, 0x1000).encode())


class Reads:
    """A server-side transport on one end of a socket pair; ``batches`` holds the events
    of each read (the transport hands over each read's events in one call)."""

    def __init__(self) -> None:
        self.peer, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn = Connection(server=True)
        self.conn.feed(p.frame(0, C.VERSION, p.Version().encode()))  # negotiated
        self.conn.outgoing()
        self.batches: list[list] = []
        self.transport = SocketTransport(mine, self.conn, self.batches.append, lambda: None)

    def read_now(self) -> None:
        self.transport._readable()  # what the loop calls when the socket is readable

    def close(self) -> None:
        for batch in self.batches:
            for ev in batch:
                close_fds(getattr(ev, "fds", ()))
        self.transport.close()
        self.peer.close()


async def test_messages_that_arrived_together_are_one_read_and_keep_their_fds() -> None:
    r = Reads()
    fd = os.memfd_create("ram")
    try:
        _send(r.peer, _write(1))
        _send(r.peer, _dma_map(2), [fd])  # the kernel glues it to the write's bytes
        _send(r.peer, _write(3))          # ... but ends the read after its descriptors
        r.read_now()
        assert [[ev.header.msg_id for ev in batch] for batch in r.batches] == [[1, 2], [3]]
        (write, dma_map), (write2,) = r.batches
        assert all(isinstance(ev, Request) for ev in (write, dma_map, write2))
        assert write.fds == [] and write2.fds == [] and len(dma_map.fds) == 1
        assert os.fstat(dma_map.fds[0]).st_ino == os.fstat(fd).st_ino
    finally:
        os.close(fd)
        r.close()


async def test_a_message_cut_by_the_read_size_takes_the_fds_of_its_first_bytes(monkeypatch) -> None:
    monkeypatch.setattr(transport, "READ_SIZE", p.HEADER_SIZE + 8)  # reads end mid-message
    r = Reads()
    fd = os.memfd_create("ram")
    try:
        _send(r.peer, _write(1))
        _send(r.peer, _dma_map(2), [fd])
        r.read_now()
        events = [ev for batch in r.batches for ev in batch]
        assert [ev.header.msg_id for ev in events] == [1, 2]
        assert events[0].fds == [] and len(events[1].fds) == 1
    finally:
        os.close(fd)
        r.close()


async def test_replies_without_fds_leave_in_one_send() -> None:
    r = Reads()
    sends: list[int] = []
    real = r.transport.sock

    class Counting:  # the real socket; each send counted
        def __getattr__(self, name):
            return getattr(real, name)

        def send(self, data) -> int:
            sends.append(len(data))
            return real.send(data)

    r.transport.sock = Counting()
    reads = r.conn.feed(b"".join(p.frame(i, C.REGION_READ, p.RegionAccess(0, 0, 4).encode())
                                 for i in (1, 2, 3)))
    for req in reads:
        r.conn.reply(req, b"x" * req.header.msg_id)
    r.transport.flush()
    frames = [p.frame(i, C.REGION_READ, b"x" * i, p.MsgFlags.REPLY) for i in (1, 2, 3)]
    assert sends == [sum(map(len, frames))]
    r.peer.setblocking(False)
    assert r.peer.recv(1 << 16) == b"".join(frames)
    r.transport.sock = real
    r.close()
    await asyncio.sleep(0)
