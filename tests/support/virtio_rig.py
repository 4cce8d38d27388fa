"""A virtio-blk function on a RAM disk driven by the test virtio driver, translated
through the SMMU environment of endpoint_env."""

from __future__ import annotations

from viommu_backend.endpoints.dma import TranslatedDma
from viommu_backend.endpoints.virtio_blk import NO_VECTOR, FileBackend, VirtioBlk
from viommu_backend.pci.config_space import COMMAND
from viommu_backend.vfio_user.device import PciRegion

from tests.support.endpoint_env import DATA, RAM, SmmuEnv
from tests.support.virtio_driver import (DEFAULT_FEATURES, F_INDIRECT, F_NEXT, F_WRITE, Driver, Ring,
                                         blk_header)


DISK = 1 << 20


RING = RAM + 0x8_0000


RING_SIZE = 64
BUF = DATA  # request buffers from here (1 MiB area)


class Rig:
    """A VirtioBlk connected to real guest RAM (optionally behind the SMMU) + a driver."""

    def __init__(self, tmp_path, *, translated: bool = False, **kw: object) -> None:
        self.env = SmmuEnv()
        self.ctx, self.mem = self.env.ctx, self.env.mem
        self.path = tmp_path / "disk.img"
        self.dev = VirtioBlk("vblk", backing=FileBackend(self.path, size=DISK), **kw)  # type: ignore[arg-type]
        self.dev.connected(self.ctx)
        self.cfg_w(4, 2, COMMAND.encode(MEMORY=1, MASTER=1))
        self.drv = Driver(self.dev.region_read(PciRegion.CONFIG, 0, 4096), self.rd, self.wr)
        self.iova_off = 0
        if translated:  # identity-ish S1 map: IOVA = PA - RAM (all 16 MiB)
            (pt,) = self.env.s1_stream(0x30)
            self.pt = pt
            for off in range(0, 16 << 20, 2 << 20):
                pt.map(off, RAM + off, 2 << 20)
            self.iova_off = -RAM
            self.dev.set_dma_port(TranslatedDma(self.dev, self.env.mgr, 0x30))
        self.next_buf = BUF

    def cfg_w(self, off: int, size: int, v: int) -> None:
        self.dev.region_write(PciRegion.CONFIG, off, v.to_bytes(size, "little"))

    def rd(self, bar: int, off: int, size: int) -> int:
        return int.from_bytes(self.dev.region_read(bar, off, size), "little")

    def wr(self, bar: int, off: int, size: int, v: int) -> None:
        self.dev.region_write(bar, off, v.to_bytes(size, "little"))

    def bus(self, pa: int) -> int:
        """The address the device is given for guest-physical ``pa``."""
        return pa + self.iova_off

    def alloc(self, n: int) -> int:
        a = self.next_buf
        self.next_buf = (a + n + 63) & ~63
        return a

    def start(self, features: int = DEFAULT_FEATURES, vector: int = NO_VECTOR) -> Ring:
        assert self.drv.negotiate(features)
        ring = Ring(self.mem, RING, RING_SIZE)
        # ring addresses as the device sees them
        self.drv.set("QUEUE_SELECT", 0)
        self.drv.set("QUEUE_SIZE", RING_SIZE)
        self.drv.set("QUEUE_MSIX_VECTOR", vector)
        self.drv.set("QUEUE_DESC", self.bus(ring.desc))
        self.drv.set("QUEUE_DRIVER", self.bus(ring.avail))
        self.drv.set("QUEUE_DEVICE", self.bus(ring.used))
        self.drv.set("QUEUE_ENABLE", 1)
        self.drv.driver_ok()
        self.ring = ring
        return ring

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                *, indirect: bool = False, publish: bool = True) -> tuple[int, int, int]:
        """Queue one request; returns (head, data buffer PA, status PA)."""
        hdr = self.alloc(16)
        self.mem.write(hdr, blk_header(rtype, sector))
        bufs = [(self.bus(hdr), 16, False)]
        data = 0
        if out:
            data = self.alloc(len(out))
            self.mem.write(data, out)
            bufs.append((self.bus(data), len(out), False))
        if in_len:
            data = self.alloc(in_len)
            self.mem.write(data, b"\xCC" * in_len)
            bufs.append((self.bus(data), in_len, True))
        status = self.alloc(1)
        self.mem.write(status, b"\xFF")
        bufs.append((self.bus(status), 1, True))
        if indirect:
            head = self._indirect(self.alloc(16 * len(bufs)), bufs)
        else:
            head = self.ring.add_chain(bufs)
        if publish:
            self.ring.publish(head)
        return head, data, status

    def _indirect(self, table: int, bufs: list[tuple[int, int, bool]]) -> int:
        for k, (addr, ln, wr) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.ring.set_desc(k, addr, ln, (F_WRITE if wr else 0) | (0 if last else F_NEXT),
                               0 if last else k + 1, table=table)
        head = self.ring.free.pop(0)
        self.ring.set_desc(head, self.bus(table), 16 * len(bufs), F_INDIRECT)
        return head

    def kick(self) -> None:
        self.drv.kick(0)
        self.ctx.run_soon()

    def status_of(self, status_pa: int) -> int:
        return self.mem.read(status_pa, 1)[0]

    def disk(self, off: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def close(self) -> None:
        self.dev.close()
        self.env.close()
