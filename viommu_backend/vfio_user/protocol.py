"""vfio-user wire format (sans-IO): header, commands, and one dataclass per message body.

Every message is a 16-byte header followed by a command-specific body.  Bodies are
little-endian C structs imported from the VFIO uapi (``argsz``-prefixed) or defined by
the vfio-user spec.  ``decode`` class methods validate their input and raise
:class:`VfioUserError` with the errno that goes back in an error reply; ``encode``
returns the body bytes (without header).  Nothing here touches a socket.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar


class VfioUserError(Exception):
    """An error reply: carries the errno sent back to the peer."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err

HEADER = struct.Struct("<HHIII")  # msg_id, command, size, flags, error
HEADER_SIZE = HEADER.size  # 16

MAJOR_VERSION = 0
MINOR_VERSION = 0

# Our limits (advertised in the VERSION reply, never above what the client proposed).
DEFAULT_MAX_MSG_FDS = 8
MAX_MSG_FDS = 16
DEFAULT_MAX_DATA_XFER = 1 << 20
MAX_DATA_XFER = 64 << 20
DEFAULT_PGSIZES = 4096
DEFAULT_MAX_DMA_MAPS = 65535
# Slack on top of max_data_xfer_size for the fixed part of a message.
MSG_OVERHEAD = 4096


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15


def command_name(command: int) -> str:
    """The command's name for logs and traces (its number when it has none)."""
    try:
        return Command(command).name
    except ValueError:
        return str(command)


class MsgFlags(enum.IntFlag):
    REQUEST = 0x0
    REPLY = 0x1
    TYPE_MASK = 0xF
    NO_REPLY = 0x10
    ERROR = 0x20


@dataclass
class Header:
    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id & 0xFFFF, self.command & 0xFFFF, self.size,
                           self.flags, self.error)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "Header":
        if len(data) < HEADER_SIZE:
            raise VfioUserError(errno.EINVAL, "short header")
        return cls(*HEADER.unpack_from(data))

    # plain-int flag tests: these run several times per message (IntFlag ops are slow)
    @property
    def msg_type(self) -> int:
        return self.flags & _TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.flags & _TYPE_MASK == _REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & _NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & _ERROR)


_TYPE_MASK, _REPLY = int(MsgFlags.TYPE_MASK), int(MsgFlags.REPLY)
_NO_REPLY, _ERROR = int(MsgFlags.NO_REPLY), int(MsgFlags.ERROR)


def _need(payload: bytes, n: int, what: str) -> None:
    if len(payload) < n:
        raise VfioUserError(errno.EINVAL, f"{what}: body {len(payload)} bytes < {n}")


def _argsz(argsz: int, minimum: int, what: str) -> None:
    if argsz < minimum:
        raise VfioUserError(errno.EINVAL, f"{what}: argsz {argsz} < {minimum}")


def _unpack_request(s: struct.Struct, payload: bytes, need: int, what: str) -> tuple:
    """A GET_*_INFO request: the client may send only the head of the struct (at least
    ``need`` bytes, the rest read as zero); its argsz must cover the whole struct."""
    _need(payload, need, what)
    vals = s.unpack(bytes(payload[:s.size]).ljust(s.size, b"\0"))
    _argsz(vals[0], s.size, what)
    return vals


# --- VERSION -----------------------------------------------------------------------------
@dataclass
class Version:
    COMMAND: ClassVar[Command] = Command.VERSION
    major: int = MAJOR_VERSION
    minor: int = MINOR_VERSION
    caps: dict[str, Any] = field(default_factory=dict)  # the "capabilities" object

    _S: ClassVar = struct.Struct("<HH")

    def encode(self) -> bytes:
        text = json.dumps({"capabilities": self.caps}, separators=(",", ":")) if self.caps else ""
        return self._S.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def decode(cls, payload: bytes) -> "Version":
        _need(payload, 4, "VERSION")
        major, minor = cls._S.unpack_from(payload)
        raw = bytes(payload[4:]).rstrip(b"\0")
        caps: dict[str, Any] = {}
        if raw:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise VfioUserError(errno.EINVAL, f"VERSION: bad JSON: {e}") from None
            if not isinstance(obj, dict):
                raise VfioUserError(errno.EINVAL, "VERSION: capabilities JSON is not an object")
            c = obj.get("capabilities", {})
            if not isinstance(c, dict):
                raise VfioUserError(errno.EINVAL, "VERSION: 'capabilities' is not an object")
            caps = c
        return cls(major, minor, caps)


