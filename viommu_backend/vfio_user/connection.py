"""Sans-IO vfio-user connection: bytes and fds in, events out, bytes and fds to send.

Used by both ends (the server and the project's client).  The transport feeds each read
with the descriptors that came with it (:meth:`Connection.feed`) and sends what
:meth:`Connection.outgoing` returns.  A read may hold several messages: a sender passes a
message's descriptors with its first byte, and a UNIX stream socket ends a read right
after the bytes that carried descriptors, so a read's descriptors belong to the last
message that starts in it.

Malformed requests are answered with an error reply here (never for NO_REPLY messages)
and reported as :class:`Violation` events; received descriptors that no handler takes are
closed.  Requests this side sends are tracked by msg_id until their reply arrives.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.protocol import VfioUserError

SERVER_RECEIVES = frozenset(c for c in p.Command
                            if c not in (p.Command.DMA_READ, p.Command.DMA_WRITE))
CLIENT_RECEIVES = frozenset((p.Command.DMA_READ, p.Command.DMA_WRITE))


@dataclass
class Request:
    """A validated request from the peer.  The handler owns ``fds`` (close or keep)."""

    header: p.Header
    msg: Any
    fds: list[int] = field(default_factory=list)


@dataclass
class Reply:
    """The peer's answer to a request this side sent (``error`` != 0: an error reply)."""

    header: p.Header
    command: int
    request: Any
    msg: Any = None
    error: int = 0
    fds: list[int] = field(default_factory=list)


@dataclass
class Violation:
    """Bad input from the peer; an error reply has been queued when one is possible."""

    header: p.Header | None
    errno: int
    message: str


ConnectionEvent = Request | Reply | Violation


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _fds_allowed(command: int, msg: Any) -> int:
    if command == p.Command.DMA_MAP:
        return 1
    if command == p.Command.DEVICE_SET_IRQS and msg.flags & p.IrqSetFlags.DATA_EVENTFD:
        return msg.count
    return 0


