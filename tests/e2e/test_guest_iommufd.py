"""iommufd and VFIO in the guest (qemu_configs/iommufd.toml): the guest kernel built from
Debian's linux-source-6.12 binds the DMA test engine to vfio-pci, and
/bin/iommufd_test (guest_images/programs/iommufd_test.c) drives /dev/iommu and the VFIO
cdev against the emulated SMMU, one ``iommufd-<check>`` marker per check.  The backend's
QMP counters are read at every check marker, so each check's path is seen from the
backend's side too (lower bounds: the guest goes on while the host reads).

The first run builds the 6.12 kernel (cached; scripts/test's set-up builds it first).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from viommu_backend.config import load_config, loads_config
from viommu_backend.guest.boot import KMSG_ALLOWED, BootSummary, HostContext
from viommu_backend.guest.qemu import Marker

from test_guest_boot import boot, guest_ready  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e
CONFIG = Path(__file__).resolve().parents[2] / "qemu_configs" / "iommufd.toml"
ENGINE_SID = 0x100  # eng0 behind rp0: bus 1, devfn 0
LEN = 64 * 1024  # bytes per engine copy (iommufd_test.c LEN)
F_TRANSLATION, C_BAD_CD, ABORT = 0x10, 0x0A, 0xFF
PASID_CTRL_ENABLE = 1


class Snapshots:
    """``query-viommu`` read when each marker arrives (``on_marker`` of run_boot)."""

    def __init__(self) -> None:
        self.at: dict[str, dict[str, Any]] = {}

    async def __call__(self, m: Marker, ctx: HostContext) -> None:
        if m.name.startswith("iommufd-"):
            self.at[m.name] = await ctx.execute("query-viommu")
        return None

    def delta(self, before: str, after: str, *path: str) -> int:
        def get(snap: dict[str, Any]) -> int:
            for key in path:
                snap = snap.get(key, {})
            return snap if isinstance(snap, int) else 0
        return get(self.at[after]) - get(self.at[before])


def steps(mark: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["op"]: s for s in mark["steps"]}


def one(s: BootSummary, name: str) -> dict[str, Any]:
    marks = s.marks(name)
    assert len(marks) == 1, (name, marks)
    return marks[0]


def assert_refusal(step: dict[str, Any], err: str) -> None:
    assert step["ok"] and step["err"] == err and step["expect"] == err and step["as_source"], step


async def test_iommufd_checks_on_built_6_12(guest_ready, tmp_path) -> None:  # noqa: F811
    snaps = Snapshots()
    s = await boot(load_config(CONFIG), tmp_path, on_marker=snaps)

    eng = one(s, "vfio-engine")
    assert eng["driver"] == "vfio-pci" and eng["cdev"].startswith("vfio") and eng["iommu_group"], eng
    env = one(s, "iommufd-env")
    assert env["kernel"].startswith("6.12.") and env["sid"] == ENGINE_SID, env
    assert env["smmu_dt_coherent"] is True and int(env["idr0"], 16) & (1 << 4), env  # COHACC
    # pci=config_acs= gives the root port ACS RR/UF (6.12 enables ACS on DT only for devices
    # enumerated after the first of_iommu_configure), so arm-smmu-v3 enabled PASID
    assert env["pasid_ctrl"] & PASID_CTRL_ENABLE and env["bridge"] == "0000:00:02.0", env
    assert one(s, "iommufd-summary") == {"ran": 3, "failed": 0}
    assert one(s, "iommufd")["rc"] == 0

    ioas = one(s, "iommufd-ioas")
    assert ioas["ok"], ioas
    st = steps(ioas)
    assert_refusal(st["IOMMU_IOAS_MAP over a mapping"], "EEXIST")
    assert_refusal(st["IOMMU_IOAS_MAP in the SW_MSI window"], "EINVAL")
    assert_refusal(st["IOMMU_DESTROY the IOAS under an HWPT"], "EBUSY")
    assert_refusal(st["IOMMU_IOAS_COPY from an unmapped IOVA"], "ENOENT")
    for op in ("DMA src -> dst", "DMA from the copied IOVA", "DMA after re-map"):
        assert st[op]["data_ok"] is True and st[op]["bytes"] == LEN, st[op]
    hole = st["DMA into the unmapped hole"]
    assert hole["error"] and hole["event"] == F_TRANSLATION and hole["dst_untouched"], hole
    ev = st["driver reports the event"]
    assert ev["event"] == F_TRANSLATION and ev["sid"] == ENGINE_SID and ev["addr"] == "0x40100000", ev
    # the backend saw the same: an F_TRANSLATION event recorded, the copies' bytes
    assert snaps.delta("iommufd-env", "iommufd-ioas", "counters", "events", "F_TRANSLATION") >= 1
    assert snaps.delta("iommufd-env", "iommufd-ioas", "translation", "bytes_written") >= 3 * LEN
    assert snaps.delta("iommufd-env", "iommufd-ioas", "counters", "commands", "CFGI_CD") >= 1

    rep = one(s, "iommufd-replace")
    assert rep["ok"], rep
    st = steps(rep)
    assert_refusal(st["IOMMU_DESTROY A while attached"], "EBUSY")
    run = st["no DMA into A after the replace returned"]
    assert run["a_untouched"] and run["b_data_ok"] and run["copies_after"] >= 4, run
    assert run["failed_before"] == 0 and run["failed_after"] == 0 and run["timeouts"] == 0, run
    assert int(st["copies failed during the replace only by C_BAD_CD"]["events_mask"], 16) & ~(1 << C_BAD_CD) == 0
    blocked = st["DMA after detach (blocked)"]
    assert blocked["error"] and blocked["event"] == ABORT and blocked["dst_untouched"], blocked
    # the backend: the replace rewrote the CD (CFGI_CD), the detach made the STE abort
    assert snaps.delta("iommufd-ioas", "iommufd-replace", "counters", "commands", "CFGI_CD") >= 1
    assert snaps.delta("iommufd-ioas", "iommufd-replace", "counters", "commands", "CFGI_STE") >= 1
    assert snaps.delta("iommufd-ioas", "iommufd-replace", "translation", "bytes_written") >= 6 * LEN

    coh = one(s, "iommufd-coherency")
    assert coh["ok"], coh
    st = steps(coh)
    assert st["COHACC override warning"]["warned"] is False
    assert st["IOMMU_GET_HW_INFO"]["type"] == 0 and st["IOMMU_GET_HW_INFO"]["dirty_tracking"] is False  # 6.12: no hw_info
    assert st["VFIO_DMA_CC_IOMMU, no HWPT yet"]["value"] == 1
    assert st["enforce_cache_coherency of the HWPT"]["cc_iommu"] == 0

    assert s.backend is not None
    funcs = s.backend["functions"]
    assert funcs["eng0"]["stream-id"] == ENGINE_SID and funcs["eng0"]["connected"]
    devices = {d["sid"]: d for d in s.backend["domains"]["devices"]}
    assert ENGINE_SID in devices, s.backend["domains"]
    assert not s.backend["viommu"]["gerror_active"]


COHERENCY_VARIANTS = {
    # IDR0.COHACC=0 but the DT says dma-coherent: the firmware wins, with a warning
    "cohacc0-dt-coherent": ('cohacc = false', True,
                            (re.compile(r"smmuv3: IDR0\.COHACC overridden by FW configuration \(true\)"),
                             "the SMMU's IDR0.COHACC=0 disagrees with the DT's dma-coherent")),
    # no dma-coherent in the DT: the kernel has no IOMMU_CAP_CACHE_COHERENCY; vfio-pci refuses
    "cohacc0-dt-noncoherent": ('cohacc = false', False,
                               (re.compile(r"vfio-pci 0000:01:00\.0: probe with driver vfio-pci failed"
                                           r" with error -22"),
                                "vfio_main.c: no IOMMU_CAP_CACHE_COHERENCY -> EINVAL")),
}


@pytest.mark.parametrize("variant", sorted(COHERENCY_VARIANTS))
async def test_iommufd_coherency_as_the_kernel_decides(guest_ready, tmp_path, variant: str) -> None:  # noqa: F811
    option, coherent, allowed = COHERENCY_VARIANTS[variant]
    text = CONFIG.read_text().replace('bar0_size = "128K"', f'bar0_size = "128K"\noptions = {{ {option} }}')
    text = text.replace('route = "module"', f'route = "module"\ndma_coherent = {str(coherent).lower()}')
    text = text.replace('cmdline = "', 'cmdline = "viommu.iommufd_checks=coherency ')
    config = loads_config(text, f"<iommufd {variant}>")
    assert config.iommu.dma_coherent is coherent
    s = await boot(config, tmp_path, kmsg_allowed=KMSG_ALLOWED + (allowed,))

    env = one(s, "iommufd-env")
    assert int(env["idr0"], 16) & (1 << 4) == 0 and env["smmu_dt_coherent"] is coherent, env
    coh = one(s, "iommufd-coherency")
    assert coh["ok"], coh
    st = steps(coh)
    assert st["COHACC override warning"]["warned"] is coherent  # mismatch only when coherent
    if coherent:
        assert st["VFIO_DMA_CC_IOMMU, no HWPT yet"]["value"] == 1
        assert st["enforce_cache_coherency of the HWPT"]["cc_iommu"] == 0
    else:
        refused = st["vfio-pci refuses a non-coherent IOMMU"]
        assert refused["cdev"] is False and refused["driver_bound"] is False, refused
        assert one(s, "vfio-engine")["driver"] == ""
    assert one(s, "iommufd-summary") == {"ran": 1, "failed": 0}
