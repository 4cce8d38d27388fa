"""The first vertical slice end to end: the guest's stock arm-smmu-v3 driver brings up the
emulated SMMU, and the stock virtio-blk driver does O_DIRECT I/O through its translation.

Needs the set-up made by scripts/setup (QEMU >= 10.1, the guest image); skips without it
except under CI=true, where it fails.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from viommu_backend.config import default_config_text, loads_config
from viommu_backend.guest.boot import KMSG_ALLOWED, BootSummary, kmsg_problems, run_boot
from viommu_backend.guest.qemu import Marker

from tests.support.guest import leftover_processes

pytestmark = pytest.mark.e2e
BLK_SID = 0x100  # blk0 behind rp0: bus 1, devfn 0
DISK = 64 << 20


def default_with(tmp_path: Path, *, workload: str | None = None, cmdline: str = "",
                 backing: Path | None = None):
    text = default_config_text()
    if workload is not None:
        text = re.sub(r'(?m)^workload = ".*"', f'workload = "{workload}"', text)
    if cmdline:
        text = text.replace("[guest]\n", f'[guest]\ncmdline = "{cmdline}"\n', 1)
    if backing is not None:
        text = text.replace('options = { size = "64M",', f'options = {{ file = "{backing}",')
    return loads_config(text, "<test>")


async def boot(config, workdir: Path, **kw) -> BootSummary:
    lines: list[str] = []
    s = await run_boot(config, progress=lines.append, workdir=workdir / "run", **kw)
    assert leftover_processes(workdir / "run") == []
    console = s.console_log.read_text()[-4000:] if s.console_log and s.console_log.exists() else ""
    assert s.ok, "\n".join(lines) + f"\nconsole:\n{console}"
    return s


def kmsg_texts(s: BootSummary) -> list[str]:
    return [k["text"] for k in s.marks("kmsg")]


async def test_default_workload_through_the_smmu(guest_ready, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * DISK)
    s = await boot(default_with(tmp_path, backing=disk), tmp_path)
    assert s.marks("done") == [{"errors": 0}] and s.qemu_rc == 0

    # the stock driver probed cleanly on the re-probe; the only warning allowed is the
    # failed first probe at boot (BAR decode still off)
    [probe] = s.marks("smmu")
    assert probe["probed"] is True and probe["bdf"] == "0000:00:01.0"
    texts = kmsg_texts(s)
    assert any(re.search(r"arm-smmu-v3 8000200000\.smmuv3: ias 48-bit, oas 48-bit \(features 0x[0-9a-f]+\)", t)
               for t in texts), texts
    assert any("entries for cmdq" in t for t in texts) and any("entries for evtq" in t for t in texts)
    assert s.unexpected_kmsg == [] and kmsg_problems(s.markers) == []
    smmu_warnings = [k for k in s.marks("kmsg") if k["level"] <= 4 and "smmu" in k["text"]]
    assert [k["text"] for k in smmu_warnings] == ["arm-smmu-v3 8000200000.smmuv3: unknown/unsupported TT endianness!"]

    # virtio-blk joined an iommu group with a DMA (translated) default domain
    [dev] = s.marks("blk-dev")
    assert dev["bdf"] == "0000:01:00.0" and dev["iommu_group"] != "" and dev["domain_type"] == "DMA"
    assert dev["bytes"] == DISK

    # data written with O_DIRECT came back intact, at every block size, and is on the disk
    ios = s.marks("blk-io")
    assert [io["bs"] for io in ios] == [4096, 65536, 1 << 20]
    image = disk.read_bytes()
    for io in ios:
        assert io["match"] is True and io["md5"] == io["read_md5"] and io["bytes"] == 4 << 20
        on_disk = hashlib.md5(image[io["offset"]:io["offset"] + io["bytes"]]).hexdigest()
        assert on_disk == io["md5"], f"bs={io['bs']}: the backend's disk does not hold what the guest wrote"

    # host side: the DMA went through translations and walks; CMD_SYNC completed by the
    # MSI write, never by polling CMDQ_CONS; no GERROR, no event
    v = s.backend["viommu"]
    t, c = v["translation"], v["counters"]
    assert t["translations"] > 0 and t["walks"] > 0 and t["faults"] == 0
    assert t["bytes_written"] >= 3 * (4 << 20) and t["bytes_read"] >= 3 * (4 << 20)
    assert c["syncs"] > 0 and c["msi_writes"] == c["syncs"] == c["commands"]["CMD_SYNC"]
    assert c["mmio_reads"].get("CMDQ_CONS", 0) == 0
    assert c["gerrors"] == {} and c["events"] == {}
    assert c["commands"].get("TLBI_NH_VA", 0) > 0  # strict mode: every unmap invalidates

    # while plugged, the endpoint's stream was attached to a translated domain ...
    d = s.backend_before_unplug["domains"]
    hwpts = {h["id"]: h for h in d["hwpts"]}
    [att] = [a for a in d["attachments"] if a["sid"] == BLK_SID]
    hw = hwpts[att["hwpt"]]
    assert hw["kind"] in ("hwpt_nested", "hwpt_paging") and hw["kind"] != "hwpt_blocking"
    assert hw.get("type") != "identity" and BLK_SID in hw["devices"]
    # ... and after the unplug the driver's detach left it blocked
    [u] = s.marks("unplug")
    assert u["blk_gone"] is True and u["bdf"] == "0000:01:00.0"
    after = {a["sid"]: a["hwpt"] for a in s.backend["domains"]["attachments"]}
    assert {h["id"]: h for h in s.backend["domains"]["hwpts"]}[after[BLK_SID]]["kind"] == "hwpt_blocking"
    assert "MB/s" in s.format() and "CMDQ_CONS 0" in s.format()


# device_del while O_DIRECT I/O runs: the block layer fails the outstanding requests
BUSY_UNPLUG_ALLOWED = KMSG_ALLOWED + (
    (re.compile(r"I/O error, dev vda"), "requests in flight when the disk is removed fail"),
    (re.compile(r"Buffer I/O error on dev(ice)? vda"), "same, reported by the page cache"),
)


async def test_unplug_during_io_leaves_guest_and_backend_healthy(guest_ready, tmp_path):
    config = default_with(tmp_path, workload="smmu,hotplug,unplug,enumerate",
                          cmdline="viommu.unplug_busy=1")
    s = await boot(config, tmp_path, kmsg_allowed=BUSY_UNPLUG_ALLOWED)
    [u] = s.marks("unplug")
    assert u["bdf"] == "0000:01:00.0" and u["blk_gone"] is True
    assert u["busy_iterations"] >= 1  # I/O was running when the device went
    # the guest still answers after the unplug: it enumerates and powers off cleanly
    assert s.marks("enumerate")[-1]["count"] == 3
    assert s.marks("done") == [{"errors": 0}] and s.qemu_rc == 0
    # the backend still serves QMP afterwards, with no GERROR and the stream blocked
    assert s.backend is not None and s.backend_error is None
    assert s.backend["viommu"]["counters"]["gerrors"] == {}
    assert s.backend["viommu"]["translation"]["translations"] > 0
    assert s.server_rc in (0, -15)


async def test_msix_completions_when_the_endpoint_is_not_translated(guest_ready, tmp_path):
    """virtio-blk with MSI-X in a real guest: QEMU's vfio-pci keeps the MSI-X table and
    masks by eventfd, so the server must not gate on its own (never written) table.  The
    stream is in an identity domain (iommu.passthrough=1): QEMU delivers vfio-user MSIs
    untranslated, which only reach the ITS when the doorbell address is not an IOVA.
    No unplug: QEMU 11.1.3 aborts unplugging a vfio-user device with MSI-X."""
    text = default_config_text().replace("msix = false", "msix = true")
    text = re.sub(r'(?m)^workload = ".*"', 'workload = "smmu,hotplug,blk"', text)
    text = text.replace("[guest]\n", '[guest]\ncmdline = "iommu.passthrough=1 '
                        'viommu.endpoint_msi=1"\n', 1)
    s = await boot(loads_config(text, "<msix>"), tmp_path)
    assert s.marks("done") == [{"errors": 0}] and s.qemu_rc == 0
    [dev] = s.marks("blk-dev")
    assert dev["domain_type"] == "identity"
    ios = s.marks("blk-io")
    assert [io["bs"] for io in ios] == [4096, 65536, 1 << 20] and all(io["match"] for io in ios)
    blk = s.backend["functions"]["blk0"]
    # every completion went out as an MSI-X vector: no INTx, and no ISR read per request
    # (with INTx the driver reads ISR, in BAR 4, once per interrupt: > 2048 at 4 KiB)
    assert blk["irqs"].get("MSIX", 0) >= 3 * 2 * (4 << 20) // (1 << 20)
    assert "INTX" not in blk["irqs"]
    assert blk["bar-reads"].get("4", 0) < 200
    assert blk["warnings"] == []  # identity domain: MSI-X addresses are physical
    # the DMA still went through the SMMU model, in bypass: translations, no walks
    t = s.backend["viommu"]["translation"]
    assert t["translations"] > 0 and t["walks"] == 0 and t["faults"] == 0


async def test_ats_endpoint_gets_atc_invalidations_from_the_driver(guest_ready, tmp_path):
    """With "ats-supported" on the host bridge and an ATS capability on virtio-blk, the
    stock driver enables ATS (STE.EATS) and follows every unmap's TLBI with CMD_ATC_INV;
    the endpoint's ATC serves its DMA meanwhile, and the data still verifies."""
    text = default_config_text().replace("msix = false }", "msix = false, ats = true }")
    text = text.replace("[iommu]\n", "[iommu]\nats = true\n", 1)
    s = await boot(loads_config(text, "<ats>"), tmp_path)
    assert s.marks("done") == [{"errors": 0}] and s.qemu_rc == 0
    assert all(io["match"] for io in s.marks("blk-io")) and len(s.marks("blk-io")) == 3
    v = s.backend_before_unplug["viommu"]
    cmds, atc = v["counters"]["commands"], v["translation"]["atc"]
    # (a few unmaps happen before the driver enables ATS at attach)
    assert cmds.get("ATC_INV", 0) > 0.9 * cmds.get("TLBI_NH_VA", 0) > 0
    assert atc["hits"] > 0 and atc["misses"] > 0 and atc["invalidations"] >= cmds["ATC_INV"] - 2
    [dev] = [d for d in s.backend_before_unplug["domains"]["devices"] if d["sid"] == BLK_SID]
    assert dev["atc"]["hits"] == atc["hits"]
    assert "endpoint ATC hit rate" in s.format()
    [u] = s.marks("unplug")
    assert u["blk_gone"] is True


