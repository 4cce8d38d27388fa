"""asyncio transport for vfio-user: a non-blocking UNIX stream socket moving the bytes and
SCM_RIGHTS descriptors of a sans-IO :class:`~viommu_backend.vfio_user.connection.Connection`.

Shared by the server (one per client connection) and the project's client.  It reads
what is there (up to :data:`READ_SIZE` per ``recvmsg``: every message that arrived
together, in one system call; the connection gives each read's descriptors to the message
they came with), hands the connection's events to its owner, and sends what the
connection queued, frames without descriptors joined into one ``send``, parking the rest
on a writer callback when the socket is full.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
from collections import deque
from typing import Any, Callable

from viommu_backend.vfio_user.connection import Connection, close_fds

log = logging.getLogger(__name__)

SCM_MAX_FD = 253  # Linux: the most descriptors one message can carry
_ANC_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * 4)
_READS_PER_WAKEUP = 256
READ_SIZE = 1 << 16


def recv_fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, typ, data in ancdata:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


class SocketTransport:
    """Non-blocking stream socket + Connection glue shared by server and client."""

    def __init__(self, sock: socket.socket, conn: Connection,
                 on_events: Callable[[list[Any]], None], on_close: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.conn = conn
        self._on_events = on_events
        self._on_close = on_close
        self._rbuf = bytearray(READ_SIZE)  # reused by every read
        self._wbuf: deque[tuple[memoryview, list[int]]] = deque()
        self._writing = False
        self.closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            if self.closed:
                return
            size = max(self.conn.wanted(), READ_SIZE)
            if len(self._rbuf) < size:
                self._rbuf = bytearray(size)
            try:
                n, anc, msg_flags, _ = self.sock.recvmsg_into([memoryview(self._rbuf)[:size]],
                                                              _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("recvmsg: %s", e)
                self.close()
                return
            fds = recv_fds_from_ancdata(anc)
            if not n:
                close_fds(fds)
                self.close()
                return
            events = self.conn.feed(memoryview(self._rbuf)[:n], fds)  # it copies what it keeps
            if events:
                self._on_events(events)
            self.flush()
            if n < size and not fds:
                break  # drained (the loop calls again if more came meanwhile)

    def flush(self) -> None:
        if self.closed:
            return
        joined: list[bytes] = []  # frames without descriptors go out in one send
        for data, fds in self.conn.outgoing():
            if fds:
                self._queue_joined(joined)
                self._wbuf.append((memoryview(data), fds))
            else:
                joined.append(data)
        self._queue_joined(joined)
        while self._wbuf:
            data, fds = self._wbuf[0]
            try:
                if fds:
                    n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", fds))])
                else:
                    n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("send: %s", e)
                self.close()
                return
            if n < len(data):
                self._wbuf[0] = (data[n:], [])  # fds went with the first byte
                break
            self._wbuf.popleft()
        if self._wbuf and not self._writing:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self.flush)
        elif not self._wbuf and self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _queue_joined(self, joined: list[bytes]) -> None:
        if joined:
            self._wbuf.append((memoryview(joined[0] if len(joined) == 1 else b"".join(joined)), []))
            joined.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self._wbuf.clear()
        self.sock.close()
        self._on_close()
