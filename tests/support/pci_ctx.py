"""A stand-in for the vfio-user server's DeviceContext in PCI unit tests: real
GuestMemory over a memfd, a record of interrupt triggers, and a call_soon queue."""

from __future__ import annotations

import os
from typing import Callable

from viommu_backend.memory import PROT_READ, PROT_WRITE, GuestMemory

RAM_BASE = 0x4000_0000
RAM_SIZE = 0x10_0000


class TestContext:
    __test__ = False

    def __init__(self, ram_base: int = RAM_BASE, ram_size: int = RAM_SIZE) -> None:
        self.memory = GuestMemory()
        fd = os.memfd_create("guest-ram")
        try:
            os.ftruncate(fd, ram_size)
            self.memory.add(ram_base, ram_size, PROT_READ | PROT_WRITE, fd=fd)
        finally:
            os.close(fd)
        self.irqs: list[tuple[int, int]] = []
        self.no_eventfd: set[tuple[int, int]] = set()  # (index, sub) with no eventfd
        self.soon: list[Callable[[], object]] = []

    def trigger_irq(self, index: int, subindex: int = 0) -> bool:
        if (int(index), subindex) in self.no_eventfd:
            return False
        self.irqs.append((int(index), subindex))
        return True

    async def dma_read(self, addr: int, count: int) -> bytes:
        raise NotImplementedError  # fd-backed memory only in these tests

    async def dma_write(self, addr: int, data: bytes) -> None:
        raise NotImplementedError

    def call_soon(self, fn: Callable[[], object]) -> None:
        self.soon.append(fn)

    def run_soon(self) -> None:
        while self.soon:
            self.soon.pop(0)()

    def close(self) -> None:
        self.memory.clear()
