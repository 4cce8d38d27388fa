"""A minimal backend for guest tests: a TestDevice per ``testdev`` function of a config
(and the bare SMMUv3 register function for ``smmuv3``).

    python tests/e2e/testdev_server.py --socket-dir DIR --config FILE [--state FILE]

Serves DIR/<name>.sock until SIGTERM, then writes each device's BAR0 registers to
``--state`` (JSON) so that a test can check what the guest's writes did to the model.
Stands in for ``viommu-backend serve`` where only endpoints are needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from viommu_backend.config import load_config
from viommu_backend.endpoints.testdev import TestDevice
from viommu_backend.vfio_user.server import VfioUserServer


async def serve(socket_dir: Path, config_path: Path, state: Path | None) -> None:
    config = load_config(config_path)
    server = VfioUserServer()
    devices: dict[str, TestDevice] = {}
    for fn in config.functions:
        if fn.kind == "testdev":
            devices[fn.name] = TestDevice(fn.name)
            server.add_device(socket_dir / fn.socket_name, devices[fn.name])
        elif fn.kind == "smmuv3":  # the register model alone (no domain manager behind it)
            from viommu_backend.smmuv3.function import SMMUv3Function

            server.add_device(socket_dir / fn.socket_name, SMMUv3Function(fn.name))
        else:
            raise SystemExit(f"testdev_server: cannot serve {fn.kind} function {fn.name!r}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    if state is not None:
        state.write_text(json.dumps({n: d.regs for n, d in devices.items()}))
    await server.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--state", type=Path)
    ap.add_argument("--qmp", type=Path)  # accepted for command-line compatibility
    a = ap.parse_args()
    asyncio.run(serve(a.socket_dir, a.config, a.state))


if __name__ == "__main__":
    main()
