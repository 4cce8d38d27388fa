"""`viommu-backend serve` as users run it: a separate process, its sockets, QMP, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from viommu_backend.vfio_user.client import VfioUserClient
from viommu_backend.vfio_user.device import DeviceFlags, PciRegion

from tests.support.topologies import SMMU_TESTDEV

CONFIG = SMMU_TESTDEV + "hotplug = true\n"  # dma0 waits for a device_add


async def _wait_for(paths: list[Path], proc: asyncio.subprocess.Process) -> None:
    for _ in range(200):
        if all(p.exists() for p in paths):
            return
        if proc.returncode is not None:
            raise AssertionError(f"serve exited early with {proc.returncode}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"sockets never appeared: {paths}")


@pytest.fixture
async def served(tmp_path: Path):
    cfg = tmp_path / "machine.toml"
    cfg.write_text(CONFIG)
    sock_dir = tmp_path / "sockets"
    qmp = tmp_path / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "viommu_backend", "serve", "--socket-dir", str(sock_dir),
        "--qmp", str(qmp), "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await _wait_for([sock_dir / "viommu.sock", sock_dir / "dma0.sock", qmp], proc)
        yield proc, sock_dir, qmp
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_presents_the_smmu_and_endpoint(served) -> None:
    proc, sock_dir, qmp = served
    client = await VfioUserClient.connect(sock_dir / "viommu.sock")
    try:
        info = await client.device_info()
        assert info.flags & DeviceFlags.PCI
        cfg = await client.region_read(PciRegion.CONFIG, 0, 12)
        vendor, device = struct.unpack_from("<HH", cfg, 0)
        class_code = int.from_bytes(cfg[9:12], "little")
        assert (vendor, device, class_code) == (0x5555, 0x0806, 0x080600)
        bar0 = await client.region_info(PciRegion.BAR0)
        assert bar0.size == 128 * 1024
        # IDR0 at page 0 offset 0: S1P and S2P (bits 1 and 0) advertised by default.
        idr0 = int.from_bytes(await client.region_read(PciRegion.BAR0, 0, 4), "little")
        assert idr0 & 0b11 == 0b11
    finally:
        await client.close()

    ep = await VfioUserClient.connect(sock_dir / "dma0.sock")
    try:
        cfg = await ep.region_read(PciRegion.CONFIG, 0, 4)
        assert struct.unpack("<HH", cfg) == (0x5555, 0x0001)
    finally:
        await ep.close()

    assert qmp.stat().st_mode & 0o777 == 0o600
    assert (sock_dir / "viommu.sock").stat().st_mode & 0o777 == 0o600
    q = QMPClient("test")
    await q.connect(str(qmp))
    try:
        names = {c["name"] for c in await q.execute("query-commands")}
        assert {"query-viommu", "viommu-translate", "query-viommu-domains"} <= names
        state = await q.execute("query-viommu")
        assert state["CR0"]["SMMUEN"] == 0
        assert state["IDR0"]["S1P"] == 1 and state["IDR0"]["S2P"] == 1
        assert state["IDR1"]["SIDSIZE"] == 16
        fns = await q.execute("query-viommu-functions")
        assert fns["dma0"]["stream-id"] == 0x100 and fns["dma0"]["bdf"] == "0000:01:00.0"
        assert fns["viommu"]["kind"] == "smmuv3" and fns["viommu"]["bdf"] == "0000:00:01.0"
        assert fns["viommu"]["bar-reads"].get("0", 0) >= 1  # the IDR0 read above
    finally:
        await q.disconnect()


async def test_serve_stops_cleanly_on_sigterm(served) -> None:
    proc, sock_dir, qmp = served
    proc.send_signal(signal.SIGTERM)
    rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0
    assert not qmp.exists()


async def test_serve_rejects_a_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[function]]\nname = "x"\nkind = "nope"\nslot = 1\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "viommu_backend", "serve", "--socket-dir", str(tmp_path / "s"),
        "--config", str(cfg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"kind" in err and b"nope" in err
    assert not (tmp_path / "s" / "x.sock").exists()
    assert os.listdir(tmp_path) == ["bad.toml"] or not (tmp_path / "s").exists()


async def test_sigterm_as_soon_as_a_socket_appears_stops_cleanly(tmp_path: Path) -> None:
    """A supervisor may stop the server the moment it sees a socket: the signal handlers
    are in place before the first socket exists, so that is a clean stop, never death by
    the default action (rc -15, sockets left behind)."""
    cfg = tmp_path / "machine.toml"
    cfg.write_text(CONFIG)
    for i in range(5):
        sock_dir = tmp_path / f"sockets{i}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "viommu_backend", "serve", "--socket-dir", str(sock_dir),
            "--config", str(cfg), stdout=asyncio.subprocess.DEVNULL)
        try:
            while not (sock_dir.exists() and os.listdir(sock_dir)):
                assert proc.returncode is None, f"serve exited early with {proc.returncode}"
                await asyncio.sleep(0.0005)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            assert os.listdir(sock_dir) == []
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
