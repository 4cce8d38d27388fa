"""A minimal virtio-pci modern driver for tests: finds the virtio capabilities, programs
the common config like Linux's virtio_pci_modern does, lays out split virtqueues in guest
memory and submits virtio-blk requests.  Register access goes through two callables so
the same driver runs against the device model directly or (via an adapter) a client."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from viommu_backend.endpoints.virtio_blk import (
    BLK_OUTHDR, COMMON_REGS, VIRTIO_PCI_CAP, Feature, PciCapType, Status, feature_bits)

OFF = {r.name: r.offset for r in COMMON_REGS.registers}
WIDTH = {r.name: r.width // 8 for r in COMMON_REGS.registers}
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
DEFAULT_FEATURES = feature_bits(Feature.VERSION_1, Feature.ACCESS_PLATFORM,
                                Feature.BLK_SEG_MAX, Feature.BLK_BLK_SIZE, Feature.BLK_FLUSH)


def find_virtio_caps(cfg: bytes) -> dict[int, dict[str, int]]:
    """cfg_type -> decoded virtio_pci_cap (+ NOTIFY_OFF_MULTIPLIER) from config space."""
    out: dict[int, dict[str, int]] = {}
    ptr = cfg[0x34]
    while ptr:
        if cfg[ptr] == 0x09:
            cap = VIRTIO_PCI_CAP.decode(int.from_bytes(cfg[ptr:ptr + 16], "little"))
            if cap["CFG_TYPE"] == PciCapType.NOTIFY_CFG:
                cap["NOTIFY_OFF_MULTIPLIER"] = int.from_bytes(cfg[ptr + 16:ptr + 20], "little")
            out.setdefault(cap["CFG_TYPE"], cap)
        ptr = cfg[ptr + 1]
    return out


@dataclass
class Ring:
    """A split virtqueue laid out at ``base`` (desc, avail+used_event, used+avail_event)."""

    mem: object
    base: int
    size: int

    def __post_init__(self) -> None:
        self.desc = self.base
        self.avail = self.desc + 16 * self.size
        self.used = (self.avail + 6 + 2 * self.size + 3) & ~3
        self.end = self.used + 6 + 8 * self.size
        self.free = list(range(self.size))
        self.avail_idx = 0
        self.last_used = 0
        self.mem.write(self.base, bytes(self.end - self.base))  # type: ignore[attr-defined]

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0,
                 table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))  # type: ignore[attr-defined]

    def add_chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Descriptors for ``bufs`` [(addr, len, device_writable)], linked; returns head."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, (i, (addr, ln, wr)) in enumerate(zip(ids, bufs)):
            last = k == len(bufs) - 1
            self.set_desc(i, addr, ln, (F_WRITE if wr else 0) | (0 if last else F_NEXT),
                          0 if last else ids[k + 1])
        return ids[0]

    def add_indirect(self, table: int, bufs: list[tuple[int, int, bool]]) -> int:
        for k, (addr, ln, wr) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.set_desc(k, addr, ln, (F_WRITE if wr else 0) | (0 if last else F_NEXT),
                          0 if last else k + 1, table=table)
        head = self.free.pop(0)
        self.set_desc(head, table, 16 * len(bufs), F_INDIRECT)
        return head

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size),  # type: ignore[attr-defined]
                       struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))  # type: ignore[attr-defined]

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail, struct.pack("<H", flags))  # type: ignore[attr-defined]

    def set_used_event(self, v: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", v))  # type: ignore[attr-defined]

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]  # type: ignore[attr-defined]

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]  # type: ignore[attr-defined]

    def pop_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))  # type: ignore[attr-defined]
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def blk_header(rtype: int, sector: int = 0) -> bytes:
    return BLK_OUTHDR.to_bytes(BLK_OUTHDR.encode(TYPE=rtype, SECTOR=sector))


class Driver:
    """Drives BAR ``bar`` of a device through ``rd(bar, off, size)`` / ``wr(bar, off, size, v)``."""

    def __init__(self, cfg: bytes, rd: Callable[[int, int, int], int],
                 wr: Callable[[int, int, int, int], None]) -> None:
        self.caps = find_virtio_caps(cfg)
        self.rd, self.wr = rd, wr
        common = self.caps[PciCapType.COMMON_CFG]
        self.bar, self.common = common["BAR"], common["OFFSET"]
        self.isr_off = self.caps[PciCapType.ISR_CFG]["OFFSET"]
        self.dev_off = self.caps[PciCapType.DEVICE_CFG]["OFFSET"]
        notify = self.caps[PciCapType.NOTIFY_CFG]
        self.notify_off, self.notify_mult = notify["OFFSET"], notify["NOTIFY_OFF_MULTIPLIER"]

    def get(self, name: str) -> int:
        return self.rd(self.bar, self.common + OFF[name], WIDTH[name])

    def set(self, name: str, v: int) -> None:
        if WIDTH[name] == 8:  # as Linux's vp_iowrite64_twopart
            self.wr(self.bar, self.common + OFF[name], 4, v & 0xFFFF_FFFF)
            self.wr(self.bar, self.common + OFF[name] + 4, 4, v >> 32)
        else:
            self.wr(self.bar, self.common + OFF[name], WIDTH[name], v)

    def device_features(self) -> int:
        out = 0
        for sel in (0, 1):
            self.set("DEVICE_FEATURE_SELECT", sel)
            out |= self.get("DEVICE_FEATURE") << (32 * sel)
        return out

    def negotiate(self, features: int = DEFAULT_FEATURES) -> bool:
        self.set("DEVICE_STATUS", 0)
        self.set("DEVICE_STATUS", Status.ACKNOWLEDGE)
        self.set("DEVICE_STATUS", Status.ACKNOWLEDGE | Status.DRIVER)
        for sel in (0, 1):
            self.set("DRIVER_FEATURE_SELECT", sel)
            self.set("DRIVER_FEATURE", (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.set("DEVICE_STATUS", Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        return bool(self.get("DEVICE_STATUS") & Status.FEATURES_OK)

    def setup_queue(self, q: int, ring: Ring, vector: int = 0xFFFF) -> int:
        self.set("QUEUE_SELECT", q)
        self.set("QUEUE_SIZE", ring.size)
        self.set("QUEUE_MSIX_VECTOR", vector)
        got = self.get("QUEUE_MSIX_VECTOR")
        self.set("QUEUE_DESC", ring.desc)
        self.set("QUEUE_DRIVER", ring.avail)
        self.set("QUEUE_DEVICE", ring.used)
        self.set("QUEUE_ENABLE", 1)
        return got

    def driver_ok(self) -> None:
        self.set("DEVICE_STATUS", self.get("DEVICE_STATUS") | Status.DRIVER_OK)

    def kick(self, q: int) -> None:
        self.set("QUEUE_SELECT", q)
        off = self.get("QUEUE_NOTIFY_OFF")
        self.wr(self.bar, self.notify_off + off * self.notify_mult, 2, q)

    def isr(self) -> int:
        return self.rd(self.bar, self.isr_off, 1)

    def config(self, off: int, size: int) -> int:
        return self.rd(self.bar, self.dev_off + off, size)
