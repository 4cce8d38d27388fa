"""Shared by the fuzz targets: an input reader, a guest memory that detects accesses
outside its DMA regions, an error-log trap, and the per-target counters."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

import numpy as np

from viommu_backend.memory import GuestMemory, GuestMemoryError
from viommu_backend.smmuv3 import builders


class Finding(Exception):
    """A bug the harness detected (an exception is a finding by itself)."""


class Reader:
    """Consumes a fuzz input front to back; past the end everything reads as zero."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def int(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def below(self, n: int) -> int:
        return self.int(1 if n <= 256 else 2 if n <= 65536 else 4) % n

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


STATS: Counter[str] = Counter()  # inputs, refused (clean refusals of outside accesses), oob


def _checked(name: str, width: int = 0) -> Callable[..., Any]:
    """Wrap GuestMemory.<name>(addr, ...): an access not inside the regions must be
    refused (GuestMemoryError); one that returns is a finding.  ``width``: the access
    size of fixed-width accessors; else the second argument (a size or the data)."""
    orig = getattr(GuestMemory, name)

    def method(self: "FencedMemory", addr: int, *a: Any, **kw: Any) -> Any:
        size = width or (a[0] if isinstance(a[0], int) else len(a[0]))
        inside = size == 0 or GuestMemory.contains(self, addr, size)
        try:
            out = orig(self, addr, *a, **kw)
        except GuestMemoryError:
            STATS["refused"] += 1
            raise
        if not inside:
            STATS["oob"] += 1
            raise Finding(f"GuestMemory.{name}({addr:#x}, {size:#x}) outside the DMA regions "
                          "was not refused")
        return out
    return method


class FencedMemory(GuestMemory):
    """A GuestMemory that checks every access against its DMA regions."""

    read = _checked("read")
    write = _checked("write")
    ndarray = _checked("ndarray")
    read_u64 = _checked("read_u64", 8)
    write_u64 = _checked("write_u64", 8)
    read_u32 = _checked("read_u32", 4)
    write_u32 = _checked("write_u32", 4)

    def views(self, runs: Any, write: bool = False) -> list[memoryview]:
        runs = list(runs)
        try:
            out = super().views(runs, write)
        except GuestMemoryError:
            STATS["refused"] += 1
            raise
        for addr, n in runs:
            if n and not self.contains(addr, n):
                STATS["oob"] += 1
                raise Finding(f"GuestMemory.views({addr:#x}, {n:#x}) outside the regions")
        return out

    def update_u64(self, addr: int, expected: int, new: int) -> bool:
        inside = self.contains(addr, 8)
        try:
            out = super().update_u64(addr, expected, new)
        except GuestMemoryError:
            STATS["refused"] += 1
            raise
        if not inside:
            STATS["oob"] += 1
            raise Finding(f"GuestMemory.update_u64({addr:#x}) outside the regions")
        return out

    def gather_u64(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vals, ok = super().gather_u64(addrs)
        a = np.asarray(addrs, dtype=np.uint64).reshape(-1)
        for addr in a[np.asarray(ok).reshape(-1)][:64]:
            if not self.contains(int(addr), 8):
                STATS["oob"] += 1
                raise Finding(f"gather_u64 read {int(addr):#x} outside the regions")
        STATS["refused"] += int((~np.asarray(ok)).sum())
        return vals, ok

    def u64_window(self, lo: int, hi: int) -> tuple[np.ndarray, int] | None:
        out = super().u64_window(lo, hi)
        if out is not None:
            words, base = out
            if not self.contains(base, 8 * len(words)) or not base <= lo <= hi <= base + 8 * len(words):
                STATS["oob"] += 1
                raise Finding(f"u64_window({lo:#x}, {hi:#x}) beyond its region")
        return out


def fenced_memory(base: int, size: int) -> FencedMemory:
    mem = FencedMemory()
    builders.make_memory(base, size, mem)
    return mem


class ErrorTrap(logging.Handler):
    """Any ERROR record of the package's loggers during an input is a finding (the
    backend logs handler bugs with log.exception instead of crashing)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        logging.getLogger("viommu_backend").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        if self.records:
            rec = self.records[0]
            self.records.clear()
            raise Finding(f"error logged: {rec.getMessage()}\n{self.format(rec)}")
