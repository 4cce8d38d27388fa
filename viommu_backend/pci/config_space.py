"""Type-0 PCI configuration space (4 KiB, PCIe extended space included).

Emulation is table driven: every register is a :class:`~viommu_backend.bitfield.Register`
(a bit-field layout plus the names of its read-write and write-1-to-clear fields).
Installing a register sets three byte maps over the 4 KiB:

* ``data``   the current contents (what a config read returns);
* ``wmask``  bits a guest write may change (everything else is read-only);
* ``w1cmask`` bits a guest write of 1 clears (RW1C status bits).

A write computes, per byte, :func:`~viommu_backend.bitfield.masked_write` (RW bits take the
written value, RW1C bits written with 1 clear, the rest keep theirs); registers with side
effects (Command, MSI-X control, FLR, PRI reset, ...) register a watcher that sees the old
and new value after the write.

BAR sizing falls out of the masks: a memory BAR of size S has the address bits below S
read-only zero, so writing all-ones reads back the size mask with the type bits.  The
expansion-ROM BAR (0x30) has no writable bits: it reads 0, and QEMU sees no ROM.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from viommu_backend.bitfield import ALL_FIELDS, F, Layout, Register, masked_write

CONFIG_SIZE = 4096
LEGACY_SIZE = 256
EXT_CAP_START = 0x100


def block(*regs: Register) -> dict[str, Register]:
    return {r.name: r for r in regs}


# --- the type-0 header ------------------------------------------------------------------
COMMAND = Layout("COMMAND", 16, (
    F("IO", 0, doc="I/O space enable"),
    F("MEMORY", 1, doc="memory space enable"),
    F("MASTER", 2, doc="bus master enable"),
    F("SPECIAL", 3),
    F("INVALIDATE", 4),
    F("VGA_PALETTE", 5),
    F("PARITY", 6, doc="parity error response"),
    F("SERR", 8, doc="SERR# enable"),
    F("FAST_BACK", 9),
    F("INTX_DISABLE", 10),
))

STATUS = Layout("STATUS", 16, (
    F("IMM_READINESS", 0),
    F("INTERRUPT", 3, doc="INTx asserted (read-only, driven by the device)"),
    F("CAP_LIST", 4),
    F("66MHZ", 5),
    F("FAST_BACK", 7),
    F("PARITY", 8, doc="master data parity error"),
    F("DEVSEL", 10, 9),
    F("SIG_TARGET_ABORT", 11),
    F("REC_TARGET_ABORT", 12),
    F("REC_MASTER_ABORT", 13),
    F("SIG_SYSTEM_ERROR", 14),
    F("DETECTED_PARITY", 15),
))

BAR = Layout("BAR", 32, (
    F("IO_SPACE", 0),
    F("TYPE", 2, 1, doc="0: 32-bit, 2: 64-bit"),
    F("PREFETCH", 3),
    F("ADDRESS", 31, 4, address=True),
))
BAR_TYPE_32 = 0
BAR_TYPE_64 = 2

HEADER = block(
    Register("VENDOR_ID", 0x00, 16),
    Register("DEVICE_ID", 0x02, 16),
    Register("COMMAND", 0x04, 16, COMMAND.fields,
           rw=("MEMORY", "MASTER", "PARITY", "SERR", "INTX_DISABLE")),
    Register("STATUS", 0x06, 16, STATUS.fields,
           rw1c=("PARITY", "SIG_TARGET_ABORT", "REC_TARGET_ABORT", "REC_MASTER_ABORT",
                 "SIG_SYSTEM_ERROR", "DETECTED_PARITY")),
    Register("REVISION_ID", 0x08, 8),
    Register("CLASS_CODE", 0x09, 24, (F("PROG_IF", 7, 0), F("SUBCLASS", 15, 8),
                                    F("BASE_CLASS", 23, 16))),
    Register("CACHE_LINE_SIZE", 0x0C, 8, rw=(ALL_FIELDS,)),
    Register("LATENCY_TIMER", 0x0D, 8),
    Register("HEADER_TYPE", 0x0E, 8, (F("LAYOUT", 6, 0), F("MULTI_FUNCTION", 7))),
    Register("BIST", 0x0F, 8),
    *(Register(f"BAR{i}", 0x10 + 4 * i, 32, BAR.fields) for i in range(6)),
    Register("CARDBUS_CIS", 0x28, 32),
    Register("SUBSYSTEM_VENDOR_ID", 0x2C, 16),
    Register("SUBSYSTEM_ID", 0x2E, 16),
    Register("ROM_ADDRESS", 0x30, 32, doc="no expansion ROM: reads 0, writes ignored"),
    Register("CAPABILITIES_PTR", 0x34, 8),
    Register("INTERRUPT_LINE", 0x3C, 8, rw=(ALL_FIELDS,)),
    Register("INTERRUPT_PIN", 0x3D, 8, doc="1 = INTA#, 0 = none"),
    Register("MIN_GNT", 0x3E, 8),
    Register("MAX_LAT", 0x3F, 8),
)

CAP_HEADER = Layout("CAP_HEADER", 16, (F("ID", 7, 0), F("NEXT", 15, 8)))
EXT_CAP_HEADER = Layout("EXT_CAP_HEADER", 32, (
    F("ID", 15, 0), F("VERSION", 19, 16), F("NEXT", 31, 20)))

Watcher = Callable[[int, int], None]  # (old value, new value) of the watched register


class ConfigSpace:
    """The 4 KiB config space of one function: contents, write masks, RW1C masks, the
    power-on image (for reset), the capability lists and write watchers."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self._power_on = bytearray(CONFIG_SIZE)
        self._watchers: list[tuple[int, int, Watcher]] = []
        self._cap_tail = HEADER["CAPABILITIES_PTR"].offset  # where the next pointer goes
        self._cap_free = 0x40
        self._ext_tail: int | None = None
        self._ext_free = EXT_CAP_START

    # -- initialisation (device side; ignores masks, updates the power-on image) ---------
    def init(self, offset: int, width: int, value: int) -> None:
        raw = value.to_bytes(width, "little")
        self.data[offset:offset + width] = raw
        self._power_on[offset:offset + width] = raw

    def set_masks(self, offset: int, width: int, wmask: int = 0, w1c: int = 0) -> None:
        self.wmask[offset:offset + width] = wmask.to_bytes(width, "little")
        self.w1cmask[offset:offset + width] = w1c.to_bytes(width, "little")

    def install(self, base: int, regs: Iterable[Register],
                values: Mapping[str, int] | None = None) -> None:
        """Declare ``regs`` at ``base``: masks from the table, initial values from
        ``values`` (a register's int value, or a dict of its field values)."""
        values = dict(values or {})
        for r in regs:
            off = base + r.offset
            self.set_masks(off, r.size, r.wmask, r.w1cmask)
            v = values.pop(r.name, None)
            if isinstance(v, Mapping):
                v = r.layout.encode(v)
            if v is not None:
                self.init(off, r.size, v)
        if values:
            raise KeyError(f"unknown registers {sorted(values)}")

    def init_header(self, name: str, value: int) -> None:
        r = HEADER[name]
        self.init(r.offset, r.size, value)

    # -- device-side state updates (not subject to masks, not part of power-on) -----------
    def poke(self, offset: int, width: int, value: int) -> None:
        self.data[offset:offset + width] = value.to_bytes(width, "little")

    def update_field(self, offset: int, reg: Register | Layout, field: str, fv: int) -> None:
        layout = reg.layout if isinstance(reg, Register) else reg
        width = layout.size_bits // 8
        self.poke(offset, width, layout.set(self.read(offset, width), field, fv))

    def field(self, offset: int, reg: Register | Layout, field: str) -> int:
        layout = reg.layout if isinstance(reg, Register) else reg
        return layout.get(self.read(offset, layout.size_bits // 8), field)

    # -- guest accesses ----------------------------------------------------------------
    def read(self, offset: int, width: int) -> int:
        self._check(offset, width)
        return int.from_bytes(self.data[offset:offset + width], "little")

    def read_bytes(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        return bytes(self.data[offset:offset + count])

    def write(self, offset: int, width: int, value: int) -> None:
        self.write_bytes(offset, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))

    def write_bytes(self, offset: int, data: bytes) -> None:
        """A guest config write: masks applied byte by byte, then watchers whose
        register overlaps the written range run with (old, new)."""
        n = len(data)
        self._check(offset, n)
        hits = [(o, w, fn, self.read(o, w)) for (o, w, fn) in self._watchers
                if o < offset + n and offset < o + w]
        for i, b in enumerate(data):
            o = offset + i
            self.data[o] = masked_write(self.data[o], b, self.wmask[o], self.w1cmask[o]) & 0xFF
        for o, w, fn, old in hits:
            fn(old, self.read(o, w))

    def watch(self, offset: int, width: int, fn: Watcher) -> None:
        self._watchers.append((offset, width, fn))

    def reset(self) -> None:
        """Back to the power-on contents (watchers are not run: the owner resets its
        derived state itself)."""
        self.data[:] = self._power_on

    @staticmethod
    def _check(offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > CONFIG_SIZE:
            raise ValueError(f"config access {offset:#x}+{count} outside 4 KiB")

    # -- header helpers ------------------------------------------------------------------
    def header(self, name: str) -> int:
        r = HEADER[name]
        return self.read(r.offset, r.size)

    def command(self, name: str) -> int:
        return COMMAND.get(self.header("COMMAND"), name)

    def set_status(self, name: str, fv: int) -> None:
        self.update_field(HEADER["STATUS"].offset, STATUS, name, fv)

    def setup_bar(self, index: int, size: int, *, is64: bool = False,
                  prefetchable: bool = False) -> None:
        """A memory BAR of ``size`` bytes (power of two >= 16; 64-bit ones use ``index``
        and ``index + 1``).  Address bits below ``size`` are read-only zero."""
        if not 0 <= index < 6 or (is64 and index == 5):
            raise ValueError(f"bad BAR index {index}")
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} is not a power of two >= 16")
        if not is64 and size > 1 << 31:
            raise ValueError("32-bit BAR larger than 2 GiB")
        off = HEADER[f"BAR{index}"].offset
        addr_mask = ~(size - 1) & ((1 << 64) - 1)
        typ = BAR.encode(TYPE=BAR_TYPE_64 if is64 else BAR_TYPE_32, PREFETCH=int(prefetchable))
        self.init(off, 4, typ)
        self.set_masks(off, 4, addr_mask & 0xFFFF_FFF0)
        if is64:
            self.init(off + 4, 4, 0)
            self.set_masks(off + 4, 4, addr_mask >> 32)

    def bar_address(self, index: int) -> int:
        """The address the guest programmed (64-bit BARs combine both dwords)."""
        off = HEADER[f"BAR{index}"].offset
        lo = self.read(off, 4)
        addr = lo & BAR["ADDRESS"].mask
        if BAR.get(lo, "TYPE") == BAR_TYPE_64:
            addr |= self.read(off + 4, 4) << 32
        return addr

    # -- capability lists ----------------------------------------------------------------
    def add_cap(self, cap_id: int, size: int) -> int:
        """Allocate a standard capability (dword aligned, below 0x100) and link it at
        the end of the list; returns its offset."""
        off = self._cap_free
        if off + size > LEGACY_SIZE:
            raise ValueError("no room for capability in legacy config space")
        self._cap_free = (off + size + 3) & ~3
        self.init(off, 2, CAP_HEADER.encode(ID=cap_id, NEXT=0))
        link = self._cap_tail
        self.init(link, 1, off)
        self._cap_tail = off + 1
        self.set_status_init("CAP_LIST", 1)
        return off

    def add_ext_cap(self, cap_id: int, version: int, size: int) -> int:
        """Allocate an extended capability (from 0x100) and link it; returns its offset."""
        off = self._ext_free
        if off + size > CONFIG_SIZE:
            raise ValueError("no room for extended capability")
        self._ext_free = (off + size + 3) & ~3
        self.init(off, 4, EXT_CAP_HEADER.encode(ID=cap_id, VERSION=version, NEXT=0))
        if self._ext_tail is not None:
            prev = self.read(self._ext_tail, 4)
            self.init(self._ext_tail, 4, EXT_CAP_HEADER.set(prev, "NEXT", off))
        self._ext_tail = off
        return off

    def set_status_init(self, name: str, fv: int) -> None:
        r = HEADER["STATUS"]
        self.init(r.offset, 2, STATUS.set(self.read(r.offset, 2), name, fv))

    def caps(self) -> list[tuple[int, int]]:
        """(id, offset) of the standard list, walked as a guest would (loop-safe)."""
        out: list[tuple[int, int]] = []
        if not self.has_cap_list():
            return out
        ptr = self.read(HEADER["CAPABILITIES_PTR"].offset, 1) & ~3
        seen: set[int] = set()
        while ptr and ptr not in seen and ptr < LEGACY_SIZE:
            seen.add(ptr)
            hdr = CAP_HEADER.decode(self.read(ptr, 2))
            out.append((hdr["ID"], ptr))
            ptr = hdr["NEXT"] & ~3
        return out

    def ext_caps(self) -> list[tuple[int, int, int]]:
        """(id, version, offset) of the extended list."""
        out: list[tuple[int, int, int]] = []
        ptr = EXT_CAP_START
        seen: set[int] = set()
        while ptr and ptr not in seen and EXT_CAP_START <= ptr < CONFIG_SIZE:
            seen.add(ptr)
            hdr = EXT_CAP_HEADER.decode(self.read(ptr, 4))
            if hdr["ID"] == 0 and hdr["VERSION"] == 0:
                break
            out.append((hdr["ID"], hdr["VERSION"], ptr))
            ptr = hdr["NEXT"] & ~3
        return out

    def has_cap_list(self) -> bool:
        return bool(STATUS.get(self.header("STATUS"), "CAP_LIST"))

    def find_cap(self, cap_id: int) -> int | None:
        return next((off for cid, off in self.caps() if cid == cap_id), None)

    def find_ext_cap(self, cap_id: int) -> int | None:
        return next((off for cid, _, off in self.ext_caps() if cid == cap_id), None)
