"""asyncio vfio-user server: one UNIX socket per device, one client per socket at a time.

The protocol state lives in :class:`~viommu_backend.vfio_user.connection.Connection`;
this module moves bytes and SCM_RIGHTS descriptors, keeps the per-connection state
(guest memory from DMA_MAP, the SET_IRQS eventfd table, server-initiated DMA requests in
flight) and calls the :class:`VfioUserDevice` hooks.  Requests are handled synchronously
in the socket's reader callback; nothing here ever waits for the client (DMA_READ /
DMA_WRITE replies are awaited by whoever asked for them, on their own task).

Usage::

    server = VfioUserServer()
    server.add_device("/run/x/viommu.sock", device)
    await server.start()
    ...
    await server.close()   # e.g. from a SIGTERM handler
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time
from typing import Any, Callable

from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory, GuestMemoryError, OverlapError
from viommu_backend.trace import Tracer
from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.connection import Connection, Reply, Request, Violation, close_fds
from viommu_backend.vfio_user.device import (
    IrqSetFlags,
    PciIrq,
    RegionFlags,
    RegionInfo,
    SetIrqs,
    VfioUserDevice,
    VfioUserError,
)
from viommu_backend.vfio_user.transport import SocketTransport

log = logging.getLogger(__name__)

def _command_name(command: int) -> str:
    try:
        return p.Command(command).name
    except ValueError:
        return str(command)


def _irq_name(index: int) -> str:
    try:
        return PciIrq(index).name
    except ValueError:
        return str(index)


class Session:
    """One client connection to one device: the :class:`DeviceContext` the device sees."""

    def __init__(self, server: "VfioUserServer", device: VfioUserDevice, sock: socket.socket,
                 path: str = "") -> None:
        self.server = server
        self.path = path
        self.device = device
        self.loop = asyncio.get_running_loop()
        self.memory = GuestMemory()
        self.memory.dma_read_fn = self.dma_read
        self.memory.dma_write_fn = self.dma_write
        self.conn = Connection(server=True, limits=server.limits, dma_layout=server.dma_layout)
        self.irq_fds: dict[int, list[int | None]] = {}
        self.irq_masked: dict[int, list[bool]] = {}
        self._regions: dict[int, RegionInfo] = {}
        self._dma_waiters: dict[int, asyncio.Future[Any]] = {}
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.alive = True
        self.negotiated = False  # VERSION comes first (vfio-user.rst, "VFIO_USER_VERSION")
        self.transport = SocketTransport(sock, self.conn, self._events, self._closed)
        try:
            device.connected(self)
        except Exception:
            log.exception("%s.connected failed", device.name)

    # --- DeviceContext -----------------------------------------------------------------
    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        fds = self.irq_fds.get(index)
        if not fds or subindex >= len(fds) or fds[subindex] is None:
            return False
        if self.irq_masked[index][subindex]:
            return False
        os.eventfd_write(fds[subindex], 1)  # type: ignore[arg-type]
        tr = self.server.tracer
        if tr.on_vfio:
            tr.record("vfio", dev=self.device.name, irq=_irq_name(index), vector=subindex)
        return True

    async def dma_read(self, addr: int, count: int) -> bytes:
        out = []
        step = self.conn.limits.max_data_xfer_size
        for off in range(0, count, step):
            n = min(step, count - off)
            reply = await self._dma_request(p.Command.DMA_READ, p.DmaAccess(addr + off, n))
            out.append(reply.msg.data)
        return b"".join(out)

    async def dma_write(self, addr: int, data: bytes) -> None:
        step = self.conn.limits.max_data_xfer_size
        for off in range(0, len(data), step):
            chunk = bytes(data[off:off + step])
            await self._dma_request(p.Command.DMA_WRITE, p.DmaAccess(addr + off, len(chunk), chunk))

    async def _dma_request(self, command: p.Command, msg: p.DmaAccess) -> Reply:
        if not self.alive:
            raise VfioUserError(errno.ENOTCONN, "client disconnected")
        msg_id = self.conn.send_request(msg, command=command)
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self._dma_waiters[msg_id] = fut
        self.transport.flush()
        reply = await fut
        if reply.error:
            raise VfioUserError(reply.error, f"{command.name} {msg.address:#x}+{msg.count:#x}")
        return reply

    def call_soon(self, fn: Callable[[], object]) -> None:
        def run() -> None:
            if not self.alive:
                return
            try:
                fn()
            except Exception:
                log.exception("deferred device work failed")
            self.transport.flush()
        self.loop.call_soon(run)

    # --- events ------------------------------------------------------------------------
    def _events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Request):
                self._request(ev)
            elif isinstance(ev, Reply):
                fut = self._dma_waiters.pop(ev.header.msg_id, None)
                close_fds(ev.fds)
                if fut is not None and not fut.done():
                    fut.set_result(ev)
            elif isinstance(ev, Violation):
                log.debug("%s: protocol violation: %s", self.device.name, ev.message)

    def _request(self, req: Request) -> None:
        tr = self.server.tracer
        if not tr.on_vfio:
            self._serve(req)
            return
        t0 = time.perf_counter()
        self._serve(req)
        us = round((time.perf_counter() - t0) * 1e6, 1)
        m = req.msg
        rec: dict[str, Any] = {"dev": self.device.name, "cmd": _command_name(req.header.command)}
        if isinstance(m, p.RegionAccess):
            rec.update(region=m.region, offset=m.offset, count=m.count)
        tr.record("vfio", **rec, posted=req.header.no_reply, us=us)

    def _serve(self, req: Request) -> None:
        handler = _HANDLERS[req.header.command]
        try:
            self._check_negotiation(req.header.command)
            body, fds = handler(self, req)
        except VfioUserError as e:
            close_fds(req.fds)
            if req.header.no_reply:
                log.warning("%s: posted %s failed: %s", self.device.name,
                            _command_name(req.header.command), e)
            self.conn.reply_error(req, e.errno)
            return
        except Exception:
            close_fds(req.fds)
            log.exception("%s: %s handler failed", self.device.name,
                          _command_name(req.header.command))
            self.conn.reply_error(req, errno.EIO)
            return
        self.conn.reply(req, body, fds)

    def _check_negotiation(self, command: int) -> None:
        """The client's first message is VERSION, and there is only one: anything else
        before it, or a second VERSION, is refused (EINVAL) and changes nothing."""
        if command == p.Command.VERSION and self.negotiated:
            raise VfioUserError(errno.EINVAL, "VERSION: already negotiated")
        if command != p.Command.VERSION and not self.negotiated:
            raise VfioUserError(errno.EINVAL, f"{_command_name(command)} before VERSION negotiation")

    # --- handlers (return reply body and descriptors to send) --------------------------
    def _version(self, req: Request) -> tuple[bytes, list[int]]:
        reply, lim = p.negotiate(req.msg, self.server.limits)
        self.conn.limits = lim
        self.negotiated = True
        return reply.encode(), []

    def _dma_map(self, req: Request) -> tuple[bytes, list[int]]:
        m: p.DmaMap = req.msg
        try:
            pg = self.conn.limits.pgsizes & -self.conn.limits.pgsizes or 4096
            if (m.iova | m.size) % pg or (req.fds and m.offset % pg):
                raise VfioUserError(errno.EINVAL, "DMA_MAP: range not page aligned")
            if len(self.memory.regions) >= self.conn.limits.max_dma_maps:
                raise VfioUserError(errno.ENOSPC, "DMA_MAP: too many mappings")
            prot = (PROT_READ if m.flags & p.DmaMapFlags.READ else 0) | \
                (PROT_WRITE if m.flags & p.DmaMapFlags.WRITE else 0)
            try:
                self.memory.add(m.iova, m.size, prot, req.fds[0] if req.fds else None, m.offset)
            except OverlapError as e:
                raise VfioUserError(errno.EEXIST, str(e)) from None
            except GuestMemoryError as e:
                raise VfioUserError(errno.EINVAL, str(e)) from None
        finally:
            close_fds(req.fds)
            req.fds = []
        return b"", []

    def _dma_unmap(self, req: Request) -> tuple[bytes, list[int]]:
        m: p.DmaUnmap = req.msg
        if m.flags & p.DmaUnmapFlags.ALL:
            victims = self.memory.regions
        else:
            end = m.iova + m.size
            victims = [r for r in self.memory.regions if r.iova < end and m.iova < r.end]
            for r in victims:
                if r.iova < m.iova or r.end > end:
                    raise VfioUserError(errno.EINVAL, "DMA_UNMAP would split a mapping")
        for r in victims:
            self._notify_unmap(r.iova, r.size)
        if m.flags & p.DmaUnmapFlags.ALL:
            self.memory.clear()
        else:
            self.memory.remove(m.iova, m.size)
        size = sum(r.size for r in victims)
        return p.DmaUnmap(m.flags, m.iova, size).encode(), []

    def _notify_unmap(self, iova: int, size: int) -> None:
        try:
            self.device.dma_unmapped(iova, size)
        except Exception:
            log.exception("%s.dma_unmapped failed", self.device.name)

    def _device_info(self) -> Any:
        return self.device.device_info()

    def _get_info(self, req: Request) -> tuple[bytes, list[int]]:
        info = self._device_info()
        return p.DeviceGetInfo(16, int(info.flags), info.num_regions, info.num_irqs).encode(), []

    def region(self, index: int) -> RegionInfo:
        ri = self._regions.get(index)
        if ri is None:
            if not 0 <= index < self._device_info().num_regions:
                raise VfioUserError(errno.EINVAL, f"no region {index}")
            ri = self.device.region_info(index)
            self._regions[index] = ri
        return ri

    def _region_info(self, req: Request) -> tuple[bytes, list[int]]:
        m: p.RegionInfoMsg = req.msg
        ri = self.region(m.index)
        flags = int(ri.flags)
        caps = b""
        if ri.sparse_mmap:
            caps = p.encode_sparse_mmap_cap([(a.offset, a.size) for a in ri.sparse_mmap],
                                            p.RegionInfoMsg.FIXED)
            flags |= RegionFlags.CAPS
        needed = p.RegionInfoMsg.FIXED + len(caps)
        fits = m.argsz >= needed
        body = p.RegionInfoMsg(needed, flags, m.index, p.RegionInfoMsg.FIXED if caps and fits else 0,
                               ri.size, ri.offset, caps if fits else b"").encode()
        fds = [ri.fd] if ri.fd is not None and ri.flags & RegionFlags.MMAP else []
        return body, fds

    def _region_io_fds(self, req: Request) -> tuple[bytes, list[int]]:
        self.region(req.msg.index)
        return p.RegionIoFds(16, 0, req.msg.index, 0).encode(), []

    def _irq_info(self, req: Request) -> tuple[bytes, list[int]]:
        m: p.IrqInfoMsg = req.msg
        if not 0 <= m.index < self._device_info().num_irqs:
            raise VfioUserError(errno.EINVAL, f"no irq index {m.index}")
        ii = self.device.irq_info(m.index)
        return p.IrqInfoMsg(16, int(ii.flags), m.index, ii.count).encode(), []

    def _irq_vectors(self, index: int) -> int:
        if not 0 <= index < self._device_info().num_irqs:
            raise VfioUserError(errno.EINVAL, f"no irq index {index}")
        if index not in self.irq_fds:
            n = self.device.irq_info(index).count
            self.irq_fds[index] = [None] * n
            self.irq_masked[index] = [False] * n
        return len(self.irq_fds[index])

    def _set_irqs(self, req: Request) -> tuple[bytes, list[int]]:
        m: p.IrqSet = req.msg
        nvec = self._irq_vectors(m.index)
        data_t = m.flags & (p.IrqSetFlags.DATA_NONE | p.IrqSetFlags.DATA_BOOL | p.IrqSetFlags.DATA_EVENTFD)
        action = m.flags & (p.IrqSetFlags.ACTION_MASK | p.IrqSetFlags.ACTION_UNMASK | p.IrqSetFlags.ACTION_TRIGGER)
        if m.start + m.count > nvec:
            raise VfioUserError(errno.EINVAL, f"irq {m.index}: vectors {m.start}+{m.count} > {nvec}")
        table, masked = self.irq_fds[m.index], self.irq_masked[m.index]
        rng = range(m.start, m.start + m.count)
        bools = tuple(bool(b) for b in m.data)
        fds = list(req.fds)
        if action == p.IrqSetFlags.ACTION_TRIGGER:
            if data_t == p.IrqSetFlags.DATA_EVENTFD:
                if fds and len(fds) != m.count:
                    raise VfioUserError(errno.EINVAL, f"{len(fds)} eventfds for {m.count} vectors")
                if m.count == 0:
                    rng = range(nvec)
                for i, v in enumerate(rng):
                    old = table[v]
                    table[v] = fds[i] if fds else None
                    if old is not None:
                        close_fds([old])
                req.fds = []  # now owned by the table
            elif data_t == p.IrqSetFlags.DATA_NONE and m.count == 0:
                for v in range(nvec):
                    if table[v] is not None:
                        close_fds([table[v]])  # type: ignore[list-item]
                        table[v] = None
            else:
                for i, v in enumerate(rng):
                    if (data_t == p.IrqSetFlags.DATA_NONE or bools[i]) and table[v] is not None:
                        os.eventfd_write(table[v], 1)  # type: ignore[arg-type]
        else:
            if data_t == p.IrqSetFlags.DATA_EVENTFD:
                raise VfioUserError(errno.ENOTSUP, "mask/unmask by eventfd unsupported")
            for i, v in enumerate(rng):
                if data_t == p.IrqSetFlags.DATA_NONE or bools[i]:
                    masked[v] = action == p.IrqSetFlags.ACTION_MASK
        if data_t == p.IrqSetFlags.DATA_EVENTFD and not fds:
            fds = [-1] * len(rng)
        # a device failing here is a backend bug: _serve logs it and replies EIO
        self.device.set_irqs(SetIrqs(IrqSetFlags(m.flags), m.index, m.start, m.count,
                                     tuple(fds), bools))
        return b"", []

    def _check_access(self, region: int, offset: int, count: int) -> None:
        ri = self.region(region)
        if count > self.conn.limits.max_data_xfer_size:
            raise VfioUserError(errno.E2BIG, f"access of {count} bytes > max_data_xfer_size")
        if offset + count > ri.size:
            raise VfioUserError(errno.EINVAL,
                                f"region {region}: {offset:#x}+{count} beyond size {ri.size:#x}")

    def _region_read(self, req: Request) -> tuple[bytes, list[int]]:
        m: p.RegionAccess = req.msg
        self._check_access(m.region, m.offset, m.count)
        data = bytes(self.device.region_read(m.region, m.offset, m.count))
        if len(data) != m.count:
            raise VfioUserError(errno.EIO, f"device returned {len(data)} of {m.count} bytes")
        return p.RegionAccess(m.offset, m.region, m.count, data).encode(), []

    def _region_write(self, req: Request) -> tuple[bytes, list[int]]:
        m: p.RegionAccess = req.msg
        self._check_access(m.region, m.offset, m.count)
        self.device.region_write(m.region, m.offset, m.data)
        return p.RegionAccess(m.offset, m.region, m.count).encode(), []

    def _write_multi(self, req: Request) -> tuple[bytes, list[int]]:
        for w in req.msg.writes:
            self._check_access(w.region, w.offset, w.count)
            self.device.region_write(w.region, w.offset, w.data)
        return p.WRITE_MULTI_REPLY.pack(len(req.msg.writes)), []  # wr_cnt

    def _reset(self, req: Request) -> tuple[bytes, list[int]]:
        self.device.reset()
        return b"", []

    # --- teardown ----------------------------------------------------------------------
    def _closed(self) -> None:
        """The socket is gone (EOF, error, or server close): release everything."""
        self.alive = False
        self.conn.eof()
        for fut in self._dma_waiters.values():
            if not fut.done():
                fut.set_exception(VfioUserError(errno.ENOTCONN, "client disconnected"))
                fut.add_done_callback(lambda f: f.exception())  # consumed even if unawaited
        self._dma_waiters.clear()
        for r in self.memory.regions:
            self._notify_unmap(r.iova, r.size)
        self.memory.clear()
        for fds in self.irq_fds.values():
            close_fds(f for f in fds if f is not None)
        self.irq_fds.clear()
        try:
            self.device.disconnected()
        except Exception:
            log.exception("%s.disconnected failed", self.device.name)
        if self.server.sessions.get(self.path) is self:
            del self.server.sessions[self.path]
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        self.transport.close()


_HANDLERS: dict[int, Callable[[Session, Request], tuple[bytes, list[int]]]] = {
    p.Command.VERSION: Session._version,
    p.Command.DMA_MAP: Session._dma_map,
    p.Command.DMA_UNMAP: Session._dma_unmap,
    p.Command.DEVICE_GET_INFO: Session._get_info,
    p.Command.DEVICE_GET_REGION_INFO: Session._region_info,
    p.Command.DEVICE_GET_REGION_IO_FDS: Session._region_io_fds,
    p.Command.DEVICE_GET_IRQ_INFO: Session._irq_info,
    p.Command.DEVICE_SET_IRQS: Session._set_irqs,
    p.Command.REGION_READ: Session._region_read,
    p.Command.REGION_WRITE: Session._region_write,
    p.Command.REGION_WRITE_MULTI: Session._write_multi,
    p.Command.DEVICE_RESET: Session._reset,
}


class VfioUserServer:
    """Serves any number of devices, each on its own UNIX socket (mode 0600)."""

    def __init__(self, limits: p.Limits | None = None, tracer: Tracer | None = None,
                 dma_layout: p.DmaRwLayout = p.QEMU_DMA_RW) -> None:
        self.limits = limits or p.Limits()
        self.dma_layout = dma_layout  # what each client's DMA_READ/WRITE replies look like
        self.tracer = tracer if tracer is not None else Tracer()  # category "vfio"
        self.devices: dict[str, VfioUserDevice] = {}
        self.sessions: dict[str, Session] = {}
        self._listeners: dict[str, socket.socket] = {}  # listening sockets made at paths
        self._sockets: dict[str, socket.socket] = {}  # sockets handed in (add_device_socket)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False

    def add_device(self, path: str | os.PathLike[str], device: VfioUserDevice) -> None:
        path = os.fspath(path)
        if path in self.devices:
            raise ValueError(f"{path} already serves a device")
        self.devices[path] = device
        if self._started:
            self._listen(path)

    def add_device_socket(self, name: str, sock: socket.socket, device: VfioUserDevice) -> None:
        """Serve ``device`` on a socket someone else made (the backend program convention
        ``--fd=N``): a listening socket accepts one client at a time, as a path does; a
        connected one is served as that one client's connection."""
        if name in self.devices:
            raise ValueError(f"{name} already serves a device")
        self.devices[name] = device
        self._sockets[name] = sock
        if self._started:
            self._serve_socket(name, sock)

    async def start(self) -> None:
        self._started = True
        for path in self.devices:
            if path in self._sockets:
                self._serve_socket(path, self._sockets[path])
            elif path not in self._listeners:
                self._listen(path)

    def _serve_socket(self, name: str, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self._tasks[name] = asyncio.get_running_loop().create_task(self._serve(name, sock))
        else:
            self.sessions[name] = Session(self, self.devices[name], sock, name)

    def _listen(self, path: str) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(4)
        sock.setblocking(False)
        self._listeners[path] = sock
        self._tasks[path] = asyncio.get_running_loop().create_task(self._serve(path, sock))

    async def _serve(self, path: str, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        device = self.devices[path]
        while True:
            csock, _ = await loop.sock_accept(lsock)
            self.sessions[path] = session = Session(self, device, csock, path)
            try:
                await asyncio.shield(session.done)
            except asyncio.CancelledError:
                session.close()
                raise

    async def wait_connected(self, path: str | os.PathLike[str]) -> Session:
        """For tests and tools: the session once a client is connected on ``path``."""
        path = os.fspath(path)
        while path not in self.sessions:
            await asyncio.sleep(0.001)
        return self.sessions[path]

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.close()
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for path, sock in self._listeners.items():
            sock.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._listeners.clear()
        for sock in self._sockets.values():
            sock.close()
        self._tasks.clear()
        self._started = False
