"""The vfio-user backend program conventions: ``serve --socket-path=PATH`` and
``--fd=FDNUM`` (listening or connected) for one function, SIGTERM honoured, and the
JSON description for /usr/share/vfio-user."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

from viommu_backend.conventions import FILE_NAME, install_description
from viommu_backend.smmuv3 import function as smmu_function
from viommu_backend.endpoints import testdev
from viommu_backend.vfio_user.client import VfioUserClient
from viommu_backend.vfio_user.device import PciRegion

from tests.support.topologies import SMMU_TESTDEV

SERVE = [sys.executable, "-m", "viommu_backend", "serve"]


async def vendor_device(client: VfioUserClient) -> tuple[int, int]:
    return struct.unpack_from("<HH", await client.region_read(PciRegion.CONFIG, 0, 4))


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 10)


async def test_socket_path_serves_the_iommu_function_and_honours_sigterm(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(SMMU_TESTDEV)
    path = tmp_path / "smmu.sock"
    proc = await asyncio.create_subprocess_exec(*SERVE, f"--socket-path={path}",
                                                f"--config={tmp_path / 'm.toml'}")
    for _ in range(200):
        if path.exists():
            break
        await asyncio.sleep(0.05)
    client = await VfioUserClient.connect(path)
    assert await vendor_device(client) == (smmu_function.VENDOR_ID, smmu_function.DEVICE_ID)
    await client.close()
    assert await stop(proc) == 0  # SIGTERM: a clean exit, the socket removed
    assert not path.exists()
    assert not list(tmp_path.glob("*.sock"))  # no other function was served


async def test_fd_connected_and_listening_serve_the_named_function(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(SMMU_TESTDEV)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)  # connected
    proc = await asyncio.create_subprocess_exec(
        *SERVE, f"--fd={theirs.fileno()}", "--function=dma0", f"--config={tmp_path / 'm.toml'}",
        pass_fds=[theirs.fileno()])
    theirs.close()
    client = await VfioUserClient.from_socket(ours)
    assert await vendor_device(client) == (testdev.VENDOR_ID, testdev.DEVICE_ID)
    await client.close()
    assert await stop(proc) == 0

    path = tmp_path / "listen.sock"  # a listening socket made by the management layer
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    proc = await asyncio.create_subprocess_exec(
        *SERVE, f"--fd={lsock.fileno()}", f"--config={tmp_path / 'm.toml'}", pass_fds=[lsock.fileno()])
    lsock.close()
    client = await VfioUserClient.connect(path)
    assert await vendor_device(client) == (smmu_function.VENDOR_ID, smmu_function.DEVICE_ID)
    await client.close()
    assert await stop(proc) == 0


async def test_bad_fd_and_unknown_function_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(SMMU_TESTDEV)
    for args, want in ((["--fd=99"], b"--fd 99: not a usable socket"),
                       ([f"--socket-path={tmp_path / 'x.sock'}", "--function=nope"],
                        b"--function nope: no such function")):
        proc = await asyncio.create_subprocess_exec(*SERVE, *args, f"--config={tmp_path / 'm.toml'}",
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2 and want in err, err


def test_description_file_names_the_program_and_its_functions(tmp_path: Path) -> None:
    path = install_description(tmp_path / "vfio-user", "/usr/bin/viommu-backend")
    assert path == tmp_path / "vfio-user" / FILE_NAME
    d = json.loads(path.read_text())
    assert d["binary"] == "/usr/bin/viommu-backend" and d["type"] == "pci"
    assert "--socket-path=PATH" in d["options"] and "--fd=FDNUM" in d["options"]
    assert {"kind": "smmuv3", "vendor-id": "0x5555", "device-id": "0x0806",
            "class": "0x080600"} in d["devices"]
    assert os.stat(path).st_size > 0
