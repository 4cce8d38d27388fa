"""Declarative bit-field layouts for registers and in-memory descriptors.

One definition per register or descriptor (STE, CD, command, event record, PTE) serves
decode, encode, QMP output and tests, in the manner of Linux's GENMASK/FIELD_GET tables.

A :class:`Field` names an inclusive bit range ``[hi:lo]`` counted over the whole value
(bit 64 is bit 0 of the second 64-bit word of a descriptor).  A :class:`Layout` groups
fields over a value of ``size_bits`` bits and converts between Python ints, dicts of
field values, little-endian bytes and numpy arrays of 64-bit words (for batched decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass(frozen=True)
class Field:
    """Bits ``hi`` down to ``lo`` (inclusive) of a value; ``shift`` places the field's
    value when it is an address whose low bits are implied (e.g. a table base aligned
    to 64 bytes stored in bits [51:6] has ``shift=lo`` and decodes to an address)."""

    name: str
    hi: int
    lo: int
    doc: str = ""
    address: bool = False  # decoded value keeps its bit position (value & mask)

    def __post_init__(self) -> None:
        if self.hi < self.lo or self.lo < 0:
            raise ValueError(f"field {self.name}: bad range [{self.hi}:{self.lo}]")
        # get() = (value >> _shift) & _vmask, precomputed (decode is on every hot path)
        shift = 64 * (self.lo // 64) if self.address else self.lo
        object.__setattr__(self, "_shift", shift)
        object.__setattr__(self, "_vmask", self.mask >> shift)

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    @property
    def mask(self) -> int:
        """Mask of the field in place (GENMASK(hi, lo))."""
        return ((1 << self.width) - 1) << self.lo

    @property
    def word(self) -> int:
        """Index of the 64-bit word holding the field (fields may not span words)."""
        return self.lo // 64

    def get(self, value: int) -> int:
        """The field's value (an ``address`` field keeps its bit position in its word)."""
        return (value >> self._shift) & self._vmask  # type: ignore[attr-defined]

    def put(self, value: int, fv: int) -> int:
        """Return ``value`` with this field replaced by ``fv`` (checked for range)."""
        raw = fv << (64 * self.word) if self.address else fv << self.lo
        if raw & ~self.mask:
            raise ValueError(f"field {self.name}: value {fv:#x} does not fit [{self.hi}:{self.lo}]")
        return (value & ~self.mask) | raw


def F(name: str, hi: int, lo: int | None = None, doc: str = "", *, word: int = 0,
      address: bool = False) -> Field:
    """Shorthand: ``F("V", 0)`` one bit; ``F("CONFIG", 3, 1)``; ``word=1`` offsets by 64 bits."""
    if lo is None:
        lo = hi
    return Field(name, hi + 64 * word, lo + 64 * word, doc, address)


@dataclass
class Layout:
    """A named group of fields over a value of ``size_bits`` bits."""

    name: str
    size_bits: int
    fields: tuple[Field, ...]
    by_name: dict[str, Field] = field(init=False, repr=False)

    def __init__(self, name: str, size_bits: int, fields: Iterable[Field]) -> None:
        self.name = name
        self.size_bits = size_bits
        self.fields = tuple(fields)
        self.by_name = {}
        used = 0
        for f in self.fields:
            if f.hi >= size_bits:
                raise ValueError(f"{name}.{f.name} beyond {size_bits} bits")
            if f.hi // 64 != f.lo // 64:
                raise ValueError(f"{name}.{f.name} spans two 64-bit words")
            if f.name in self.by_name:
                raise ValueError(f"{name}.{f.name} defined twice")
            if used & f.mask:
                raise ValueError(f"{name}.{f.name} overlaps another field")
            used |= f.mask
            self.by_name[f.name] = f
        self._decoder = tuple((f.name, f._shift, f._vmask)  # type: ignore[attr-defined]
                              for f in self.fields)

    @property
    def size_bytes(self) -> int:
        return self.size_bits // 8

    def __getitem__(self, name: str) -> Field:
        return self.by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    # -- scalar -------------------------------------------------------------------
    def get(self, value: int, name: str) -> int:
        f = self.by_name[name]
        return (value >> f._shift) & f._vmask  # type: ignore[attr-defined]

    def set(self, value: int, name: str, fv: int) -> int:
        return self.by_name[name].put(value, fv)

    def decode(self, value: int) -> dict[str, int]:
        return {name: (value >> shift) & vmask for name, shift, vmask in self._decoder}

    def encode(self, values: Mapping[str, int] | None = None, /, **kw: int) -> int:
        merged = dict(values or {}, **kw)
        out = 0
        for name, fv in merged.items():
            if name not in self.by_name:
                raise KeyError(f"{self.name} has no field {name}")
            out = self.by_name[name].put(out, int(fv))
        return out

    def from_bytes(self, data: bytes) -> int:
        if len(data) < self.size_bytes:
            raise ValueError(f"{self.name}: {len(data)} bytes, need {self.size_bytes}")
        return int.from_bytes(data[: self.size_bytes], "little")

    def to_bytes(self, value: int) -> bytes:
        return value.to_bytes(self.size_bytes, "little")

    def describe(self, value: int, *, nonzero: bool = False) -> dict[str, int | str]:
        """Field values for display (QMP): addresses as hex strings."""
        out: dict[str, int | str] = {}
        for f in self.fields:
            v = f.get(value)
            if nonzero and not v:
                continue
            out[f.name] = hex(v) if f.address else v
        return out


