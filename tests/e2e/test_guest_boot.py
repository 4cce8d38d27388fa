"""Boot the arm64 guest against a backend and check what the guest sees.

Needs the set-up made by scripts/setup (QEMU >= 10.1, the guest image).  Without it the
tests skip and say why, except under CI=true where they fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from viommu_backend.config import loads_config
from viommu_backend.endpoints import testdev
from viommu_backend.guest.boot import BootSummary, run_boot

from tests.support.guest import boot, leftover_processes, require

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
TESTDEV_SERVER = [sys.executable, str(HERE / "testdev_server.py"), "--socket-dir", "{socket_dir}",
                  "--config", "{config}", "--state", "{socket_dir}/state.json"]


def by_bdf(s: BootSummary) -> dict[str, dict]:
    return {d["bdf"]: d for d in s.pci_devices}


MMIO = "+".join([
    "0000:00:01.0/0/0x0/32",               # MAGIC
    "0000:00:01.0/0/0x4/32",               # VERSION
    "0000:00:01.0/0/0x8/32/0xcafef00d",    # SCRATCH <- value
    "0000:00:01.0/0/0x8/32",               # SCRATCH -> value
    "0000:00:01.0/0/0x18/64/0x123456789abc",  # DMA_SRC, a 64-bit access
    "0000:00:01.0/0/0x18/64",
])

TESTDEV_CONFIG = f"""
[guest]
workload = "enumerate,mmio,hotplug,enumerate"
cmdline = "viommu.mmio={MMIO}"
timeout = 240
[iommu]
device_tree = false
[[root_port]]
name = "rp0"
slot = 2
[[function]]
name = "ep0"
kind = "testdev"
slot = 1
bar0_size = "4K"
[[function]]
name = "ep1"
kind = "testdev"
port = "rp0"
hotplug = true
"""


async def test_testdev_enumerate_mmio_hotplug(guest_ready, tmp_path):
    config = loads_config(TESTDEV_CONFIG, "<test>")
    s = await boot(config, tmp_path, server_argv=TESTDEV_SERVER)
    assert s.qemu_rc == 0 and s.server_rc == 0
    assert s.marks("done") == [{"errors": 0}]

    # first enumeration: host bridge, the root port, ep0 with its 4 KiB BAR0 where predicted
    first, second = [m.data["count"] for m in s.markers if m.name == "enumerate"]
    assert second == first + 1
    devs = by_bdf(s)
    ep0 = devs["0000:00:01.0"]
    assert (ep0["vendor"], ep0["device"], ep0["class"]) == ("0x5555", "0x0001", "0xff0000")
    bar0 = ep0["bars"][0]
    assert bar0["index"] == 0
    assert int(bar0["start"], 16) == s.predicted_bar0["ep0"] == 0x10200000
    assert int(bar0["end"], 16) - int(bar0["start"], 16) + 1 == 0x1000
    assert devs["0000:00:02.0"]["class"].startswith("0x0604")  # the pcie-root-port

    # the hot-plugged endpoint appears behind the root port (bus 1)
    ep1 = devs["0000:01:00.0"]
    assert (ep1["vendor"], ep1["device"]) == ("0x5555", "0x0001")
    assert ep1["bars"] and ep1["bars"][0]["index"] == 0

    # BAR accesses reach the model: reads return what it holds, writes land in it
    reads = [int(m["value"], 16) for m in s.marks("mmio-read")]
    assert reads == [testdev.MAGIC, testdev.VERSION, 0xCAFEF00D, 0x123456789ABC]
    assert len(s.marks("mmio-write")) == 2
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["ep0"]["SCRATCH"] == 0xCAFEF00D
    assert state["ep0"]["DMA_SRC"] == 0x123456789ABC
    assert state["ep1"]["SCRATCH"] == 0


async def test_guest_failure_is_reported_and_cleaned_up(guest_ready, tmp_path):
    config = loads_config(TESTDEV_CONFIG.replace("mmio,hotplug,", "bogus,"), "<test>")
    lines: list[str] = []
    s = await run_boot(config, progress=lines.append, workdir=tmp_path, server_argv=TESTDEV_SERVER)
    assert not s.ok and "workload error" in (s.error or "")
    assert s.guest_errors == [{"workload": "bogus", "msg": "unknown workload"}]
    assert s.qemu_rc == 0 and s.server_rc == 0  # still powered off and stopped cleanly
    assert leftover_processes(tmp_path) == []


async def test_server_that_never_listens_fails_fast(guest_ready, tmp_path):
    config = loads_config(TESTDEV_CONFIG, "<test>")
    s = await run_boot(config, progress=lambda _: None, workdir=tmp_path,
                       server_argv=[sys.executable, "-c", "raise SystemExit(3)"])
    assert not s.ok and "exited (rc=3) before listening" in (s.error or "")
    assert s.qemu_rc is None and leftover_processes(tmp_path) == []


async def test_default_topology_smmu_reprobe(guest_ready, tmp_path):
    """Route 1 on the embedded default: DT node at the predicted BAR0, re-probe in the guest.
    Served by the bare SMMUv3 register function (no domain manager) and a test endpoint."""
    pytest.importorskip("viommu_backend.smmuv3.function")
    from viommu_backend.config import default_config_text

    # the default's topology with a test endpoint in place of its virtio-blk (this server
    # serves testdevs only) and without the I/O workloads
    text = default_config_text().replace('kind = "virtio-blk"', 'kind = "testdev"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("options ="))
    text = text.replace('workload = "enumerate,smmu,hotplug,blk,unplug"', 'workload = "enumerate,smmu,hotplug,enumerate"')
    config = loads_config(text, "<default-testdev>")
    s = await boot(config, tmp_path, server_argv=TESTDEV_SERVER)
    devs = by_bdf(s)
    smmu = devs["0000:00:01.0"]
    assert (smmu["vendor"], smmu["device"], smmu["class"]) == ("0x5555", "0x0806", "0x080600")
    bar0 = smmu["bars"][0]
    assert int(bar0["start"], 16) == s.predicted_bar0["viommu"] == 0x80_0020_0000
    assert int(bar0["end"], 16) - int(bar0["start"], 16) + 1 == 0x20000
    [probe] = s.marks("smmu")
    assert probe["probed"] is True and probe["bdf"] == "0000:00:01.0"
    assert probe["node"] == "8000200000.smmuv3" and "smmu3.0x0000008000200000" in probe["iommu"]
    assert devs["0000:01:00.0"]["device"] == "0x0001"  # the endpoint, hot-plugged after the probe


async def test_backend_serve_command(guest_ready, tmp_path):
    """The real `viommu-backend serve` on a testdev-only machine."""
    import viommu_backend.cli as cli  # noqa: F401  (the integrator's module)

    require("serve" in Path(cli.__file__).read_text(), "viommu_backend.cli has no serve command yet")
    config = loads_config(TESTDEV_CONFIG.replace("hotplug,", "").replace(
        '[[function]]\nname = "ep1"\nkind = "testdev"\nport = "rp0"\nhotplug = true\n', ""), "<test>")
    s = await boot(config, tmp_path)
    reads = [int(m["value"], 16) for m in s.marks("mmio-read")]
    assert reads == [testdev.MAGIC, testdev.VERSION, 0xCAFEF00D, 0x123456789ABC]