def test_kmsg_allow_list():
    def m(level: int, text: str) -> Marker:
        return Marker("kmsg", {"level": level, "text": text}, 0.0)

    ok = [m(3, "arm-smmu-v3 8000200000.smmuv3: unknown/unsupported TT endianness!"),
          m(6, "arm-smmu-v3 8000200000.smmuv3: allocated 65536 entries for cmdq"),
          m(4, "pci-host-generic 4010000000.pcie: Memory resource size exceeds max for 32 bits"),
          m(4, "psci: something unrelated")]
    assert kmsg_problems(ok) == []
    bad = [m(3, "arm-smmu-v3 8000200000.smmuv3: CMD_SYNC timeout at 0x00000010 [hwprod 0x00000011, hwcons 0x00000010]"),
           m(4, "virtio_blk virtio0: something odd"), m(3, "I/O error, dev vda, sector 8")]
    assert [p["text"] for p in kmsg_problems(bad)] == [b.data["text"] for b in bad]
    assert kmsg_problems(bad[2:], BUSY_UNPLUG_ALLOWED) == []


# Unplug, then plug the same endpoint again: QEMU must have released the device id
# (DEVICE_DELETED) before the second device_add, the backend serves the new connection
# from a clean device, and the driver attaches the stream to a fresh translated domain.
async def test_replug_after_unplug(guest_ready, tmp_path):
    s = await boot(default_with(tmp_path, workload="enumerate,smmu,hotplug,io,unplug,hotplug,io,unplug"),
                   tmp_path)
    ios = s.marks("io")
    assert len(ios) == 2 and all(io["match"] and io["write_ok"] and io["read_ok"] for io in ios)
    unplugs = s.marks("unplug")
    assert len(unplugs) == 2 and all(u["blk_gone"] for u in unplugs)
    # each plug attached the stream to a translated domain and each unplug blocked it
    # again (abort STE); the final snapshot is read before the guest's shutdown
    before = s.backend_before_unplug["domains"]  # taken before the second device_del
    hwpts = {h["id"]: h for h in before["hwpts"]}
    [att] = [a for a in before["attachments"] if a["sid"] == BLK_SID]
    assert hwpts[att["hwpt"]]["kind"] in ("hwpt_nested", "hwpt_paging")
    assert hwpts[att["hwpt"]].get("type") != "identity"
    assert s.backend["viommu"]["counters"]["commands"]["CFGI_STE"] >= 8  # 4 STE writes a cycle
    after = {a["sid"]: a["hwpt"] for a in s.backend["domains"]["attachments"]}
    assert {h["id"]: h for h in s.backend["domains"]["hwpts"]}[after[BLK_SID]]["kind"] == "hwpt_blocking"
    assert s.backend["viommu"]["CR0"]["SMMUEN"] == 1  # read before the shutdown disabled it