ALL_FIELDS = "*"  # in Register ``rw`` / ``rw1c``: every field (every bit if it has none)


def masked_write(old: int, value: int, wmask: int, w1cmask: int = 0) -> int:
    """The register value after a write of ``value``: RW bits take it, RW1C bits written
    with 1 clear, every other bit keeps ``old``."""
    return ((old & ~wmask) | (value & wmask)) & ~(value & w1cmask)


@dataclass(frozen=True)
class Register:
    """A register (MMIO or PCI config space): offset in its block, width in bits, the
    field layout and each field's access rule: the fields named in ``rw`` are read-write,
    those in ``rw1c`` write-1-to-clear, all other bits read-only (RO, RsvdP, RsvdZ, RES0:
    a write leaves them unchanged).  Write masks, decode, encode and display derive from
    this one definition."""

    name: str
    offset: int
    width: int = 32
    fields: tuple[Field, ...] = ()
    rw: tuple[str, ...] = ()
    rw1c: tuple[str, ...] = ()
    reset: int = 0
    doc: str = ""
    layout: Layout = field(init=False, repr=False, compare=False)
    wmask: int = field(init=False, repr=False, compare=False)  # RW bits
    w1cmask: int = field(init=False, repr=False, compare=False)  # RW1C bits

    def __post_init__(self) -> None:
        layout = Layout(self.name, self.width, self.fields)
        both = set(self.rw) & set(self.rw1c)
        if both:
            raise ValueError(f"{self.name}: {sorted(both)} both RW and RW1C")
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "wmask", self._mask(self.rw))
        object.__setattr__(self, "w1cmask", self._mask(self.rw1c))

    def _mask(self, names: tuple[str, ...]) -> int:
        if ALL_FIELDS in names:
            if not self.fields:
                return (1 << self.width) - 1
            names = tuple(self.layout.by_name)
        unknown = [n for n in names if n not in self.layout]
        if unknown:
            raise ValueError(f"{self.name} has no field {', '.join(unknown)}")
        return sum(self.layout[n].mask for n in names)

    @property
    def size(self) -> int:
        """Width in bytes."""
        return self.width // 8

    def describe(self, value: int) -> dict[str, int | str]:
        """The register for display (QMP): its value and its fields."""
        return {"value": hex(value), **self.layout.describe(value)}


class RegisterMap:
    """Registers of one block, looked up by name or offset."""

    def __init__(self, registers: Iterable[Register]) -> None:
        self.registers = tuple(registers)
        self.by_name = {r.name: r for r in self.registers}
        self.by_offset = {r.offset: r for r in self.registers}
        self.layouts = {r.name: r.layout for r in self.registers}
        if len(self.by_name) != len(self.registers) or len(self.by_offset) != len(self.registers):
            raise ValueError("duplicate register name or offset")

    def __getitem__(self, name: str) -> Register:
        return self.by_name[name]

    def at(self, offset: int) -> Register | None:
        return self.by_offset.get(offset)
