"""The vfio-user server over real UNIX sockets, driven by the project's client."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import struct

import pytest

from viommu_backend.memory import GuestMemoryError
from viommu_backend.errorlog import ErrorLog
from viommu_backend.vfio_user import protocol as p
from viommu_backend.vfio_user.client import VfioUserClient
from viommu_backend.vfio_user.device import (
    DeviceContext,
    DeviceFlags,
    DeviceInfo,
    IrqInfo,
    IrqInfoFlags,
    PciIrq,
    PciRegion,
    RegionFlags,
    RegionInfo,
    SetIrqs,
    SparseArea,
    VfioUserDevice,
    VfioUserError,
)
from viommu_backend.vfio_user.server import VfioUserServer

RW = RegionFlags.READ | RegionFlags.WRITE
GUEST = 0x4000_0000
MSIX_VECTORS = 4


class ScratchDevice(VfioUserDevice):
    """BAR0: 4 KiB scratch RAM; config space: 256 bytes; INTx + 4 MSI-X vectors."""

    def __init__(self, name: str = "scratch") -> None:
        self.name = name
        self.bar0 = bytearray(4096)
        self.config = bytearray(256)
        self.ctx: DeviceContext | None = None
        self.log: list[tuple] = []

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(DeviceFlags.PCI | DeviceFlags.RESET, PciRegion.NUM, PciIrq.NUM)

    def region_info(self, index: int) -> RegionInfo:
        if index == PciRegion.BAR0:
            return RegionInfo(index, RW, len(self.bar0), sparse_mmap=(SparseArea(0, 0x800),))
        if index == PciRegion.CONFIG:
            return RegionInfo(index, RW, len(self.config))
        return RegionInfo(index, RegionFlags(0), 0)

    def irq_info(self, index: int) -> IrqInfo:
        count = {PciIrq.INTX: 1, PciIrq.MSIX: MSIX_VECTORS}.get(PciIrq(index), 0)
        return IrqInfo(index, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE, count)

    def _buf(self, index: int) -> bytearray:
        return self.bar0 if index == PciRegion.BAR0 else self.config

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self._buf(index)[offset:offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.BAR0 and offset == 0xFFC:
            raise VfioUserError(errno.EPERM, "read-only register")
        self._buf(index)[offset:offset + len(data)] = data
        self.log.append(("write", index, offset, bytes(data)))

    def set_irqs(self, req: SetIrqs) -> None:
        self.log.append(("set_irqs", req.index, req.start, req.count, len(req.fds)))

    def reset(self) -> None:
        self.bar0[:] = bytes(len(self.bar0))
        self.log.append(("reset",))

    def connected(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self.log.append(("connected",))

    def disconnected(self) -> None:
        self.ctx = None
        self.log.append(("disconnected",))

    def dma_unmapped(self, iova: int, size: int) -> None:
        self.log.append(("unmapped", iova, size))


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def served(tmp_path):
    dev, dev2 = ScratchDevice("a"), ScratchDevice("b")
    server = VfioUserServer()
    paths = (str(tmp_path / "a.sock"), str(tmp_path / "b.sock"))
    server.add_device(paths[0], dev)
    server.add_device(paths[1], dev2)
    await server.start()
    yield server, dev, paths, dev2
    await server.close()
    assert not os.path.exists(paths[0])


async def disconnect(client: VfioUserClient, server: VfioUserServer, path: str) -> None:
    session = await asyncio.wait_for(server.wait_connected(path), 5)
    await client.close()
    await asyncio.wait_for(asyncio.shield(session.done), 5)


async def test_wait_connected_wakes_on_accept(served) -> None:
    server, _, (path, _), _ = served
    waiter = asyncio.create_task(server.wait_connected(path))
    with pytest.raises(asyncio.TimeoutError):  # nobody connected: a cancelled wait ...
        await asyncio.wait_for(server.wait_connected(path), 0.05)
    assert not waiter.done()  # ... leaves the other one waiting
    client = await VfioUserClient.connect(path)
    session = await asyncio.wait_for(waiter, 5)
    assert session is server.sessions[path] and session.session.negotiated
    assert await server.wait_connected(path) is session  # connected already: at once
    await disconnect(client, server, path)


async def test_negotiation_and_info(served) -> None:
    server, dev, (path, _), _ = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client = await VfioUserClient.connect(path)
    assert client.version_reply.major == 0
    assert set(client.version_reply.caps) <= set(p.limits_caps(p.Limits()))
    info = await client.device_info()
    assert info.flags & DeviceFlags.PCI and info.num_regions == 9 and info.num_irqs == 5
    bar0 = await client.region_info(0)  # needs a second, larger GET_REGION_INFO for the cap
    assert bar0.size == 4096 and bar0.flags & RegionFlags.CAPS
    assert bar0.sparse_mmap == (SparseArea(0, 0x800),)
    cfg = await client.region_info(7)
    assert cfg.size == 256 and not cfg.flags & RegionFlags.CAPS
    assert (await client.irq_info(2)).count == MSIX_VECTORS
    with pytest.raises(VfioUserError) as e:
        await client.region_info(12)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(VfioUserError) as e:
        await client.irq_info(9)
    assert e.value.errno == errno.EINVAL
    await client.reset()
    assert ("reset",) in dev.log
    await disconnect(client, server, path)


async def test_dma_map_shared_memfd(served) -> None:
    server, dev, (path, _), _ = served
    client = await VfioUserClient.connect(path)
    ram = await client.map_memory(GUEST, 1 << 20)
    mem = dev.ctx.memory
    ram.write(GUEST + 0x100, b"from-guest")
    assert mem.read(GUEST + 0x100, 10) == b"from-guest"
    mem.write_u64(GUEST + 0x2000, 0xFEEDFACE)
    assert ram.read(GUEST + 0x2000, 8) == struct.pack("<Q", 0xFEEDFACE)
    with pytest.raises(VfioUserError) as e:  # overlap
        await client.map_memory(GUEST + 0x1000, 0x1000)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(VfioUserError) as e:  # would split the mapping
        await client.unmap(GUEST, 0x1000)
    assert e.value.errno == errno.EINVAL
    assert await client.unmap(GUEST, 1 << 20) == 1 << 20
    assert ("unmapped", GUEST, 1 << 20) in dev.log
    with pytest.raises(GuestMemoryError):
        mem.read(GUEST + 0x100, 1)
    await client.map_memory(GUEST, 0x10000)
    await client.map_memory(2 * GUEST, 0x10000)
    await client.unmap_all()
    assert dev.ctx.memory.regions == []
    await disconnect(client, server, path)


async def test_region_access_posted_and_multi(served) -> None:
    server, dev, (path, _), _ = served
    client = await VfioUserClient.connect(path)
    await client.region_write(0, 0x10, b"\x11\x22\x33\x44")
    await client.region_write(0, 0x20, b"post", posted=True)
    client.region_write_multi([(0, 0x30, b"ab"), (0, 0x38, b"12345678"), (7, 0x4, b"\x06\x00")])
    assert await client.region_read(0, 0x10, 4) == b"\x11\x22\x33\x44"
    assert await client.region_read(0, 0x20, 4) == b"post"
    assert await client.region_read(0, 0x30, 16) == b"ab" + bytes(6) + b"12345678"
    assert await client.region_read(7, 4, 2) == b"\x06\x00"
    for bad in [(0, 0xFFE, 4), (5, 0, 4), (99, 0, 4)]:
        with pytest.raises(VfioUserError) as e:
            await client.region_read(*bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(VfioUserError) as e:  # device-raised error goes back as its errno
        await client.region_write(0, 0xFFC, b"xxxx")
    assert e.value.errno == errno.EPERM
    await client.region_write(0, 0xFFC, b"xxxx", posted=True)  # posted failure: no reply
    assert await client.region_read(0, 0, 4) == bytes(4)
    assert client.violations == []  # nothing unexpected came back
    await disconnect(client, server, path)


async def test_interrupts_on_eventfds(served) -> None:
    server, dev, (path, _), _ = served
    client = await VfioUserClient.connect(path)
    server_fds = nfds()
    efds = await client.set_irq_eventfds(PciIrq.MSIX, 0, MSIX_VECTORS)
    assert nfds() == server_fds + 2 * MSIX_VECTORS  # ours + the server's received copies
    assert ("set_irqs", 2, 0, 4, 4) in dev.log
    assert dev.ctx.trigger_irq(PciIrq.MSIX, 2)
    assert await client.wait_irq(efds[2]) == 1
    # Mask vector 1: not delivered; unmask: delivered.
    await client.set_irqs(p.IrqSetFlags.DATA_NONE | p.IrqSetFlags.ACTION_MASK, 2, 1, 1)
    assert not dev.ctx.trigger_irq(PciIrq.MSIX, 1)
    await client.set_irqs(p.IrqSetFlags.DATA_BOOL | p.IrqSetFlags.ACTION_UNMASK, 2, 0, 2, data=b"\0\1")
    assert dev.ctx.trigger_irq(PciIrq.MSIX, 1)
    assert await client.wait_irq(efds[1]) == 1
    # Loopback trigger from the client (DATA_BOOL selects vector 3).
    await client.set_irqs(p.IrqSetFlags.DATA_BOOL | p.IrqSetFlags.ACTION_TRIGGER, 2, 0, 4, data=b"\0\0\0\1")
    assert await client.wait_irq(efds[3]) == 1
    # Unassign (no fds, as QEMU sends -1s): the server closes its copies.
    await client.set_irqs(p.IrqSetFlags.DATA_EVENTFD | p.IrqSetFlags.ACTION_TRIGGER, 2, 0, 4)
    assert nfds() == server_fds + MSIX_VECTORS
    assert not dev.ctx.trigger_irq(PciIrq.MSIX, 0)
    with pytest.raises(VfioUserError) as e:
        await client.set_irqs(p.IrqSetFlags.DATA_NONE | p.IrqSetFlags.ACTION_TRIGGER, 2, 3, 2)
    assert e.value.errno == errno.EINVAL
    intx = await client.set_irq_eventfds(PciIrq.INTX, 0, 1)
    assert dev.ctx.trigger_irq(PciIrq.INTX)
    assert await client.wait_irq(intx[0]) == 1
    # DATA_NONE|TRIGGER with count 0 disables the index.
    await client.set_irqs(p.IrqSetFlags.DATA_NONE | p.IrqSetFlags.ACTION_TRIGGER, 0, 0, 0)
    assert not dev.ctx.trigger_irq(PciIrq.INTX)
    await disconnect(client, server, path)


async def test_server_initiated_dma_never_blocks_the_loop(served) -> None:
    server, dev, (path, _), _ = served
    client = await VfioUserClient.connect(path)
    ram = await client.map_memory(GUEST, 0x10000, shared=False)  # no fd: DMA_READ/WRITE
    ram.write(GUEST + 0x40, b"private")
    mem = dev.ctx.memory
    with pytest.raises(GuestMemoryError):
        mem.read(GUEST, 8)  # no sync access without an fd
    read_task = asyncio.create_task(mem.read_async(GUEST + 0x40, 7))
    # While the DMA_READ is in flight the server still answers the client.
    assert await client.region_read(7, 0, 4) == bytes(4)
    assert await read_task == b"private"
    big = os.urandom(3 << 20)  # larger than max_data_xfer_size: split into chunks
    ram2 = await client.map_memory(GUEST + 0x100000, 4 << 20, shared=False)
    await mem.write_async(GUEST + 0x100000, big)
    assert ram2.read(GUEST + 0x100000, len(big)) == big
    assert await mem.read_async(GUEST + 0x100000, len(big)) == big
    assert client.dma_requests >= 7
    # Outside any mapping: a clean error, no request sent.
    with pytest.raises(GuestMemoryError):
        await mem.read_async(0x1000, 4)
    await disconnect(client, server, path)


async def test_requests_before_version_are_refused(served) -> None:
    server, dev, (path, _), _ = served
    client = await VfioUserClient.connect(path, negotiate=False)
    r = await client.raw_request(p.Command.DEVICE_GET_INFO, p.DeviceGetInfo().encode())
    assert r.error == errno.EINVAL  # nothing is served before VERSION
    r = await client.raw_request(p.Command.REGION_WRITE,
                                 p.RegionAccess(0, 7, 2, b"\x06\x00").encode())
    assert r.error == errno.EINVAL and ("write", 7, 0, b"\x06\x00") not in dev.log
    await client.version()  # then negotiation works, once
    with pytest.raises(VfioUserError) as e:
        await client.version()
    assert e.value.errno == errno.EINVAL
    assert (await client.device_info()).flags & DeviceFlags.PCI
    await disconnect(client, server, path)


async def test_a_failing_set_irqs_gets_an_error_reply(served) -> None:
    server, dev, (path, _), _ = served

    def broken(req: SetIrqs) -> None:
        raise RuntimeError("device bug")

    dev.set_irqs = broken  # this device's own handler fails, as a buggy device would
    errors = ErrorLog()
    errors.attach(logging.getLogger("viommu_backend"))
    try:
        client = await VfioUserClient.connect(path)
        with pytest.raises(VfioUserError) as e:
            await client.set_irq_eventfds(0, 0, 1)
        assert e.value.errno == errno.EIO
        assert errors.count == 1 and "RuntimeError: device bug" in errors.recent[0]["traceback"]
        assert (await client.device_info()).flags & DeviceFlags.PCI  # still serving
        await disconnect(client, server, path)
    finally:
        errors.detach(logging.getLogger("viommu_backend"))


async def test_write_multi_reply_carries_wr_cnt(served) -> None:
    server, dev, (path, _), _ = served
    client = await VfioUserClient.connect(path)
    writes = p.RegionWriteMulti([p.RegionAccess(0, 0, 4, b"abcd"), p.RegionAccess(8, 0, 2, b"ef")])
    r = await client.raw_request(p.Command.REGION_WRITE_MULTI, writes.encode())
    assert r.error == 0 and r.msg == 2  # wr_cnt, as vfio-user.rst says
    assert await client.region_read(0, 8, 2) == b"ef"
    await disconnect(client, server, path)


async def test_malformed_over_socket_keeps_connection(served) -> None:
    server, dev, (path, _), _ = served
    client = await VfioUserClient.connect(path)
    r = await client.raw_request(99, b"junk")
    assert r.error == errno.ENOSYS
    r = await client.raw_request(p.Command.DEVICE_GET_INFO, struct.pack("<I", 4))
    assert r.error == errno.EINVAL
    fd1, fd2 = os.eventfd(0), os.eventfd(0)
    r = await client.raw_request(p.Command.DMA_MAP, p.DmaMap(3, 0, GUEST, 0x1000).encode(), [fd1, fd2])
    assert r.error == errno.EINVAL
    os.close(fd1), os.close(fd2)
    r = await client.raw_request(p.Command.REGION_READ, b"", size=8)
    assert r.error == errno.EINVAL
    assert await client.region_read(7, 0, 2) == b"\0\0"
    await disconnect(client, server, path)


async def test_one_client_at_a_time_and_many_devices(served) -> None:
    server, dev, (path, path_b), dev_b = served
    first = await VfioUserClient.connect(path)
    other = await VfioUserClient.connect(path_b)  # another device, same server
    await other.region_write(0, 0, b"B")
    assert dev_b.bar0[0:1] == b"B" and dev.bar0[0:1] == b"\0"
    second_task = asyncio.create_task(VfioUserClient.connect(path))
    done, _ = await asyncio.wait({second_task}, timeout=0.2)
    assert not done  # the second client waits in the backlog
    await disconnect(first, server, path)
    second = await asyncio.wait_for(second_task, 5)
    assert await second.region_read(7, 0, 1) == b"\0"
    await disconnect(second, server, path)
    await disconnect(other, server, path_b)


async def _step_list(client: VfioUserClient):
    return [
        lambda: client.version(),
        lambda: client.map_memory(GUEST, 0x10000),
        lambda: client.map_memory(2 * GUEST, 0x10000, shared=False),
        lambda: client.device_info(),
        lambda: client.region_info(0),
        lambda: client.irq_info(2),
        lambda: client.set_irq_eventfds(2, 0, 2),
        lambda: client.region_read(7, 0, 64),
        lambda: client.region_write(0, 0, b"abcd", posted=True),
        lambda: client.reset(),
    ]


async def test_disconnect_at_every_boundary_and_mid_message(served) -> None:
    server, dev, (path, _), _ = served
    baseline = nfds()
    nsteps = len(await _step_list(None))  # type: ignore[arg-type]
    for k in range(nsteps + 1):
        client = await VfioUserClient.connect(path, negotiate=False)
        for step in (await _step_list(client))[:k]:
            await step()
        await disconnect(client, server, path)
        assert nfds() == baseline, f"fd leak after {k} steps"
        assert dev.log[-1] == ("disconnected",) and dev.ctx is None
        assert path not in server.sessions
    # Mid-message: half a DMA_MAP with its memfd attached, half a header, half a payload.
    frame = p.frame(1, p.Command.DMA_MAP, p.DmaMap(3, 0, GUEST, 0x1000).encode())
    for cut in (5, 16, 30):
        client = await VfioUserClient.connect(path)
        fd = os.memfd_create("x", os.MFD_CLOEXEC)
        os.ftruncate(fd, 0x1000)
        client.send_raw(frame[:cut], [fd])
        os.close(fd)
        await asyncio.sleep(0.01)
        await disconnect(client, server, path)
        assert nfds() == baseline, f"fd leak after cut at {cut}"
    # A DMA_READ in flight when the client goes away fails cleanly.
    client = await VfioUserClient.connect(path)
    await client.map_memory(GUEST, 0x1000, shared=False)
    client._serve_dma = lambda req: None  # type: ignore[method-assign]  # never answer
    task = asyncio.create_task(dev.ctx.memory.read_async(GUEST, 8))
    await asyncio.sleep(0.01)
    await disconnect(client, server, path)
    with pytest.raises(VfioUserError) as e:
        await task
    assert e.value.errno == errno.ENOTCONN
    assert nfds() == baseline


async def test_server_close_with_client_connected(tmp_path) -> None:
    baseline = nfds()
    dev = ScratchDevice()
    server = VfioUserServer()
    path = str(tmp_path / "c.sock")
    server.add_device(path, dev)
    await server.start()
    client = await VfioUserClient.connect(path)
    await client.map_memory(GUEST, 0x10000)
    await client.set_irq_eventfds(2, 0, 4)
    await server.close()
    await asyncio.wait_for(client.closed.wait(), 5)
    assert dev.log[-1] == ("disconnected",)
    await client.close()
    assert nfds() == baseline and not os.path.exists(path)
