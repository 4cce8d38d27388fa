"""asyncio vfio-user server: one UNIX socket per device, one client per socket at a time.

The listener (:class:`VfioUserServer`) accepts clients; each connection is an
:class:`AsyncSession`: a sans-IO :class:`~viommu_backend.vfio_user.session.Session` (the
request state and device hooks) on a :class:`~viommu_backend.vfio_user.transport.SocketTransport`
(bytes and SCM_RIGHTS descriptors), and the :class:`DeviceContext` the device sees.
Requests are handled synchronously in the socket's reader callback; nothing here ever
waits for the client (DMA_READ / DMA_WRITE replies are awaited by whoever asked for them,
on their own task).

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

from viommu_backend.memory import GuestMemory
from viommu_backend.trace import Tracer
from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.connection import ConnectionEvent, Reply, Request
from viommu_backend.vfio_user.device import PciIrq, VfioUserDevice
from viommu_backend.vfio_user.protocol import VfioUserError
from viommu_backend.vfio_user.session import Action, Session, SignalEventfd
from viommu_backend.vfio_user.transport import SocketTransport

log = logging.getLogger(__name__)


def _irq_name(index: int) -> str:
    try:
        return PciIrq(index).name
    except ValueError:
        return str(index)


class AsyncSession:
    """One client connection to one device: a :class:`Session` on a socket, and the
    :class:`~viommu_backend.vfio_user.device.DeviceContext` the device sees."""

    def __init__(self, server: "VfioUserServer", device: VfioUserDevice, sock: socket.socket,
                 path: str = "", *, memory: GuestMemory | None = None) -> None:
        self.server = server
        self.path = path
        self.loop = asyncio.get_running_loop()
        self.session = Session(device, limits=server.limits, dma_layout=server.dma_layout,
                               memory=memory)
        self.memory.dma_read_fn = self.dma_read
        self.memory.dma_write_fn = self.dma_write
        self._dma_waiters: dict[int, asyncio.Future[Reply]] = {}
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.transport = SocketTransport(sock, self.session.conn, self.receive, self._closed)
        self.session.connect(self)

    @property
    def memory(self) -> GuestMemory:
        return self.session.memory

    # --- DeviceContext -----------------------------------------------------------------
    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        fd = self.session.irq_eventfd(index, subindex)
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        tr = self.server.tracer
        if tr.on_vfio:
            tr.record("vfio", dev=self.session.device.name, irq=_irq_name(index), vector=subindex)
        return True

    async def dma_read(self, addr: int, count: int) -> bytes:
        out = []
        step = self.session.conn.limits.max_data_xfer_size
        for off in range(0, count, step):
            n = min(step, count - off)
            reply = await self._dma_request(p.Command.DMA_READ, p.DmaAccess(addr + off, n))
            out.append(reply.msg.data)
        return b"".join(out)

    async def dma_write(self, addr: int, data: bytes) -> None:
        step = self.session.conn.limits.max_data_xfer_size
        for off in range(0, len(data), step):
            chunk = bytes(data[off:off + step])
            await self._dma_request(p.Command.DMA_WRITE, p.DmaAccess(addr + off, len(chunk), chunk))

    async def _dma_request(self, command: p.Command, msg: p.DmaAccess) -> Reply:
        msg_id = self.session.send_dma(msg, command)
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self._dma_waiters[msg_id] = fut
        self.transport.flush()
        reply = await fut
        if reply.error:
            raise VfioUserError(reply.error, f"{command.name} {msg.address:#x}+{msg.count:#x}")
        return reply

    def call_soon(self, fn: Callable[[], object]) -> None:
        def run() -> None:
            if self.session.closed:
                return
            try:
                fn()
            except Exception:
                log.exception("deferred device work failed")
            self.transport.flush()
        self.loop.call_soon(run)

    # --- events from the transport -------------------------------------------------------
    def receive(self, events: list[ConnectionEvent]) -> None:
        """Handle parsed events (the transport's callback) and perform their actions."""
        for ev in events:
            for action in self._handle(ev):
                self._perform(action)

    def _handle(self, ev: ConnectionEvent) -> list[Action]:
        tr = self.server.tracer
        if not tr.on_vfio or not isinstance(ev, Request):
            return self.session.handle(ev)
        t0 = time.perf_counter()
        actions = self.session.handle(ev)
        us = round((time.perf_counter() - t0) * 1e6, 1)
        m = ev.msg
        rec: dict[str, Any] = {"dev": self.session.device.name,
                               "cmd": p.command_name(ev.header.command)}
        if isinstance(m, p.RegionAccess):
            rec.update(region=m.region, offset=m.offset, count=m.count)
        tr.record("vfio", **rec, posted=ev.header.no_reply, us=us)
        return actions

    def _perform(self, action: Action) -> None:
        if isinstance(action, SignalEventfd):
            os.eventfd_write(action.fd, 1)
            return
        fut = self._dma_waiters.pop(action.header.msg_id, None)
        if fut is not None and not fut.done():
            fut.set_result(action)

    # --- teardown ----------------------------------------------------------------------
    def _closed(self) -> None:
        """The socket is gone (EOF, error, or server close): release everything."""
        for fut in self._dma_waiters.values():
            if not fut.done():
                fut.set_exception(VfioUserError(errno.ENOTCONN, "client disconnected"))
                fut.add_done_callback(lambda f: f.exception())  # consumed even if unawaited
        self._dma_waiters.clear()
        self.session.close()
        self.server.disconnected(self)
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        self.transport.close()


class VfioUserServer:
    """Serves any number of devices, each on its own UNIX socket (mode 0600)."""

    def __init__(self, limits: p.Limits | None = None, tracer: Tracer | None = None,
                 dma_layout: p.DmaRwLayout = p.QEMU_DMA_RW) -> None:
        self.limits = limits or p.Limits()
        self.dma_layout = dma_layout  # what each client's DMA_READ/WRITE replies look like
        self.tracer = tracer if tracer is not None else Tracer()  # category "vfio"
        self.devices: dict[str, VfioUserDevice] = {}
        self.sessions: dict[str, AsyncSession] = {}
        self._connect_waiters: dict[str, list[asyncio.Future[AsyncSession]]] = {}
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
            self._connected(name, AsyncSession(self, self.devices[name], sock, name))

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
            session = AsyncSession(self, device, csock, path)
            self._connected(path, session)
            try:
                await asyncio.shield(session.done)
            except asyncio.CancelledError:
                session.close()
                raise

    def _connected(self, path: str, session: AsyncSession) -> None:
        self.sessions[path] = session
        for fut in self._connect_waiters.pop(path, []):
            if not fut.done():
                fut.set_result(session)

    def disconnected(self, session: AsyncSession) -> None:
        """``session`` is over (its AsyncSession calls this once)."""
        if self.sessions.get(session.path) is session:
            del self.sessions[session.path]

    async def wait_connected(self, path: str | os.PathLike[str]) -> AsyncSession:
        """For tests and tools: the session once a client is connected on ``path``."""
        path = os.fspath(path)
        if path in self.sessions:
            return self.sessions[path]
        fut: asyncio.Future[AsyncSession] = asyncio.get_running_loop().create_future()
        waiters = self._connect_waiters.setdefault(path, [])
        waiters.append(fut)
        try:
            return await fut
        finally:
            if fut in waiters:
                waiters.remove(fut)

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
