"""Trapped BAR access counters of PciFunction (read by scripts/bench_guest_dma through
QMP query-viommu-functions) and the single-access fast path of region_read/region_write."""

from __future__ import annotations

from viommu_backend.pci.function import PciFunction
from viommu_backend.vfio_user.device import PciRegion


class Regs:
    def __init__(self) -> None:
        self.accesses: list[tuple[str, int, int]] = []
        self.mem = bytearray(64)

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size))
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size))
        self.mem[offset:offset + size] = value.to_bytes(size, "little")


def test_bar_accesses_counted_per_bar_config_not() -> None:
    regs = Regs()
    fn = PciFunction("t", 0x1234, 0x5678, 0xFF0000)
    fn.add_bar(2, 64, regs)
    fn.region_read(PciRegion.CONFIG, 0, 4)
    assert fn.bar_reads == {} and fn.bar_writes == {}
    fn.region_write(2, 8, (0x11223344).to_bytes(4, "little"))
    assert fn.region_read(2, 8, 4) == (0x11223344).to_bytes(4, "little")
    assert fn.region_read(2, 10, 2) == (0x1122).to_bytes(2, "little")
    assert fn.bar_reads == {2: 2} and fn.bar_writes == {2: 1}


def test_unaligned_access_still_split_into_aligned_pieces() -> None:
    regs = Regs()
    fn = PciFunction("t", 0x1234, 0x5678, 0xFF0000)
    fn.add_bar(0, 64, regs)
    fn.region_write(0, 1, bytes(range(1, 8)))  # 7 bytes at offset 1: 1 + 2 + 4
    assert [a for a in regs.accesses if a[0] == "w"] == [("w", 1, 1), ("w", 2, 2), ("w", 4, 4)]
    assert fn.region_read(0, 1, 7) == bytes(range(1, 8))
    assert fn.region_read(0, 8, 8) == bytes(8)  # one aligned 8-byte access
    assert regs.accesses[-1] == ("r", 8, 8)
    assert fn.bar_reads == {0: 2} and fn.bar_writes == {0: 1}