@dataclass(frozen=True)
class Limits:
    """What one side of a connection can do; the negotiated values are the minimum."""

    max_msg_fds: int = MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER
    pgsizes: int = DEFAULT_PGSIZES
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    write_multiple: bool = True


def _cap_uint(caps: dict[str, Any], key: str, default: int) -> int:
    v = caps.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise VfioUserError(errno.EINVAL, f"VERSION: capability {key} must be an unsigned int")
    return v


def negotiate(request: Version, ours: Limits) -> tuple[Version, Limits]:
    """Server side of VERSION: the reply (a subset of what the client proposed, values
    no larger than proposed) and the limits in force for the connection.  Capabilities we
    do not implement (``migration``, ``twin_socket``) are left out of the reply, which is
    how a server declines them."""
    if request.major != MAJOR_VERSION:
        raise VfioUserError(errno.ENOTSUP, f"VERSION: major {request.major} unsupported")
    c = request.caps
    fds = _cap_uint(c, "max_msg_fds", DEFAULT_MAX_MSG_FDS)
    xfer = _cap_uint(c, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER)
    pgsizes = _cap_uint(c, "pgsizes", DEFAULT_PGSIZES)
    maps = _cap_uint(c, "max_dma_maps", DEFAULT_MAX_DMA_MAPS)
    multi = c.get("write_multiple", False)
    if not isinstance(multi, bool):
        raise VfioUserError(errno.EINVAL, "VERSION: write_multiple must be a boolean")
    if not pgsizes & ours.pgsizes:
        raise VfioUserError(errno.EINVAL, f"VERSION: no common page size in {pgsizes:#x}")
    lim = Limits(
        max_msg_fds=min(fds, ours.max_msg_fds),
        max_data_xfer_size=max(4096, min(xfer, ours.max_data_xfer_size)),
        pgsizes=pgsizes & ours.pgsizes,
        max_dma_maps=min(maps, ours.max_dma_maps),
        write_multiple=multi and ours.write_multiple,
    )
    reply_caps: dict[str, Any] = {}
    for key, val in (("max_msg_fds", lim.max_msg_fds),
                     ("max_data_xfer_size", lim.max_data_xfer_size),
                     ("pgsizes", lim.pgsizes),
                     ("max_dma_maps", lim.max_dma_maps)):
        if key in c:
            reply_caps[key] = val
    if "write_multiple" in c:
        reply_caps["write_multiple"] = lim.write_multiple
    return Version(MAJOR_VERSION, min(request.minor, MINOR_VERSION), reply_caps), lim


def limits_from_reply(reply: Version, proposed: Limits) -> Limits:
    """Client side of VERSION: what the server's reply leaves in force."""
    c = reply.caps
    return Limits(
        max_msg_fds=min(_cap_uint(c, "max_msg_fds", DEFAULT_MAX_MSG_FDS), proposed.max_msg_fds),
        max_data_xfer_size=min(_cap_uint(c, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER),
                               proposed.max_data_xfer_size),
        pgsizes=_cap_uint(c, "pgsizes", DEFAULT_PGSIZES) & proposed.pgsizes,
        max_dma_maps=min(_cap_uint(c, "max_dma_maps", DEFAULT_MAX_DMA_MAPS), proposed.max_dma_maps),
        write_multiple=bool(c.get("write_multiple", False)) and proposed.write_multiple,
    )


def limits_caps(lim: Limits) -> dict[str, Any]:
    """The capabilities object a client proposes."""
    return {"max_msg_fds": lim.max_msg_fds, "max_data_xfer_size": lim.max_data_xfer_size,
            "pgsizes": lim.pgsizes, "max_dma_maps": lim.max_dma_maps,
            "write_multiple": lim.write_multiple}


# --- DMA_MAP / DMA_UNMAP -----------------------------------------------------------------
class DmaMapFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


_U64 = 1 << 64