async def test_shared_registers_the_stock_driver_never_traps(guest_ready, tmp_path):
    """SMMU option registers = "shared": QEMU maps BAR0 (a memfd) into the guest, the
    stock driver probes, programs the queues, runs every CMD_SYNC and unmap through the
    page with no vfio-user message for any SMMU register, and the DMA still verifies."""
    text = default_config_text().replace('bar0_size = "128K"\n',
                                         'bar0_size = "128K"\noptions = { registers = "shared" }\n')
    assert 'registers = "shared"' in text
    s = await boot(loads_config(text, "<shared>"), tmp_path)
    assert s.marks("done") == [{"errors": 0}] and s.qemu_rc == 0
    assert s.marks("smmu")[0]["probed"] is True
    ios = s.marks("blk-io")
    assert [io["bs"] for io in ios] == [4096, 65536, 1 << 20] and all(io["match"] for io in ios)
    v = s.backend["viommu"]
    syncs = v["counters"]["commands"].get("CMD_SYNC", 0)
    assert syncs > 1000 and v["counters"]["msi_writes"] >= syncs
    page = v["registers"]
    assert page["mode"] == "shared" and page["writes_taken"] >= syncs
    smmu = s.backend["functions"]["viommu"]
    assert smmu["bar-reads"].get("0", 0) == 0 and smmu["bar-writes"].get("0", 0) == 0
    assert v["counters"]["mmio_reads"] == {}
    assert v["translation"]["translations"] > 0 and v["translation"]["faults"] == 0


