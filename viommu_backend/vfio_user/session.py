"""Sans-IO vfio-user session: one client's requests to one device.

A :class:`Session` holds what a connection's requests build up (VERSION negotiation, the
guest memory DMA_MAP shares, the SET_IRQS eventfd table and mask bits, region info) and
calls the :class:`~viommu_backend.vfio_user.device.VfioUserDevice` hooks.  It does no I/O,
h11-style: the caller feeds it what the peer sent (:meth:`Session.receive`, or parsed
events to :meth:`Session.handle`), sends what :meth:`Session.outgoing` returns, and
performs the actions the session returns: :class:`SignalEventfd` (write the eventfd) and
:class:`~viommu_backend.vfio_user.connection.Reply` (the answer to a DMA_READ/DMA_WRITE
queued with :meth:`Session.send_dma`).  Framing and validation are the
:class:`~viommu_backend.vfio_user.connection.Connection`'s; the asyncio side (sockets,
awaiting DMA replies, the device's :class:`DeviceContext`) is ``server.py``'s.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory, GuestMemoryError, OverlapError
from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.connection import (
    Connection, ConnectionEvent, Reply, Request, Violation, close_fds)
from viommu_backend.vfio_user.device import (
    DeviceContext,
    DeviceInfo,
    RegionFlags,
    RegionInfo,
    SetIrqs,
    VfioUserDevice,
)
from viommu_backend.vfio_user.protocol import IrqSetFlags, VfioUserError

log = logging.getLogger(__name__)

Body = tuple[bytes, list[int]]  # a reply body and the descriptors sent with it


@dataclass(frozen=True)
class SignalEventfd:
    """Action: write 1 to ``fd`` (an interrupt the client asked for with SET_IRQS)."""

    fd: int


Action = SignalEventfd | Reply


class Session:
    """One client connection to one device (server side)."""

    def __init__(self, device: VfioUserDevice, *, limits: p.Limits | None = None,
                 dma_layout: p.DmaRwLayout = p.QEMU_DMA_RW,
                 memory: GuestMemory | None = None) -> None:
        self.device = device
        self.conn = Connection(server=True, limits=limits, dma_layout=dma_layout)
        self.limits = self.conn.limits  # ours, offered at VERSION (conn.limits: in force)
        self.memory = memory if memory is not None else GuestMemory()
        self.irq_fds: dict[int, list[int | None]] = {}
        self.irq_masked: dict[int, list[bool]] = {}
        self._regions: dict[int, RegionInfo] = {}
        self._actions: list[Action] = []  # those of the request being served
        self.negotiated = False  # VERSION comes first (vfio-user.rst, "VFIO_USER_VERSION")
        self.closed = False

    # --- input and output --------------------------------------------------------------
    def receive(self, data: bytes | memoryview, fds: Iterable[int] = ()) -> list[Action]:
        """Bytes (and descriptors) from the peer: handle every event they complete."""
        actions: list[Action] = []
        for ev in self.conn.feed(data, list(fds)):
            actions += self.handle(ev)
        return actions

    def handle(self, ev: ConnectionEvent) -> list[Action]:
        """One parsed event from the connection."""
        if isinstance(ev, Request):
            return self.handle_request(ev)
        if isinstance(ev, Reply):
            close_fds(ev.fds)  # DMA replies carry none we would keep
            return [ev]
        assert isinstance(ev, Violation)
        log.debug("%s: protocol violation: %s", self.device.name, ev.message)
        return []

    def outgoing(self) -> list[tuple[bytes, list[int]]]:
        return self.conn.outgoing()

    # --- what the device context needs ---------------------------------------------------
    def connect(self, ctx: DeviceContext) -> None:
        """Tell the device a client is here; ``ctx`` is what it talks to until close."""
        self._hook("connected", self.device.connected, ctx)

    def irq_eventfd(self, index: int, subindex: int = 0) -> int | None:
        """The eventfd that signals vector ``subindex`` of ``index``; None when none is
        assigned or the vector is masked."""
        fds = self.irq_fds.get(index)
        if not fds or not 0 <= subindex < len(fds) or self.irq_masked[index][subindex]:
            return None
        return fds[subindex]

    def send_dma(self, access: p.DmaAccess, command: p.Command) -> int:
        """Queue a server-initiated DMA_READ / DMA_WRITE; its Reply comes back from
        :meth:`handle` with this msg_id."""
        if self.closed:
            raise VfioUserError(errno.ENOTCONN, "client disconnected")
        return self.conn.send_request(access, command=command)

    def close(self) -> None:
        """The peer is gone: unmap guest memory, close eventfds, tell the device (DMA
        requests still outstanding will never be answered)."""
        if self.closed:
            return
        self.closed = True
        self.conn.eof()
        for r in self.memory.regions:
            self._hook("dma_unmapped", self.device.dma_unmapped, r.iova, r.size)
        self.memory.clear()
        for fds in self.irq_fds.values():
            close_fds(f for f in fds if f is not None)
        self.irq_fds.clear()
        self._hook("disconnected", self.device.disconnected)

    def _hook(self, name: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s.%s failed", self.device.name, name)

    # --- requests ------------------------------------------------------------------------
    def handle_request(self, req: Request) -> list[Action]:
        """Serve one request: queue its reply (or error reply); return its actions."""
        self._actions = []
        handler = _HANDLERS[req.header.command]
        try:
            self._check_negotiation(req.header.command)
            body, fds = handler(self, req)
        except VfioUserError as e:
            close_fds(req.fds)
            if req.header.no_reply:
                log.warning("%s: posted %s failed: %s", self.device.name,
                            p.command_name(req.header.command), e)
            self.conn.reply_error(req, e.errno)
        except Exception:
            close_fds(req.fds)
            log.exception("%s: %s handler failed", self.device.name,
                          p.command_name(req.header.command))
            self.conn.reply_error(req, errno.EIO)
        else:
            self.conn.reply(req, body, fds)
        return self._actions

    def _check_negotiation(self, command: int) -> None:
        """The client's first message is VERSION, and there is only one: anything else
        before it, or a second VERSION, is refused (EINVAL) and changes nothing."""
        if command == p.Command.VERSION and self.negotiated:
            raise VfioUserError(errno.EINVAL, "VERSION: already negotiated")
        if command != p.Command.VERSION and not self.negotiated:
            raise VfioUserError(errno.EINVAL,
                                f"{p.command_name(command)} before VERSION negotiation")

    def _version(self, req: Request) -> Body:
        reply, lim = p.negotiate(req.msg, self.limits)
        self.conn.limits = lim
        self.negotiated = True
        return reply.encode(), []

    def _dma_map(self, req: Request) -> Body:
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

    def _dma_unmap(self, req: Request) -> Body:
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
            self._hook("dma_unmapped", self.device.dma_unmapped, r.iova, r.size)
        if m.flags & p.DmaUnmapFlags.ALL:
            self.memory.clear()
        else:
            self.memory.remove(m.iova, m.size)
        size = sum(r.size for r in victims)
        return p.DmaUnmap(m.flags, m.iova, size).encode(), []

    def _device_info(self) -> DeviceInfo:
        return self.device.device_info()

    def _get_info(self, req: Request) -> Body:
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

    def _region_info(self, req: Request) -> Body:
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

    def _region_io_fds(self, req: Request) -> Body:
        self.region(req.msg.index)
        return p.RegionIoFds(16, 0, req.msg.index, 0).encode(), []

    def _irq_info(self, req: Request) -> Body:
        m: p.IrqInfoMsg = req.msg
        if not 0 <= m.index < self._device_info().num_irqs:
            raise VfioUserError(errno.EINVAL, f"no irq index {m.index}")
        ii = self.device.irq_info(m.index)
        return p.IrqInfoMsg(16, int(ii.flags), m.index, ii.count).encode(), []

    def _irq_vectors(self, index: int) -> int:
        fds = self.irq_fds.get(index)
        if fds is not None:  # (a valid index, seen before)
            return len(fds)
        if not 0 <= index < self._device_info().num_irqs:
            raise VfioUserError(errno.EINVAL, f"no irq index {index}")
        if index not in self.irq_fds:
            n = self.device.irq_info(index).count
            self.irq_fds[index] = [None] * n
            self.irq_masked[index] = [False] * n
        return len(self.irq_fds[index])

    def _set_irqs(self, req: Request) -> Body:
        m: p.IrqSet = req.msg
        nvec = self._irq_vectors(m.index)
        flags = int(m.flags)  # plain int: an INTx unmask comes with every interrupt
        data_t = flags & p.IRQ_DATA_MASK
        if m.start + m.count > nvec:
            raise VfioUserError(errno.EINVAL, f"irq {m.index}: vectors {m.start}+{m.count} > {nvec}")
        rng = range(m.start, m.start + m.count)
        bools = tuple(bool(b) for b in m.data)
        fds = list(req.fds)
        if flags & p.IRQ_ACTION_TRIGGER:
            self._irq_trigger(m, req, nvec, bools)
        elif data_t == p.IRQ_DATA_EVENTFD:
            raise VfioUserError(errno.ENOTSUP, "mask/unmask by eventfd unsupported")
        else:
            masked = self.irq_masked[m.index]
            for i, v in enumerate(rng):
                if data_t == p.IRQ_DATA_NONE or bools[i]:
                    masked[v] = bool(flags & p.IRQ_ACTION_MASK)
        if data_t == p.IRQ_DATA_EVENTFD and not fds:  # unassign (count 0: all vectors)
            fds = [-1] * (m.count or nvec)
        # a device failing here is a backend bug: handle_request logs it and replies EIO
        self.device.set_irqs(SetIrqs(IrqSetFlags(m.flags), m.index, m.start, m.count,
                                     tuple(fds), bools))
        return b"", []

    def _irq_trigger(self, m: p.IrqSet, req: Request, nvec: int, bools: tuple[bool, ...]) -> None:
        """ACTION_TRIGGER: assign eventfds (DATA_EVENTFD), drop them all (DATA_NONE with
        count 0), or signal the vectors now (DATA_NONE / DATA_BOOL)."""
        data_t = int(m.flags) & p.IRQ_DATA_MASK
        table = self.irq_fds[m.index]
        rng = range(m.start, m.start + m.count)
        if data_t == p.IRQ_DATA_EVENTFD:
            fds = req.fds
            if fds and len(fds) != m.count:
                raise VfioUserError(errno.EINVAL, f"{len(fds)} eventfds for {m.count} vectors")
            for i, v in enumerate(rng if m.count else range(nvec)):
                old = table[v]
                table[v] = fds[i] if fds else None
                if old is not None:
                    close_fds([old])
            req.fds = []  # now owned by the table
        elif data_t == p.IRQ_DATA_NONE and m.count == 0:
            close_fds(f for f in table if f is not None)
            table[:] = [None] * nvec
        else:
            for i, v in enumerate(rng):
                fd = table[v]
                if (data_t == p.IRQ_DATA_NONE or bools[i]) and fd is not None:
                    self._actions.append(SignalEventfd(fd))

    def _check_access(self, region: int, offset: int, count: int) -> None:
        ri = self.region(region)
        if count > self.conn.limits.max_data_xfer_size:
            raise VfioUserError(errno.E2BIG, f"access of {count} bytes > max_data_xfer_size")
        if offset + count > ri.size:
            raise VfioUserError(errno.EINVAL,
                                f"region {region}: {offset:#x}+{count} beyond size {ri.size:#x}")

    def _region_read(self, req: Request) -> Body:
        m: p.RegionAccess = req.msg
        self._check_access(m.region, m.offset, m.count)
        data = bytes(self.device.region_read(m.region, m.offset, m.count))
        if len(data) != m.count:
            raise VfioUserError(errno.EIO, f"device returned {len(data)} of {m.count} bytes")
        return p.RegionAccess(m.offset, m.region, m.count, data).encode(), []

    def _region_write(self, req: Request) -> Body:
        m: p.RegionAccess = req.msg
        self._check_access(m.region, m.offset, m.count)
        self.device.region_write(m.region, m.offset, m.data)
        return p.RegionAccess(m.offset, m.region, m.count).encode(), []

    def _write_multi(self, req: Request) -> Body:
        for w in req.msg.writes:
            self._check_access(w.region, w.offset, w.count)
            self.device.region_write(w.region, w.offset, w.data)
        return p.WRITE_MULTI_REPLY.pack(len(req.msg.writes)), []  # wr_cnt

    def _reset(self, req: Request) -> Body:
        self.device.reset()
        return b"", []


_HANDLERS: dict[int, Callable[[Session, Request], Body]] = {
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