@dataclass
class DmaMap:
    COMMAND: ClassVar[Command] = Command.DMA_MAP
    flags: int
    offset: int  # into the fd passed with the message
    iova: int
    size: int
    argsz: int = 32

    _S: ClassVar = struct.Struct("<IIQQQ")

    def encode(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.offset, self.iova, self.size)

    @classmethod
    def decode(cls, payload: bytes) -> "DmaMap":
        _need(payload, cls._S.size, "DMA_MAP")
        argsz, flags, offset, iova, size = cls._S.unpack_from(payload)
        _argsz(argsz, cls._S.size, "DMA_MAP")
        if flags & ~(DmaMapFlags.READ | DmaMapFlags.WRITE):
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: unknown flags {flags:#x}")
        if size == 0 or iova + size > _U64 or offset + size > _U64:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: bad range iova={iova:#x} size={size:#x}")
        return cls(flags, offset, iova, size, argsz)


@dataclass
class DmaUnmap:
    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    flags: int
    iova: int
    size: int
    argsz: int = 24

    _S: ClassVar = struct.Struct("<IIQQ")

    def encode(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.iova, self.size)

    @classmethod
    def decode(cls, payload: bytes) -> "DmaUnmap":
        _need(payload, cls._S.size, "DMA_UNMAP")
        argsz, flags, iova, size = cls._S.unpack_from(payload)
        _argsz(argsz, cls._S.size, "DMA_UNMAP")
        if flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise VfioUserError(errno.ENOTSUP, "DMA_UNMAP: dirty page tracking unsupported")
        if flags & ~DmaUnmapFlags.ALL:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: unknown flags {flags:#x}")
        if flags & DmaUnmapFlags.ALL:
            if iova or size:
                raise VfioUserError(errno.EINVAL, "DMA_UNMAP: ALL with a range")
        elif size == 0 or iova + size > _U64:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: bad range iova={iova:#x} size={size:#x}")
        return cls(flags, iova, size, argsz)


# --- DEVICE_GET_INFO ---------------------------------------------------------------------
@dataclass
class DeviceGetInfo:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    argsz: int = 16
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    _S: ClassVar = struct.Struct("<IIII")

    def encode(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def decode(cls, payload: bytes) -> "DeviceGetInfo":
        return cls(*_unpack_request(cls._S, payload, 4, "DEVICE_GET_INFO"))


# --- DEVICE_GET_REGION_INFO (+ capability chain) -----------------------------------------
REGION_INFO_CAP_SPARSE_MMAP = 1
REGION_INFO_CAP_TYPE = 2
_CAP_HDR = struct.Struct("<HHI")  # id, version, next
_SPARSE_HDR = struct.Struct("<II")  # nr_areas, reserved
_SPARSE_AREA = struct.Struct("<QQ")


def encode_sparse_mmap_cap(areas: list[tuple[int, int]], at: int, next_off: int = 0) -> bytes:
    """A VFIO_REGION_INFO_CAP_SPARSE_MMAP capability placed at offset ``at``."""
    del at
    body = _SPARSE_HDR.pack(len(areas), 0) + b"".join(_SPARSE_AREA.pack(o, s) for o, s in areas)
    return _CAP_HDR.pack(REGION_INFO_CAP_SPARSE_MMAP, 1, next_off) + body


def decode_caps(info_bytes: bytes, first: int) -> dict[int, bytes]:
    """Walk a capability chain inside a region info (offsets from the start of argsz)."""
    out: dict[int, bytes] = {}
    off, seen = first, set()
    while off:
        if off in seen or off + _CAP_HDR.size > len(info_bytes):
            raise VfioUserError(errno.EINVAL, f"bad capability chain at {off}")
        seen.add(off)
        cid, _ver, nxt = _CAP_HDR.unpack_from(info_bytes, off)
        end = nxt if nxt > off else len(info_bytes)
        out[cid] = bytes(info_bytes[off:end])
        off = nxt
    return out


def decode_sparse_mmap_cap(cap: bytes) -> list[tuple[int, int]]:
    _need(cap, _CAP_HDR.size + _SPARSE_HDR.size, "sparse mmap cap")
    nr, _ = _SPARSE_HDR.unpack_from(cap, _CAP_HDR.size)
    base = _CAP_HDR.size + _SPARSE_HDR.size
    _need(cap, base + nr * _SPARSE_AREA.size, "sparse mmap areas")
    return [_SPARSE_AREA.unpack_from(cap, base + i * _SPARSE_AREA.size) for i in range(nr)]


@dataclass
class RegionInfoMsg:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    argsz: int
    flags: int = 0
    index: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0
    caps: bytes = b""  # capability chain bytes following the fixed struct

    _S: ClassVar = struct.Struct("<IIIIQQ")
    FIXED: ClassVar[int] = 32

    def encode(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.cap_offset, self.size,
                            self.offset) + self.caps

    @classmethod
    def decode(cls, payload: bytes) -> "RegionInfoMsg":
        vals = _unpack_request(cls._S, payload, 12, "DEVICE_GET_REGION_INFO")
        return cls(*vals, caps=bytes(payload[cls.FIXED:]))


# --- DEVICE_GET_REGION_IO_FDS ------------------------------------------------------------
@dataclass
class RegionIoFds:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    argsz: int
    flags: int = 0
    index: int = 0
    count: int = 0
    sub_regions: bytes = b""

    _S: ClassVar = struct.Struct("<IIII")

    def encode(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.count) + self.sub_regions

    @classmethod
    def decode(cls, payload: bytes) -> "RegionIoFds":
        _need(payload, cls._S.size, "DEVICE_GET_REGION_IO_FDS")
        vals = cls._S.unpack_from(payload)
        _argsz(vals[0], cls._S.size, "DEVICE_GET_REGION_IO_FDS")
        return cls(*vals, sub_regions=bytes(payload[16:]))


# --- DEVICE_GET_IRQ_INFO -----------------------------------------------------------------
@dataclass
class IrqInfoMsg:
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    argsz: int = 16
    flags: int = 0
    index: int = 0
    count: int = 0

    _S: ClassVar = struct.Struct("<IIII")

    def encode(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, payload: bytes) -> "IrqInfoMsg":
        return cls(*_unpack_request(cls._S, payload, 12, "DEVICE_GET_IRQ_INFO"))


# --- DEVICE_SET_IRQS ---------------------------------------------------------------------
class IrqSetFlags(enum.IntFlag):
    """VFIO_IRQ_SET_* (VFIO uapi): one DATA_* and one ACTION_* bit per request."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5

    DATA_MASK = DATA_NONE | DATA_BOOL | DATA_EVENTFD
    ACTION_MASK_ALL = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER


_IRQ_DATA, _IRQ_ACTION = int(IrqSetFlags.DATA_MASK), int(IrqSetFlags.ACTION_MASK_ALL)
# the bits as plain ints, for the per-interrupt paths (an INTx interrupt brings the
# client's SET_IRQS unmask; IntFlag operations cost microseconds each)
IRQ_DATA_MASK = _IRQ_DATA
IRQ_DATA_NONE, IRQ_DATA_BOOL, IRQ_DATA_EVENTFD = (
    int(IrqSetFlags.DATA_NONE), int(IrqSetFlags.DATA_BOOL), int(IrqSetFlags.DATA_EVENTFD))
IRQ_ACTION_MASK, IRQ_ACTION_UNMASK, IRQ_ACTION_TRIGGER = (
    int(IrqSetFlags.ACTION_MASK), int(IrqSetFlags.ACTION_UNMASK),
    int(IrqSetFlags.ACTION_TRIGGER))


@dataclass
class IrqSet:
    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""  # DATA_BOOL: one byte per vector
    argsz: int = 0  # 0: computed

    _S: ClassVar = struct.Struct("<IIIII")

    def __post_init__(self) -> None:
        if not self.argsz:
            self.argsz = self._S.size + len(self.data)

    def encode(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> "IrqSet":
        _need(payload, cls._S.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = cls._S.unpack_from(payload)
        _argsz(argsz, cls._S.size, "DEVICE_SET_IRQS")
        data_t, action = flags & _IRQ_DATA, flags & _IRQ_ACTION
        if flags & ~(_IRQ_DATA | _IRQ_ACTION) or bin(data_t).count("1") != 1 \
                or bin(action).count("1") != 1:
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: bad flags {flags:#x}")
        if start + count > 0xFFFFFFFF:
            raise VfioUserError(errno.EINVAL, "DEVICE_SET_IRQS: start+count overflows")
        data = bytes(payload[cls._S.size:])
        if data_t == IrqSetFlags.DATA_BOOL:
            if len(data) < count:
                raise VfioUserError(errno.EINVAL, "DEVICE_SET_IRQS: short DATA_BOOL array")
            data = data[:count]
        else:
            data = b""
        return cls(flags, index, start, count, data, argsz)


# --- REGION_READ / REGION_WRITE ----------------------------------------------------------
@dataclass
class RegionAccess:
    """Body of REGION_READ / REGION_WRITE requests and replies."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    _S: ClassVar = struct.Struct("<QII")

    def encode(self) -> bytes:
        return self._S.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, payload: bytes, *, with_data: bool) -> "RegionAccess":
        _need(payload, cls._S.size, "REGION_READ/WRITE")
        offset, region, count = cls._S.unpack_from(payload)
        data = bytes(payload[cls._S.size:])
        if with_data:
            if len(data) != count:
                raise VfioUserError(errno.EINVAL,
                                    f"REGION access: count {count} but {len(data)} data bytes")
        elif data:
            raise VfioUserError(errno.EINVAL, "REGION access: unexpected data")
        if offset + count > _U64:
            raise VfioUserError(errno.EINVAL, "REGION access: offset+count overflows")
        return cls(offset, region, count, data)


# --- DMA_READ / DMA_WRITE (server -> client) ---------------------------------------------
@dataclass(frozen=True)
class DmaRwLayout:
    """Where the count and the data sit in a DMA_READ/DMA_WRITE body (after the header).
    ``fixed`` is the size the peer checks ``hdr.size`` against (sizeof its struct).  Peers
    disagree on it, so it is a setting of each connection (``Connection(dma_layout=)``)."""

    count_fmt: str  # "<I" or "<Q", at body offset 8
    data_at: int  # body offset of the data
    fixed: int  # minimum body size (struct size - header)


# QEMU 11 (hw/vfio-user/protocol.h VFIOUserDMARW): u64 offset, u32 count, data at body
# offset 12; sizeof == 32 with the header, so messages are 16 + 16 + count bytes long.
QEMU_DMA_RW = DmaRwLayout("<I", 12, 16)
# The vfio-user spec / libvfio-user: u64 address, u64 count, data at body offset 16.
SPEC_DMA_RW = DmaRwLayout("<Q", 16, 16)


@dataclass
class DmaAccess:
    address: int
    count: int
    data: bytes = b""

    def encode(self, layout: DmaRwLayout) -> bytes:
        head = struct.pack("<Q", self.address) + struct.pack(layout.count_fmt, self.count)
        body = head.ljust(layout.data_at, b"\0") + self.data
        return body.ljust(layout.fixed + len(self.data), b"\0")

    @classmethod
    def decode(cls, payload: bytes, *, with_data: bool, layout: DmaRwLayout) -> "DmaAccess":
        _need(payload, max(layout.fixed, 8 + struct.calcsize(layout.count_fmt)), "DMA_READ/WRITE")
        (address,) = struct.unpack_from("<Q", payload)
        (count,) = struct.unpack_from(layout.count_fmt, payload, 8)
        data = b""
        if with_data:
            avail = len(payload) - layout.data_at
            if count > avail:
                raise VfioUserError(errno.EINVAL, f"DMA access: count {count} > {avail} data bytes")
            data = bytes(payload[layout.data_at:layout.data_at + count])
        if address + count > _U64:
            raise VfioUserError(errno.EINVAL, "DMA access: address+count overflows")
        return cls(address, count, data)

    @classmethod
    def decode_read_reply(cls, payload: bytes, count: int | None,
                          layout: DmaRwLayout) -> "DmaAccess":
        """A DMA_READ reply: the data (``count`` bytes of it when the request is known)."""
        _need(payload, layout.data_at, "DMA_READ reply")
        data = bytes(payload[layout.data_at:])
        if count is not None:
            if len(data) < count:
                raise VfioUserError(errno.EINVAL, "DMA_READ reply shorter than count")
            data = data[:count]
        (address,) = struct.unpack_from("<Q", payload)
        return cls(address, len(data), data)


# --- DEVICE_RESET ------------------------------------------------------------------------
@dataclass
class DeviceReset:
    COMMAND: ClassVar[Command] = Command.DEVICE_RESET

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> "DeviceReset":
        return cls()


# --- REGION_WRITE_MULTI ------------------------------------------------------------------
MULTI_DATA = 8
MULTI_MAX = 200
_WR_ONE = struct.Struct("<QII8s")
WRITE_MULTI_REPLY = struct.Struct("<Q")  # the reply: wr_cnt, the writes performed


@dataclass
class RegionWriteMulti:
    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    writes: list[RegionAccess]

    def encode(self) -> bytes:
        out = [struct.pack("<Q", len(self.writes))]
        for w in self.writes:
            out.append(_WR_ONE.pack(w.offset, w.region, w.count, w.data.ljust(MULTI_DATA, b"\0")))
        return b"".join(out)

    @classmethod
    def decode(cls, payload: bytes) -> "RegionWriteMulti":
        _need(payload, 8, "REGION_WRITE_MULTI")
        (n,) = struct.unpack_from("<Q", payload)
        if n > MULTI_MAX:
            raise VfioUserError(errno.E2BIG, f"REGION_WRITE_MULTI: {n} writes > {MULTI_MAX}")
        if len(payload) < 8 + n * _WR_ONE.size:
            raise VfioUserError(errno.EINVAL, "REGION_WRITE_MULTI: body shorter than wr_cnt")
        writes = []
        for i in range(n):
            off, region, count, data = _WR_ONE.unpack_from(payload, 8 + i * _WR_ONE.size)
            if count > MULTI_DATA:
                raise VfioUserError(errno.EINVAL, f"REGION_WRITE_MULTI: count {count} > 8")
            writes.append(RegionAccess(off, region, count, data[:count]))
        return cls(writes)


# --- framing helpers ---------------------------------------------------------------------
def frame(msg_id: int, command: int, body: bytes, flags: int = 0, error: int = 0) -> bytes:
    return Header(msg_id, command, HEADER_SIZE + len(body), flags, error).pack() + body


def error_frame(msg_id: int, command: int, err: int) -> bytes:
    return frame(msg_id, command, b"", MsgFlags.REPLY | MsgFlags.ERROR, err)


def decode_request(command: int, payload: bytes, *, dma_layout: DmaRwLayout) -> Any:
    """Decode the body of a request a server receives (or a client receives: DMA_*, in
    the connection's ``dma_layout``)."""
    match command:
        case Command.VERSION:
            return Version.decode(payload)
        case Command.DMA_MAP:
            return DmaMap.decode(payload)
        case Command.DMA_UNMAP:
            return DmaUnmap.decode(payload)
        case Command.DEVICE_GET_INFO:
            return DeviceGetInfo.decode(payload)
        case Command.DEVICE_GET_REGION_INFO:
            return RegionInfoMsg.decode(payload)
        case Command.DEVICE_GET_REGION_IO_FDS:
            return RegionIoFds.decode(payload)
        case Command.DEVICE_GET_IRQ_INFO:
            return IrqInfoMsg.decode(payload)
        case Command.DEVICE_SET_IRQS:
            return IrqSet.decode(payload)
        case Command.REGION_READ:
            return RegionAccess.decode(payload, with_data=False)
        case Command.REGION_WRITE:
            return RegionAccess.decode(payload, with_data=True)
        case Command.DMA_READ:
            return DmaAccess.decode(payload, with_data=False, layout=dma_layout)
        case Command.DMA_WRITE:
            return DmaAccess.decode(payload, with_data=True, layout=dma_layout)
        case Command.DEVICE_RESET:
            return DeviceReset.decode(payload)
        case Command.REGION_WRITE_MULTI:
            return RegionWriteMulti.decode(payload)
        case Command.DIRTY_PAGES:
            raise VfioUserError(errno.ENOTSUP, "DIRTY_PAGES unsupported")
    raise VfioUserError(errno.ENOSYS, f"unknown command {command}")


def decode_reply(command: int, payload: bytes, request: Any = None, *,
                 dma_layout: DmaRwLayout) -> Any:
    """Decode the body of a (non-error) reply to ``command`` (DMA_READ: in the
    connection's ``dma_layout``)."""
    match command:
        case Command.VERSION:
            return Version.decode(payload)
        case Command.DEVICE_GET_INFO:
            return DeviceGetInfo.decode(payload)
        case Command.DEVICE_GET_REGION_INFO:
            return RegionInfoMsg.decode(payload)
        case Command.DEVICE_GET_REGION_IO_FDS:
            return RegionIoFds.decode(payload)
        case Command.DEVICE_GET_IRQ_INFO:
            return IrqInfoMsg.decode(payload)
        case Command.REGION_READ:
            r = RegionAccess.decode(payload, with_data=True)
            if request is not None and r.count > request.count:
                raise VfioUserError(errno.E2BIG, "REGION_READ reply longer than asked")
            return r
        case Command.REGION_WRITE:
            return RegionAccess.decode(payload[:16], with_data=False) if payload else None
        case Command.DMA_READ:
            count = request.count if request is not None else None
            return DmaAccess.decode_read_reply(payload, count, dma_layout)
        case Command.DMA_UNMAP:
            if len(payload) < DmaUnmap._S.size:
                return None
            argsz, flags, iova, size = DmaUnmap._S.unpack_from(payload)
            return DmaUnmap(flags, iova, size, argsz)  # size: bytes unmapped
        case Command.REGION_WRITE_MULTI:
            _need(payload, WRITE_MULTI_REPLY.size, "REGION_WRITE_MULTI reply")
            return WRITE_MULTI_REPLY.unpack_from(payload)[0]  # wr_cnt
    return payload
