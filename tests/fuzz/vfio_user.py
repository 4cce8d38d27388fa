"""vfio-user: fuzzed messages into the server of a real Backend (SMMU + DMA test engine).

Most inputs drive the sans-IO path in-process: the session's Connection is fed the bytes
(DMA_MAP messages may carry a real memfd) and its events go to the real request handlers
of a :class:`~viommu_backend.vfio_user.session.Session` (guest memory fenced).  Inputs whose
first byte is -1 mod ``SOCKET_EVERY`` go to the server over its real UNIX socket instead.
Before or after VERSION (bit 1 of the first byte), framed (size fixed up) or raw bytes.

After each input a valid VERSION (if not yet negotiated) and a REGION_READ of the config
space must be answered correctly (within 5 s on the socket: a hang is a finding); no
exception, no error logged, no access outside the DMA regions."""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import tempfile

from tests.support.topologies import SMMU_TESTDEV

from tests.fuzz.common import STATS, ErrorTrap, FencedMemory, Finding, Reader
from viommu_backend.app import Backend
from viommu_backend.config import loads_config
from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.device import PciRegion
from viommu_backend.vfio_user.server import AsyncSession

SOCKET_EVERY = 64
TIMEOUT = 5.0
C = p.Command
COMMANDS = [int(c) for c in C]
LOOP = asyncio.new_event_loop()
BACKEND = Backend(loads_config(SMMU_TESTDEV), tempfile.mkdtemp(prefix="viommu-fuzz-"))
LOOP.run_until_complete(BACKEND.start())
atexit.register(lambda: LOOP.run_until_complete(BACKEND.close()))
NAMES = sorted(BACKEND.functions)
TRAP = ErrorTrap()
PROBE_VERSION, PROBE_READ = 0xFFF0, 0xFFF1


# A REGION_READ of a whole BAR is thousands of register reads (the 128 KiB SMMU BAR: 34 ms
# here, several times that under atheris): such reads, which QEMU never sends, made the
# target 10x slower (23.5 to 2.4 ms per input on one corpus).  Structured reads of more
# than READ_CAP bytes inside a BAR read READ_CAP bytes: still 64 or more accesses.
READ_CAP = 0x200
BAR_MAX = 1 << 17


def _capped(cmd: int, body: bytes) -> bytes:
    if cmd != C.REGION_READ or len(body) < 16:
        return body
    count = int.from_bytes(body[12:16], "little")
    if READ_CAP < count <= BAR_MAX:
        STATS["reads_capped"] += 1
        return body[:12] + READ_CAP.to_bytes(4, "little") + body[16:]
    return body


def _messages(r: Reader) -> list[tuple[bytes, bool]]:
    """Framed messages from the input: (bytes, attach a memfd)."""
    out = []
    while r.left:
        pick = r.int(1)
        cmd = COMMANDS[pick % len(COMMANDS)] if pick < 0xF0 else r.int(2)
        flags = r.int(1)
        body = _capped(cmd, r.take(r.below(0x90)))
        out.append((p.frame(r.int(2) % PROBE_VERSION, cmd, body, flags & 0x3F),
                    cmd == C.DMA_MAP and bool(flags & 0x80)))
    return out


def _probe(negotiated: bool) -> bytes:
    read = p.frame(PROBE_READ, C.REGION_READ, p.RegionAccess(0, PciRegion.CONFIG, 4).encode())
    if negotiated:
        return read
    return p.frame(PROBE_VERSION, C.VERSION, p.Version(caps={"max_msg_fds": 8}).encode()) + read


def _check_probe(replies: list[p.Header], bodies: dict[int, bytes], expect: bytes) -> None:
    mine = [h for h in replies if h.msg_id == PROBE_READ and h.command == C.REGION_READ]
    if not mine:
        raise Finding("no reply to the REGION_READ probe")
    h = mine[-1]
    if h.is_error or not bodies[PROBE_READ].endswith(expect):
        raise Finding(f"REGION_READ probe answered error={h.error} {bodies[PROBE_READ]!r}")


_SERVER_REQUESTS = (C.DMA_READ, C.DMA_WRITE)  # what a server may send that is no reply


def _split_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """The whole frames at the start of ``buf`` (by their headers' sizes) and the rest."""
    frames = []
    while len(buf) >= p.HEADER_SIZE:
        size = max(p.Header.unpack(buf[:p.HEADER_SIZE]).size, p.HEADER_SIZE)
        if len(buf) < size:
            break
        frames.append(buf[:size])
        buf = buf[size:]
    return frames, buf