class Connection:
    def __init__(self, *, server: bool = True, limits: p.Limits | None = None,
                 dma_layout: p.DmaRwLayout = p.QEMU_DMA_RW) -> None:
        self.server = server
        self.dma_layout = dma_layout  # the DMA_READ/DMA_WRITE body this peer speaks
        self.receives = SERVER_RECEIVES if server else CLIENT_RECEIVES
        self.limits = limits or p.Limits()
        self._buf = bytearray()
        self._hdr: p.Header | None = None
        self._discard = 0  # payload bytes still to skip for a rejected message
        self._discard_err: tuple[p.Header, int, str] | None = None
        self._fds: list[int] = []  # descriptors that came with the message in progress
        self._out: list[tuple[bytes, list[int]]] = []
        self._next_id = 0
        self.outstanding: dict[int, tuple[int, Any]] = {}
        self.closed = False

    # --- limits ------------------------------------------------------------------------
    @property
    def max_msg_size(self) -> int:
        return p.HEADER_SIZE + self.limits.max_data_xfer_size + p.MSG_OVERHEAD

    # --- receiving ---------------------------------------------------------------------
    def wanted(self) -> int:
        """How many bytes complete the header or message in progress."""
        if self._discard:
            return min(self._discard, 1 << 16)
        if self._hdr is None:
            return p.HEADER_SIZE - len(self._buf)
        return self._hdr.size - p.HEADER_SIZE - len(self._buf)

    @property
    def mid_message(self) -> bool:
        return bool(self._buf or self._hdr is not None or self._discard or self._fds)

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> list[ConnectionEvent]:
        """Consume one read: its bytes and the descriptors received with them, which go
        to the message its last byte belongs to (the last message that starts in it, or
        the one in progress if none starts)."""
        events: list[ConnectionEvent] = []
        if self.closed:
            close_fds(fds)
            return events
        read_fds = list(fds)
        view = memoryview(data)
        while view:
            if self._discard:
                take = min(self._discard, len(view))
                self._discard -= take
                view = view[take:]
                read_fds = self._claim(view, read_fds)
                if self._discard:
                    break
                assert self._discard_err is not None
                hdr, err, why = self._discard_err
                self._discard_err = None
                events.append(self._reject(hdr, err, why))
                continue
            if self._hdr is None:
                need = p.HEADER_SIZE - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                read_fds = self._claim(view, read_fds)
                if len(self._buf) < p.HEADER_SIZE:
                    break
                hdr = p.Header.unpack(self._buf)
                self._buf.clear()
                ev = self._check_header(hdr)
                if ev is not None:
                    if ev is not _DISCARDING:
                        events.append(ev)
                    continue
                self._hdr = hdr
            hdr = self._hdr
            need = hdr.size - p.HEADER_SIZE - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            read_fds = self._claim(view, read_fds)
            if len(self._buf) < hdr.size - p.HEADER_SIZE:
                break
            payload = bytes(self._buf)
            self._buf.clear()
            self._hdr = None
            events.append(self._dispatch(hdr, payload))
        self._fds.extend(read_fds)  # left only by an empty read: the next message's
        return events

    def _claim(self, rest: memoryview, read_fds: list[int]) -> list[int]:
        """The message in progress takes the read's descriptors once the read ends in it
        (nothing left after its bytes); returns what is still unclaimed."""
        if rest or not read_fds:
            return read_fds
        self._fds.extend(read_fds)
        return []

    def _take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def _reject(self, hdr: p.Header, err: int, why: str) -> Violation:
        close_fds(self._take_fds())
        if not hdr.is_reply and not hdr.no_reply:
            self._out.append((p.error_frame(hdr.msg_id, hdr.command, err), []))
        return Violation(hdr, err, why)

    def _check_header(self, hdr: p.Header) -> Any:
        """Header-level validation; returns an event (or _DISCARDING) when the message is
        rejected, None when its payload should be read."""
        if hdr.size < p.HEADER_SIZE:
            # Take the header as the whole message so the stream stays in sync.
            return self._reject(hdr, errno.EINVAL, f"message size {hdr.size} < header size")
        why: str | None = None
        err = errno.EINVAL
        if hdr.msg_type not in (p.MsgFlags.REQUEST, p.MsgFlags.REPLY):
            why = f"unknown message type {hdr.msg_type}"
        elif hdr.size > self.max_msg_size:
            why, err = f"message size {hdr.size} > {self.max_msg_size}", errno.E2BIG
        elif hdr.is_reply and hdr.msg_id not in self.outstanding:
            why = f"reply to msg_id {hdr.msg_id} that was never sent"
        if why is None:
            return None
        self._discard = hdr.size - p.HEADER_SIZE
        if self._discard:
            self._discard_err = (hdr, err, why)
            return _DISCARDING
        return self._reject(hdr, err, why)

    def _dispatch(self, hdr: p.Header, payload: bytes) -> ConnectionEvent:
        fds = self._take_fds()
        if hdr.is_reply:
            command, request = self.outstanding.pop(hdr.msg_id)
            if hdr.command != command:
                close_fds(fds)
                return Violation(hdr, errno.EINVAL,
                                 f"reply command {hdr.command} != request command {command}")
            if hdr.is_error:
                close_fds(fds)
                return Reply(hdr, command, request, None, hdr.error or errno.EIO)
            try:
                msg = p.decode_reply(command, payload, request, dma_layout=self.dma_layout)
            except VfioUserError as e:
                close_fds(fds)
                return Reply(hdr, command, request, None, e.errno)
            return Reply(hdr, command, request, msg, 0, fds)
        if len(fds) > self.limits.max_msg_fds:
            close_fds(fds)
            return self._reject(hdr, errno.EINVAL,
                                f"{len(fds)} fds > max_msg_fds {self.limits.max_msg_fds}")
        try:
            if hdr.command not in self.receives:
                if hdr.command in p.Command.__members__.values():
                    raise VfioUserError(errno.EINVAL, f"command {hdr.command} not accepted here")
                raise VfioUserError(errno.ENOSYS, f"unknown command {hdr.command}")
            msg = p.decode_request(hdr.command, payload, dma_layout=self.dma_layout)
            allowed = _fds_allowed(hdr.command, msg)
            if len(fds) > allowed:
                raise VfioUserError(errno.EINVAL,
                                    f"{len(fds)} fds with command {hdr.command} (max {allowed})")
        except VfioUserError as e:
            self._fds = fds
            return self._reject(hdr, e.errno, str(e))
        return Request(hdr, msg, fds)

    def eof(self) -> list[int]:
        """The peer went away: close descriptors of a half-received message; return the
        msg_ids of requests that will never be answered."""
        self.closed = True
        close_fds(self._take_fds())
        self._buf.clear()
        self._hdr = None
        self._discard = 0
        ids = list(self.outstanding)
        self.outstanding.clear()
        return ids

    # --- sending -----------------------------------------------------------------------
    def encode(self, msg: Any) -> bytes:
        """A message body as this connection puts it on the wire."""
        if isinstance(msg, p.DmaAccess):
            return msg.encode(self.dma_layout)
        return msg.encode()

    def send_request(self, msg: Any, fds: Sequence[int] = (), *, command: int | None = None,
                     no_reply: bool = False, body: bytes | None = None) -> int:
        """Queue a request; returns its msg_id (tracked unless ``no_reply``)."""
        cmd = command if command is not None else msg.COMMAND
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        data = body if body is not None else self.encode(msg)
        flags = p.MsgFlags.REQUEST | (p.MsgFlags.NO_REPLY if no_reply else 0)
        self._out.append((p.frame(msg_id, cmd, data, flags), list(fds)))
        if not no_reply:
            self.outstanding[msg_id] = (cmd, msg)
        return msg_id

    def reply(self, req: Request, body: bytes = b"", fds: Sequence[int] = ()) -> None:
        if req.header.no_reply:
            return
        self._out.append((p.frame(req.header.msg_id, req.header.command, body,
                                  p.MsgFlags.REPLY), list(fds)))

    def reply_error(self, req: Request, err: int) -> None:
        if req.header.no_reply:
            return
        self._out.append((p.error_frame(req.header.msg_id, req.header.command, err), []))

    def outgoing(self) -> list[tuple[bytes, list[int]]]:
        """Frames to send, each with the descriptors to pass along (not owned by us)."""
        out, self._out = self._out, []
        return out


class _Discarding:
    pass


_DISCARDING = _Discarding()