async def test_blk_bench_buffer_layouts_through_the_smmu(guest_ready, tmp_path):
    """The benchmark's guest program (guest_images/programs/blk_bench.c) through the SMMU:
    a 1 MiB request from 256 separate pages (no two physically adjacent) and 64 KiB ones
    from a huge page, their layouts read from pagemap, every page read back as written
    and on the backend's disk with its request / page / seed stamp."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * DISK)
    cases = "blkbench:1048576:2097152:scattered blkbench:65536:1048576:contiguous"

    async def host(m: Marker, ctx) -> str | None:
        return cases if m.name == "wait-host" and m.data["n"] == 0 else None

    s = await boot(default_with(tmp_path, workload="enumerate,smmu,hotplug,blkbench,host,unplug", backing=disk),
                   tmp_path, on_marker=host)
    [dev] = s.marks("blk-dev")
    assert dev["iommu_group"] != "" and dev["domain_type"] == "DMA"
    scattered, contiguous = s.marks("blk-bench")
    assert scattered["ok"] and scattered["layout_ok"] and scattered["mismatched_pages"] == 0
    assert (scattered["pages"], scattered["iovecs"], scattered["runs"], scattered["runs_after"]) == (256, 256, 256, 256)
    assert scattered["requests"] == 2 and scattered["write_ns"] > 0 and scattered["read_ns"] > 0
    assert contiguous["ok"] and contiguous["layout_ok"] and contiguous["mismatched_pages"] == 0
    assert (contiguous["pages"], contiguous["iovecs"], contiguous["runs"]) == (16, 1, 1)
    image = disk.read_bytes()

    def stamp(offset: int) -> tuple[int, ...]:
        return tuple(int.from_bytes(image[offset + 8 * k:offset + 8 * k + 8], "little") for k in range(3))

    # the second case (seed 2) overwrote the first MiB in 64 KiB requests; the second MiB
    # still holds the scattered case's request 1 (seed 1)
    assert [stamp(i * 65536 + p * 4096) for i in (0, 15) for p in (0, 15)] == \
        [(0, 0, 2), (0, 15, 2), (15, 0, 2), (15, 15, 2)]
    assert [stamp((1 << 20) + p * 4096) for p in (0, 255)] == [(1, 0, 1), (1, 255, 1)]
    assert s.backend["viommu"]["translation"]["faults"] == 0