def _sent(sock: socket.socket) -> list[bytes]:
    """The frames waiting on the client's end of the socket pair (a cut-off last one
    too, which then fails its size check)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    frames, rest = _split_frames(data)
    return frames + ([rest] if len(rest) >= p.HEADER_SIZE else [])


def _memfd() -> int:
    fd = os.memfd_create("fuzz-dma")
    os.ftruncate(fd, 1 << 16)
    return fd


def one_input(data: bytes) -> None:
    STATS["inputs"] += 1
    r = Reader(data)
    mode = r.int(1)
    name = NAMES[r.int(1) % len(NAMES)]
    fn = BACKEND.functions[name]
    negotiate = bool(mode & 2)
    if mode % SOCKET_EVERY == SOCKET_EVERY - 1:
        STATS["socket_inputs"] += 1
        LOOP.run_until_complete(_over_socket(name, fn, r, negotiate))
    else:
        STATS["sansio_inputs"] += 1
        LOOP.run_until_complete(_in_process(fn, r, negotiate, raw=bool(mode & 4)))
    TRAP.check()


def _prefix(negotiate: bool) -> bytes:
    return p.frame(1, C.VERSION, p.Version().encode()) if negotiate else b""


async def _in_process(fn, r: Reader, negotiate: bool, *, raw: bool) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    s = AsyncSession(BACKEND.server, fn, a, "fuzz", memory=FencedMemory())
    session = s.session  # the sans-IO core, fed here instead of by the socket
    replies: list[p.Header] = []
    bodies: dict[int, bytes] = {}
    try:
        msgs = [(r.rest(), False)] if raw else _messages(r)
        for data, with_fd in [(_prefix(negotiate), False)] + msgs:
            fds = [_memfd()] if with_fd else []
            s.receive(session.conn.feed(data, fds))
        if session.conn.mid_message:  # raw bytes that end inside a message: nothing to probe
            STATS["mid_message"] += 1
            return
        s.receive(session.conn.feed(_probe(session.negotiated)))
        await asyncio.sleep(0)
        # frames still queued, and those the transport already sent (a device's DMA
        # request flushes it, with every reply queued before it)
        frames = []
        for frame, fds in session.outgoing():
            frames.append(frame)
            for fd in fds:
                os.close(fd)
        frames += _sent(b)
        for frame in frames:
            h = p.Header.unpack(frame)
            if h.size != len(frame) or not (h.is_reply or h.command in _SERVER_REQUESTS):
                raise Finding(f"bad frame from the server: {h}")
            if h.is_reply:
                replies.append(h)
                bodies[h.msg_id] = frame[p.HEADER_SIZE:]
        _check_probe(replies, bodies, fn.region_read(PciRegion.CONFIG, 0, 4))
    finally:
        s.close()
        b.close()


async def _over_socket(name: str, fn, r: Reader, negotiate: bool) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, os.fspath(BACKEND.socket_path(name)))
        data = _prefix(negotiate) + b"".join(m for m, _ in _messages(r))
        await loop.sock_sendall(sock, data)
        session = await asyncio.wait_for(BACKEND.server.wait_connected(BACKEND.socket_path(name)), TIMEOUT)
        # the server's negotiation state decides the probe (a fuzzed VERSION may have won)
        await asyncio.sleep(0)
        await loop.sock_sendall(sock, _probe(session.session.negotiated and negotiate))
        try:
            await asyncio.wait_for(_read_until_probe(loop, sock, fn), TIMEOUT)
        except asyncio.TimeoutError:
            raise Finding(f"no probe reply within {TIMEOUT} s over the socket (hang)") from None
    finally:
        sock.close()
        s = BACKEND.server.sessions.get(os.fspath(BACKEND.socket_path(name)))
        if s is not None:
            await asyncio.wait_for(asyncio.shield(s.done), TIMEOUT)


async def _read_until_probe(loop, sock: socket.socket, fn) -> None:
    buf = b""
    replies: list[p.Header] = []
    bodies: dict[int, bytes] = {}
    while True:
        frames, buf = _split_frames(buf)
        for frame in frames:
            h = p.Header.unpack(frame)
            replies.append(h)
            bodies[h.msg_id] = frame[p.HEADER_SIZE:]
            if h.msg_id == PROBE_READ and h.command == C.REGION_READ:
                _check_probe(replies, bodies, fn.region_read(PciRegion.CONFIG, 0, 4))
                return
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            raise Finding("server closed the connection")
        buf += chunk


def seeds() -> list[bytes]:
    def msg(cmd: int, body: bytes, flags: int = 0) -> bytes:
        return bytes([COMMANDS.index(cmd), flags, len(body)]) + body + b"\x05\x00"
    dma_map = p.DmaMap(p.DmaMapFlags.READ | p.DmaMapFlags.WRITE, 0, 0x4000_0000, 1 << 16).encode()
    reads = msg(C.REGION_READ, p.RegionAccess(0, PciRegion.CONFIG, 64).encode())
    write = msg(C.REGION_WRITE, p.RegionAccess(0x20, 0, 4, b"\x01\0\0\0").encode())
    return [bytes([3, 0]) + msg(C.DMA_MAP, dma_map, 0x80) + reads + write,
            bytes([1, 1]) + msg(C.DEVICE_GET_INFO, b"\x10\0\0\0" + bytes(12)) + reads,
            bytes([0x3F, 0]) + msg(C.DEVICE_GET_REGION_INFO, bytes(32)) + reads,
            bytes([3, 1]) + msg(C.DMA_UNMAP, bytes(32)) + msg(C.DEVICE_RESET, b""),
            bytes([7, 0]) + bytes(range(40))]
