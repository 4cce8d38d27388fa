"""The project's own asyncio vfio-user client (tests, tools, benchmarks).

It plays QEMU's part: negotiates VERSION, shares memfd-backed "guest RAM" with DMA_MAP,
queries device/region/irq info, accesses regions (posted writes too), hands eventfds
over with SET_IRQS and waits on them, and answers the server's DMA_READ / DMA_WRITE
against its own copy of guest memory.

    client = await VfioUserClient.connect("/run/x/viommu.sock")
    ram = await client.map_memory(0x4000_0000, 1 << 20)
    data = await client.region_read(0, 0x0, 4)
    await client.close()
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.connection import Connection, Reply, Request, Violation, close_fds
from viommu_backend.vfio_user.device import (
    DeviceFlags,
    DeviceInfo,
    IrqInfo,
    IrqInfoFlags,
    RegionFlags,
    RegionInfo,
    SparseArea,
    VfioUserError,
)
from viommu_backend.vfio_user.transport import SocketTransport

DEFAULT_TIMEOUT = 10.0  # seconds; only a guard against a hung peer


@dataclass(eq=False)
class ClientMemory:
    """A piece of the client's "guest RAM": a memfd mapped locally (and, when shared,
    passed to the server) or a private buffer reachable by the server only through
    DMA_READ/DMA_WRITE."""

    iova: int
    size: int
    fd: int | None
    _mm: mmap.mmap | None = field(default=None, repr=False)
    array: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8), repr=False)

    @property
    def end(self) -> int:
        return self.iova + self.size

    def read(self, addr: int, n: int) -> bytes:
        off = addr - self.iova
        return self.array[off:off + n].tobytes()

    def write(self, addr: int, data: bytes) -> None:
        off = addr - self.iova
        self.array[off:off + len(data)] = np.frombuffer(data, np.uint8)

    def close(self) -> None:
        self.array = np.zeros(0, np.uint8)
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class VfioUserClient:
    def __init__(self, sock: socket.socket, limits: p.Limits,
                 dma_layout: p.DmaRwLayout = p.QEMU_DMA_RW) -> None:
        self.loop = asyncio.get_running_loop()
        self.proposed = limits
        self.conn = Connection(server=False, limits=limits, dma_layout=dma_layout)
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self.memory: list[ClientMemory] = []
        self.eventfds: list[int] = []
        self.violations: list[Violation] = []
        self.dma_requests = 0
        self.closed = asyncio.Event()
        self.transport = SocketTransport(sock, self.conn, self._events, self._on_close)

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, limits: p.Limits | None = None,
                      negotiate: bool = True,
                      dma_layout: p.DmaRwLayout = p.QEMU_DMA_RW) -> "VfioUserClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return await cls.from_socket(sock, limits=limits, negotiate=negotiate,
                                     dma_layout=dma_layout)

    @classmethod
    async def from_socket(cls, sock: socket.socket, *, limits: p.Limits | None = None,
                          negotiate: bool = True,
                          dma_layout: p.DmaRwLayout = p.QEMU_DMA_RW) -> "VfioUserClient":
        """A client on an already connected socket (e.g. one end of a socketpair)."""
        sock.setblocking(False)
        client = cls(sock, limits or p.Limits(), dma_layout)
        if negotiate:
            try:
                await client.version()
            except BaseException:
                await client.close()
                raise
        return client

    # --- plumbing ----------------------------------------------------------------------
    def _events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Reply):
                fut = self._waiters.pop(ev.header.msg_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev)
                else:
                    close_fds(ev.fds)
            elif isinstance(ev, Request):
                self._serve_dma(ev)
            else:
                self.violations.append(ev)

    def _on_close(self) -> None:
        self.conn.eof()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("vfio-user server closed the connection"))
        self._waiters.clear()
        self.closed.set()

    def _find(self, addr: int, n: int) -> ClientMemory | None:
        for m in self.memory:
            if m.iova <= addr and addr + n <= m.end:
                return m
        return None

    def _serve_dma(self, req: Request) -> None:
        self.dma_requests += 1
        m: p.DmaAccess = req.msg
        close_fds(req.fds)
        region = self._find(m.address, m.count)
        if region is None:
            self.conn.reply_error(req, errno.EFAULT)
            return
        if req.header.command == p.Command.DMA_READ:
            data = region.read(m.address, m.count)
            body = self.conn.encode(p.DmaAccess(m.address, m.count, data))
        else:
            region.write(m.address, m.data)
            body = b""
        self.conn.reply(req, body)

    async def request(self, msg: Any, fds: Sequence[int] = (), *, command: int | None = None,
                      body: bytes | None = None, check: bool = True) -> Reply:
        """Send a request and await its reply (raising VfioUserError on an error reply
        unless ``check`` is False)."""
        if self.transport.closed:
            raise ConnectionResetError("not connected")
        msg_id = self.conn.send_request(msg, fds, command=command, body=body)
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self._waiters[msg_id] = fut
        self.transport.flush()
        reply = await asyncio.wait_for(fut, DEFAULT_TIMEOUT)
        if check and reply.error:
            raise VfioUserError(reply.error, f"{p.Command(reply.command).name}: "
                                f"{os.strerror(reply.error)}")
        return reply

    async def raw_request(self, command: int, body: bytes, fds: Sequence[int] = (), *,
                          size: int | None = None, flags: int = 0,
                          expect_reply: bool = True) -> Reply | None:
        """Send a hand-made (possibly malformed) message; ``size`` overrides the header
        size field.  Returns the reply when one is expected."""
        msg_id = self.conn._next_id
        self.conn._next_id = (msg_id + 1) & 0xFFFF
        hdr = p.Header(msg_id, command, size if size is not None else p.HEADER_SIZE + len(body),
                       flags)
        fut: asyncio.Future[Reply] | None = None
        if expect_reply:
            self.conn.outstanding[msg_id] = (command, None)
            fut = self.loop.create_future()
            self._waiters[msg_id] = fut
        self.conn._out.append((hdr.pack() + body, list(fds)))
        self.transport.flush()
        if fut is None:
            return None
        return await asyncio.wait_for(fut, DEFAULT_TIMEOUT)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Put bytes on the wire as they are (e.g. half a message)."""
        self.conn._out.append((data, list(fds)))
        self.transport.flush()

    # --- commands ----------------------------------------------------------------------
    async def version(self) -> p.Version:
        reply = await self.request(p.Version(caps=p.limits_caps(self.proposed)))
        self.version_reply: p.Version = reply.msg
        self.conn.limits = p.limits_from_reply(reply.msg, self.proposed)
        return reply.msg

    async def map_memory(self, iova: int, size: int, *, shared: bool = True,
                         prot: int = p.DmaMapFlags.READ | p.DmaMapFlags.WRITE) -> ClientMemory:
        """Create guest RAM at ``iova`` and DMA_MAP it (with its memfd when ``shared``)."""
        if shared:
            fd = os.memfd_create(f"guest-ram-{iova:x}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                raise
            mem = ClientMemory(iova, size, fd, mm, np.frombuffer(mm, np.uint8))
        else:
            mem = ClientMemory(iova, size, None, None, np.zeros(size, np.uint8))
        self.memory.append(mem)
        try:
            await self.request(p.DmaMap(int(prot), 0, iova, size),
                               [mem.fd] if mem.fd is not None else [])
        except BaseException:
            self.memory.remove(mem)
            mem.close()
            raise
        return mem

    async def unmap(self, iova: int, size: int) -> int:
        reply = await self.request(p.DmaUnmap(0, iova, size))
        for m in [m for m in self.memory if iova <= m.iova and m.end <= iova + size]:
            self.memory.remove(m)
            m.close()
        return reply.msg.size if reply.msg else 0

    async def unmap_all(self) -> None:
        await self.request(p.DmaUnmap(p.DmaUnmapFlags.ALL, 0, 0))
        for m in self.memory:
            m.close()
        self.memory.clear()

    async def device_info(self) -> DeviceInfo:
        r = (await self.request(p.DeviceGetInfo())).msg
        return DeviceInfo(DeviceFlags(r.flags), r.num_regions, r.num_irqs)

    async def region_info(self, index: int) -> RegionInfo:
        """Region info as QEMU asks for it (grow argsz when the capabilities don't fit).
        An mmap fd sent with the reply ends up in ``RegionInfo.fd`` (caller closes it)."""
        argsz = p.RegionInfoMsg.FIXED
        while True:
            reply = await self.request(p.RegionInfoMsg(argsz, index=index))
            r: p.RegionInfoMsg = reply.msg
            if r.argsz > argsz:
                close_fds(reply.fds)
                argsz = r.argsz
                continue
            break
        sparse: tuple[SparseArea, ...] = ()
        if r.flags & RegionFlags.CAPS and r.cap_offset:
            full = r.encode()
            caps = p.decode_caps(full, r.cap_offset)
            if p.REGION_INFO_CAP_SPARSE_MMAP in caps:
                sparse = tuple(SparseArea(o, s) for o, s in
                               p.decode_sparse_mmap_cap(caps[p.REGION_INFO_CAP_SPARSE_MMAP]))
        fd = reply.fds[0] if reply.fds else None
        close_fds(reply.fds[1:])
        return RegionInfo(r.index, RegionFlags(r.flags), r.size, r.offset, sparse, fd)

    async def irq_info(self, index: int) -> IrqInfo:
        r = (await self.request(p.IrqInfoMsg(16, 0, index, 0))).msg
        return IrqInfo(r.index, IrqInfoFlags(r.flags), r.count)

    async def region_read(self, index: int, offset: int, count: int) -> bytes:
        r = (await self.request(p.RegionAccess(offset, index, count),
                                command=p.Command.REGION_READ)).msg
        return r.data

    async def region_write(self, index: int, offset: int, data: bytes, *,
                           posted: bool = False) -> None:
        msg = p.RegionAccess(offset, index, len(data), bytes(data))
        if posted:
            self.conn.send_request(msg, command=p.Command.REGION_WRITE, no_reply=True)
            self.transport.flush()
            return
        await self.request(msg, command=p.Command.REGION_WRITE)

    def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]]) -> None:
        """Posted batch of small writes: (region, offset, data<=8 bytes) each."""
        msg = p.RegionWriteMulti([p.RegionAccess(o, r, len(d), bytes(d)) for r, o, d in writes])
        self.conn.send_request(msg, no_reply=True)
        self.transport.flush()

    async def set_irqs(self, flags: int, index: int, start: int, count: int, *,
                       data: bytes = b"", fds: Sequence[int] = ()) -> None:
        await self.request(p.IrqSet(flags, index, start, count, data), fds)

    async def set_irq_eventfds(self, index: int, start: int, count: int) -> list[int]:
        """Assign fresh eventfds to vectors ``start..start+count`` (client keeps them)."""
        efds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]
        self.eventfds.extend(efds)
        await self.set_irqs(p.IrqSetFlags.DATA_EVENTFD | p.IrqSetFlags.ACTION_TRIGGER,
                            index, start, count, fds=efds)
        return efds

    async def wait_irq(self, efd: int, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait until the server signals ``efd``; returns the eventfd counter."""
        try:
            return os.eventfd_read(efd)
        except BlockingIOError:
            pass
        fut: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_reader(efd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self.loop.remove_reader(efd)
        return os.eventfd_read(efd)

    async def reset(self) -> None:
        await self.request(p.DeviceReset())

    async def close(self) -> None:
        self.transport.close()
        for m in self.memory:
            m.close()
        self.memory.clear()
        close_fds(self.eventfds)
        self.eventfds.clear()
